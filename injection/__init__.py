"""Deep-VRM: residual injection of a low-level visual stream into a vision-language model.

>>> from injection import DeepVRMForConditionalGeneration, DeepVRMConfig
>>> model = DeepVRMForConditionalGeneration.from_pretrained("/ckpt/Deep-VRM-Qwen-25-VL-7B", dtype="bfloat16")
>>> with model.record_fusion() as records:
...     model.generate(**inputs, max_new_tokens=8)
>>> records[0].ratio()                     # ‖injected‖ / ‖h‖ per image token
"""

from injection.config import DeepVRMConfig
from injection.fusion import AddFusion, AverageFusion, GatedFusion, build_fusion
from injection.modeling import DeepVRMForConditionalGeneration, deep_vrm_class
from injection.site import FusionRecord, InjectionSite

__all__ = [
    "AddFusion",
    "AverageFusion",
    "DeepVRMConfig",
    "DeepVRMForConditionalGeneration",
    "FusionRecord",
    "GatedFusion",
    "InjectionSite",
    "build_fusion",
    "deep_vrm_class",
]
