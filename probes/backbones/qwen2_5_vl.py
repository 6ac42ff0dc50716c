"""Qwen2.5-VL (and, by subclass, Qwen2-VL): the reference family.

Paths in transformers 5.24: decoder layers at ``model.language_model.layers`` (each returns a Tensor
``[B, T, D]``, not a tuple), vision tower and merger at ``model.visual`` (its ``pooler_output`` is in
image-token order; block and merger outputs are in window order), final norm at
``model.language_model.norm``, unembedding at ``lm_head``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    BatchFeature,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from probes.backbones.base import BackboneAdapter, LoadSettings
from probes.backbones.processing import OfflineQwen2_5_VLProcessor, swift_to_chat
from probes.errors import BadInputError
from probes.storage import hash_json


class Qwen2_5_VLAdapter(BackboneAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    model_class = Qwen2_5_VLForConditionalGeneration
    processor_class = OfflineQwen2_5_VLProcessor
    end_of_turn = "<|im_end|>"

    @classmethod
    def from_pretrained(cls, path: str, settings: LoadSettings, image_pixels: int | None = None) -> BackboneAdapter:
        """Load weights and processor. ``image_pixels`` fixes the pixel budget (min = max pixels), so
        that every image gets the same number of tokens whatever its size (default: the checkpoint's)."""
        model = cls.model_class.from_pretrained(
            path,
            dtype=settings.torch_dtype,
            attn_implementation=settings.attn_implementation,
            trust_remote_code=settings.trust_remote_code,
        )
        model = model.to(settings.device).eval()
        return cls(model, cls.load_processor(path, settings, image_pixels), source=str(path), settings=settings)

    @classmethod
    def load_processor(cls, path: str, settings: LoadSettings, image_pixels: int | None = None):
        size = {"shortest_edge": image_pixels, "longest_edge": image_pixels} if image_pixels else None
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **({"size": size} if size else {}))
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=settings.trust_remote_code)
        tokenizer.padding_side = "left"
        return cls.processor_class(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=_chat_template(Path(path)) or tokenizer.chat_template,
        )

    # --- inputs --------------------------------------------------------------------------------
    def answer_suffix(self, answer: str) -> str:
        """What follows the generation prompt in a training row: the answer, then end of turn."""
        return f"{answer}{self.end_of_turn}"

    def build_inputs(
        self, images: Sequence[Image.Image], prompts: Sequence[str], answers: Sequence[str] | None = None
    ) -> BatchFeature:
        if len(images) != len(prompts) or (answers is not None and len(answers) != len(prompts)):
            raise BadInputError("batch", f"{len(images)} images, {len(prompts)} prompts, {answers and len(answers)} answers")
        texts = [
            self.processor.apply_chat_template(swift_to_chat(p), add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]
        suffixes = [self.answer_suffix(a) for a in answers] if answers is not None else None
        if suffixes:
            texts = [t + s for t, s in zip(texts, suffixes)]
        self.processor.tokenizer.padding_side = "left"
        batch = self.processor(text=texts, images=list(images), padding=True, return_tensors="pt")
        batch = self.with_mm_token_type_ids(batch)
        if suffixes:
            batch["labels"] = self._answer_labels(batch["input_ids"], suffixes)
        return batch

    def _answer_labels(self, input_ids: torch.Tensor, suffixes: Sequence[str]) -> torch.Tensor:
        """Labels that keep only each row's answer tokens, which end the row under left padding."""
        labels = torch.full_like(input_ids, -100)
        for i, suffix in enumerate(suffixes):
            ids = self.processor.tokenizer(suffix, add_special_tokens=False)["input_ids"]
            tail = input_ids[i, -len(ids) :].tolist()
            if tail != ids:
                raise BadInputError(f"answer {suffix!r}", "tokenises differently at the end of the prompt")
            labels[i, -len(ids) :] = input_ids[i, -len(ids) :]
        return labels

    # --- provenance ----------------------------------------------------------------------------
    def processor_settings(self) -> dict[str, Any]:
        ip = self.processor.image_processor
        tok = self.processor.tokenizer
        return {
            "image_processor": type(ip).__name__,
            "size": dict(ip.size),
            "patch_size": ip.patch_size,
            "merge_size": ip.merge_size,
            "temporal_patch_size": ip.temporal_patch_size,
            "image_mean": list(ip.image_mean),
            "image_std": list(ip.image_std),
            "resample": int(ip.resample),
            "tokenizer_vocab": hash_json(tok.get_vocab()),
            "chat_template": hash_json(self.processor.chat_template),
            "padding_side": tok.padding_side,
        }


def _chat_template(path: Path) -> str | None:
    """The chat template saved beside the processor, in either of the formats transformers writes."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text())["chat_template"]
    return None
