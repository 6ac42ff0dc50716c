"""Deep-VRM: a backbone vision-language model plus a low-level visual encoder whose output is fused into
the hidden states of the image tokens after decoder layer K (arXiv 2606.15880; paper.md §1).

The model *is* its backbone's HF class with the Deep-VRM parts attached: ``DeepVRMForConditionalGeneration``
specialises itself, per backbone class, into e.g. ``DeepVRMQwen2_5_VLForConditionalGeneration``
(a subclass of both ``DeepVRMForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``). Module
paths, ``generate``, ``save_pretrained``, PEFT and the probes' backbone adapters therefore work unchanged,
and a new backbone needs only its adapter (``layers``, ``vision``, ``injection_site``).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, GenerationConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from injection.checkpoint import load_checkpoint
from injection.config import DeepVRMConfig
from injection.fusion import build_fusion
from injection.site import FusionRecord, ImageTokens, InjectionSite, StreamEdit
from probes.backbones import adapter_class
from probes.backbones.base import DTYPES, LoadSettings
from probes.errors import BadInputError, ConfigError

LOW_LEVEL_SUFFIX = "_low_level"  # the low-level encoder sits beside the main one: model.visual_low_level
FUSION_NAME = "fusion"


class DeepVRMForConditionalGeneration(PreTrainedModel):
    """A vision-language backbone with Deep-VRM's low-level stream fused after decoder layer K.

    ``forward`` runs the backbone unchanged except at one place: in a pass whose ``input_ids`` contain image
    tokens and that gets ``pixel_values`` (the prefill), the output of decoder layer K (1-based;
    ``layers[K - 1]``) at the image-token positions becomes ``fusion(h, v)``, with v = the low-level encoder's
    output for the same pixels in image-token order. Text positions, other layers and decode steps are
    untouched. ``mm_token_type_ids`` is derived from ``input_ids`` when absent (transformers 5 needs it for
    M-RoPE). Settings: :class:`DeepVRMConfig`, stored in ``config.deep_vrm``.

    Checkpoints (``from_pretrained``): a Deep-VRM save of this class; a checkpoint of the official preview
    code as it is (a Qwen2.5-VL ``config.json`` without Deep-VRM fields, so K = 16 and ``average``; keys in
    the transformers-4 layout ``visual.*``, ``visual_low_level.*``, ``model.layers.*``, ...); a base
    checkpoint without ``visual_low_level.*``, whose low-level encoder is then copied from the main encoder.

    Equivalence rule: loaded from the same weights, with the same inputs, in fp32, this model's logits equal
    those of the official preview forward (``depth == K`` averaging in ``Qwen2_5_VLTextModel.forward``) to a
    max abs diff ≤ 1e-4 (tested against a re-implementation of that loop).

    Inspection: :meth:`fusion_off`, :meth:`low_level_override`, :meth:`record_fusion`,
    :meth:`low_level_features`; the gate of a gated fusion is in ``model.fusion``.
    """

    def __new__(cls, config, *args, **kwargs):
        if cls is DeepVRMForConditionalGeneration:
            cls = deep_vrm_class(adapter_class(config.model_type).model_class)
        return super().__new__(cls)

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self._attach_deep_vrm()

    # --- construction --------------------------------------------------------------------------
    def _attach_deep_vrm(self) -> None:
        """Add the low-level encoder, the fusion and the hook to a built backbone."""
        settings = DeepVRMConfig.from_backbone_config(self.config)
        self.config.deep_vrm = settings.to_dict()
        adapter = adapter_class(self.config.model_type)(self, None, source="deep-vrm", settings=LoadSettings())
        layer = adapter.injection_site(settings.injection_layer)
        parent, name = _split_path(adapter.vision_path)
        low_level = copy.deepcopy(adapter.vision)
        if settings.low_level_init == "random":
            low_level.apply(self._init_weights)
        self.get_submodule(parent).add_module(name + LOW_LEVEL_SUFFIX, low_level)
        fusion = build_fusion(settings, adapter.hidden_size).to(device=self.device, dtype=self.dtype)
        self.add_module(FUSION_NAME, fusion)
        self.deep_vrm_config = settings
        self.backbone_adapter = adapter
        self.low_level_path = adapter.vision_path + LOW_LEVEL_SUFFIX
        self.fusion_site = InjectionSite(layer, settings.injection_layer, lambda: getattr(self, FUSION_NAME))
        self.checkpoint_info: dict[str, str] = {}

    @classmethod
    def from_backbone(cls, backbone: PreTrainedModel, **settings) -> DeepVRMForConditionalGeneration:
        """A Deep-VRM model made from a backbone in memory (a copy; ``backbone`` is left as it is).

        ``settings`` are :class:`DeepVRMConfig` fields. Works for any model whose ``config.model_type``
        has an adapter, however it was built (e.g. a tower swapped in after construction).
        """
        if isinstance(backbone, DeepVRMForConditionalGeneration):
            raise ConfigError(type(backbone).__name__, "is already a Deep-VRM model")
        model = copy.deepcopy(backbone)
        model.config.deep_vrm = DeepVRMConfig.from_backbone_config(model.config, **settings).to_dict()
        model.__class__ = deep_vrm_class(type(backbone))
        model._attach_deep_vrm()
        return model

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: str | torch.dtype = "float32",
        attn_implementation: str = "sdpa",
        device: str | torch.device = "cpu",
        **settings,
    ) -> DeepVRMForConditionalGeneration:
        """Load a Deep-VRM, official-preview or base checkpoint from a local folder (see the class doc).

        ``settings`` (:class:`DeepVRMConfig` fields) override those of the config; where a checkpoint has
        no low-level encoder, ``low_level_init`` says whether it is copied from the main one or random.
        The result's ``checkpoint_info`` says which layout was read and where each part came from.
        """
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise BadInputError(folder, "no config.json in this folder")
        config = AutoConfig.from_pretrained(folder)
        config.deep_vrm = DeepVRMConfig.from_backbone_config(config, **settings).to_dict()
        with no_init_weights():  # every weight is loaded or filled below
            model = cls._from_config(config, dtype=_dtype(dtype), attn_implementation=attn_implementation)
        report = load_checkpoint(model, folder, {"low_level": model.low_level_path + ".", "fusion": FUSION_NAME + "."})
        model._fill_missing(report)
        model.checkpoint_info = {"path": str(folder), **report}
        if (folder / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(folder)
        return model.to(device).eval()

    def _fill_missing(self, report: dict[str, str]) -> None:
        """Fill the parts a checkpoint lacked; record where they came from in ``report``."""
        if report["low_level"] == "missing":
            if self.deep_vrm_config.low_level_init == "copy":
                self.low_level_encoder.load_state_dict(self.backbone_adapter.vision.state_dict())
                report["low_level"] = "copied from the main encoder"
            else:
                self.low_level_encoder.apply(self._init_weights)
                report["low_level"] = "random"
        if report["fusion"] == "missing":
            self.fusion.reset_parameters()
            report["fusion"] = "initialised (gate = 0)"

    # --- parts ---------------------------------------------------------------------------------
    @property
    def injection_layer(self) -> int:
        return self.deep_vrm_config.injection_layer

    @property
    def low_level_encoder(self) -> nn.Module:
        return self.get_submodule(self.low_level_path)

    def low_level_features(self, pixel_values: Tensor, image_grid_thw: Tensor) -> ImageTokens:
        """v = V_a(I): [n_image_tokens, hidden] in image-token order (the rows the fusion uses)."""
        encoder = self.low_level_encoder
        pixel_values = pixel_values.type(encoder.dtype)
        return encoder(pixel_values, grid_thw=image_grid_thw).pooler_output

    # --- forward -------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        mm_token_type_ids: Tensor | None = None,
        **kwargs,
    ):
        """The backbone's forward (same arguments and outputs) with the fusion armed for this pass."""
        if mm_token_type_ids is None and input_ids is not None:
            mm_token_type_ids = self.backbone_adapter.image_token_mask(input_ids).long()
        if (kwargs.get("mm_encoder_outputs") or {}).get("image") is not None:
            raise BadInputError("mm_encoder_outputs", "Deep-VRM needs pixel_values for its low-level stream")
        self._arm(input_ids, pixel_values, image_grid_thw)
        try:
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                pixel_values=pixel_values,
                image_grid_thw=image_grid_thw,
                mm_token_type_ids=mm_token_type_ids,
                **kwargs,
            )
        finally:
            # No later call (a decode step, an inner module run alone) may see this pass's stream. Gradient
            # checkpointing needs no state here: transformers 5 checkpoints `forward`, outside the hooks.
            self.fusion_site.disarm()

    def _arm(self, input_ids: Tensor | None, pixel_values: Tensor | None, image_grid_thw: Tensor | None) -> None:
        if pixel_values is None:  # a decode step or a text-only pass
            return
        if input_ids is None:
            raise BadInputError("inputs_embeds", "Deep-VRM finds the image tokens in input_ids; pass input_ids")
        mask = self.backbone_adapter.image_token_mask(input_ids)
        self.fusion_site.arm(mask, lambda: self._checked_features(input_ids, pixel_values, image_grid_thw))

    def _checked_features(self, input_ids: Tensor, pixel_values: Tensor, image_grid_thw: Tensor) -> ImageTokens:
        stream = self.low_level_features(pixel_values, image_grid_thw)
        self.backbone_adapter.check_image_tokens({"input_ids": input_ids}, stream.shape[0])
        return stream

    # --- generation ----------------------------------------------------------------------------
    def _supports_mm_encoder_outputs(self) -> bool:
        # generate must not pre-encode images: the prefill forward needs the pixels for the low-level stream
        return False

    def _prepare_position_ids_for_generation(self, inputs_tensor: Tensor, model_kwargs: dict) -> Tensor:
        # the 3-D M-RoPE positions of generate need mm_token_type_ids too
        if model_kwargs.get("mm_token_type_ids") is None and not torch.is_floating_point(inputs_tensor):
            model_kwargs["mm_token_type_ids"] = self.backbone_adapter.image_token_mask(inputs_tensor).long()
        return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)

    # --- inspection switches (see injection.site) ----------------------------------------------
    def fusion_off(self) -> contextlib.AbstractContextManager[None]:
        """Inside the block the model runs as its backbone: no fusion, no low-level encoder."""
        return self.fusion_site.off()

    def low_level_override(self, edit: StreamEdit) -> contextlib.AbstractContextManager[None]:
        """Inside the block the stream v is replaced: a Tensor [N, D] (N = image tokens of the batch, in
        image-token order, e.g. another image's :meth:`low_level_features`) replaces it; a callable maps it
        (``torch.zeros_like`` ablates it)."""
        return self.fusion_site.override(edit)

    def record_fusion(self) -> contextlib.AbstractContextManager[list[FusionRecord]]:
        """Yields a list that gets one :class:`FusionRecord` (h, v, fused, gate, ratio) per fused pass."""
        return self.fusion_site.record()


_CLASSES: dict[type, type] = {}


def deep_vrm_class(base: type[PreTrainedModel]) -> type[DeepVRMForConditionalGeneration]:
    """The Deep-VRM class for a backbone class, e.g. ``DeepVRMQwen2_5_VLForConditionalGeneration``."""
    if base not in _CLASSES:
        name = f"DeepVRM{base.__name__}"
        doc = f"Deep-VRM on ``{base.__name__}``: see :class:`DeepVRMForConditionalGeneration`."
        _CLASSES[base] = type(name, (DeepVRMForConditionalGeneration, base), {"__module__": __name__, "__doc__": doc})
    return _CLASSES[base]


def _split_path(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition(".")
    return parent, name


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype}", f"unknown dtype; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


__all__ = ["DeepVRMForConditionalGeneration", "deep_vrm_class"]
