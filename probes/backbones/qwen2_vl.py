"""Qwen2-VL: the same module paths, processor and input building as Qwen2.5-VL."""

from __future__ import annotations

from transformers import Qwen2VLForConditionalGeneration

from probes.backbones.processing import OfflineQwen2VLProcessor
from probes.backbones.qwen2_5_vl import Qwen2_5_VLAdapter


class Qwen2VLAdapter(Qwen2_5_VLAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    model_class = Qwen2VLForConditionalGeneration
    processor_class = OfflineQwen2VLProcessor
