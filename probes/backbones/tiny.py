"""Tiny random Qwen2.5-VL / Qwen2-VL models with offline processors: the exact HF classes, in seconds.

They exercise every code path (capture, injection, training) in fast tests. Their weights are random:
never present a result measured on them as a finding.
"""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen2VLImageProcessorPil

from probes.backbones.base import BackboneAdapter, LoadSettings
from probes.backbones.processing import (
    IM_END_ID,
    IMAGE_PAD_ID,
    PAD_ID,
    VIDEO_PAD_ID,
    VISION_END_ID,
    VISION_START_ID,
    OfflineQwen2_5_VLProcessor,
    OfflineQwen2VLProcessor,
    word_tokenizer,
)
from probes.backbones.qwen2_5_vl import Qwen2_5_VLAdapter
from probes.backbones.qwen2_vl import Qwen2VLAdapter
from probes.errors import ConfigError

TINY_IMAGE_PIXELS = 112 * 112  # 8x8 patches of 14 px -> 16 image tokens after the 2x2 merge


def _text_config(vocab_size: int, hidden: int, num_layers: int) -> dict:
    head_dim = 32
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden // head_dim,
        num_key_value_heads=max(1, hidden // head_dim // 2),
        max_position_embeddings=4096,
        # mrope_section must sum to head_dim / 2
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
        bos_token_id=PAD_ID,
        eos_token_id=IM_END_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=True,
    )


_SPECIAL_IDS = dict(
    image_token_id=IMAGE_PAD_ID,
    video_token_id=VIDEO_PAD_ID,
    vision_start_token_id=VISION_START_ID,
    vision_end_token_id=VISION_END_ID,
)


def tiny_config(family: str = "qwen2_5_vl", *, num_layers: int = 8, hidden: int = 128, vocab_size: int | None = None):
    """The config of a tiny model of ``family`` (``qwen2_5_vl`` or ``qwen2_vl``)."""
    vocab_size = vocab_size or len(word_tokenizer())
    text = _text_config(vocab_size, hidden, num_layers)
    if family == "qwen2_5_vl":
        vision = dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            out_hidden_size=hidden,
            fullatt_block_indexes=[1],
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_SPECIAL_IDS)
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=64, num_heads=4, mlp_ratio=2, hidden_size=hidden, patch_size=14)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **_SPECIAL_IDS)
    raise ConfigError(f"family={family}", "tiny models exist for qwen2_5_vl and qwen2_vl")


def tiny_processor(family: str = "qwen2_5_vl", image_pixels: int = TINY_IMAGE_PIXELS):
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": image_pixels, "longest_edge": image_pixels})
    tokenizer = word_tokenizer()
    cls = OfflineQwen2_5_VLProcessor if family == "qwen2_5_vl" else OfflineQwen2VLProcessor
    return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
               chat_template=tokenizer.chat_template)


def build_tiny(
    family: str = "qwen2_5_vl",
    *,
    num_layers: int = 8,
    hidden: int = 128,
    seed: int = 0,
    image_pixels: int = TINY_IMAGE_PIXELS,
    settings: LoadSettings | None = None,
) -> BackboneAdapter:
    """A tiny model of ``family`` with seeded random weights, wrapped in its adapter.

    ``image_pixels`` fixes the processor's pixel budget (default 112 x 112, 16 image tokens).
    """
    settings = settings or LoadSettings()
    config = tiny_config(family, num_layers=num_layers, hidden=hidden)
    adapter_cls = Qwen2_5_VLAdapter if family == "qwen2_5_vl" else Qwen2VLAdapter
    torch.manual_seed(seed)
    model = adapter_cls.model_class._from_config(
        config, dtype=settings.torch_dtype, attn_implementation=settings.attn_implementation
    )
    model = model.to(settings.device).eval()
    source = f"tiny-{family}:layers={num_layers},hidden={hidden},seed={seed}"
    return adapter_cls(model, tiny_processor(family, image_pixels), source=source, settings=settings)
