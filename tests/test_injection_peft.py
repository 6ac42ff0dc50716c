"""LoRA targets per stage and the parameter count of the real architectures (meta device)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from injection import DeepVRMForConditionalGeneration
from injection.peft_targets import apply_stage, llm_linear_names, lora_config, parameter_counts
from probes.backbones import load_backbone
from probes.errors import ConfigError

K = 2

# The architecture fields of Qwen2.5-VL-7B-Instruct's published config.json (as in /work/shared/configs).
QWEN2_5_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "sliding_window": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "vocab_size": 152064,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": 3584,
    },
}


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny-qwen2.5-vl", num_layers=4)


def test_stage2_of_qwen2_5_vl_7b_has_the_papers_115m_trainable_parameters(tmp_path):
    counts = parameter_counts(QWEN2_5_VL_7B, stage=2, injection_layer=16)
    assert counts["trainable"] == 115_023_872
    assert counts["trainable_by_part"] == {
        "language_model": 69_206_016,  # 12 layers x (q, k, v, o, gate, up, down), r = 64
        "low_level.blocks": 44_605_440,  # 32 ViT blocks x (qkv, proj, gate, up, down)
        "low_level.merger": 1_212_416,  # 5120 -> 5120 -> 3584
    }
    assert counts["lora"]["r"] == 64 and counts["lora"]["alpha"] == 128
    config_file = tmp_path / "config.json"  # the CLI's path: a config.json file
    config_file.write_text(json.dumps(QWEN2_5_VL_7B))
    from_file = parameter_counts(config_file, stage=2)
    assert from_file["trainable"] == 115_023_872 and json.loads(json.dumps(from_file)) == from_file


def test_stage1_trains_every_llm_linear_layer():
    counts = parameter_counts(QWEN2_5_VL_7B, stage=1)
    assert counts["trainable"] == 28 * 128 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))
    assert counts["trainable_by_part"] == {"language_model": counts["trainable"]}


def test_stage_targets_on_a_tiny_model(tiny):
    model = DeepVRMForConditionalGeneration.from_backbone(tiny.model, injection_layer=K)
    stage1 = lora_config(model, 1)
    assert (stage1.r, stage1.lora_alpha) == (128, 256)
    assert set(stage1.target_modules) == set(llm_linear_names(model)) and len(stage1.target_modules) == 4 * 7
    stage2 = set(lora_config(model, 2).target_modules)
    llm = {n for n in stage2 if ".language_model." in n}
    assert llm == set(llm_linear_names(model, first_layer=K)) and len(llm) == 2 * 7
    low_level = stage2 - llm
    assert low_level and all(n.startswith("model.visual_low_level.") for n in low_level)
    assert not any("patch_embed" in n for n in low_level)  # convolutions are not targets by default
    assert any("patch_embed" in n for n in lora_config(model, 2, conv="all").target_modules)
    with pytest.raises(ConfigError, match="needs a Deep-VRM model"):
        lora_config(tiny.model, 2)


def test_stage2_training_step_with_a_gated_fusion(tiny):
    model = DeepVRMForConditionalGeneration.from_backbone(tiny.model, injection_layer=K, fusion="gated", gate="channel")
    peft_model = apply_stage(model, 2)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or ".fusion.modules_to_save." in n for n in trainable)
    assert not any(".visual." in n or "embed_tokens" in n or "layers.0." in n for n in trainable)
    images = [Image.fromarray((np.random.RandomState(i).rand(112, 112, 3) * 255).astype("uint8")) for i in range(2)]
    inputs = tiny.build_inputs(images, ["What is in this image? <image>"] * 2, answers=["bird", "fish"])
    peft_model.train()
    loss = peft_model(**inputs).loss
    loss.backward()
    gate = next(p for n, p in peft_model.named_parameters() if n.endswith("fusion.modules_to_save.default.gate"))
    assert gate.grad.abs().sum() > 0  # the hook calls the trained copy of the fusion
    with torch.no_grad():
        gate.fill_(0.5)
        peft_model.eval()
        with model.record_fusion() as records:
            peft_model(**inputs)
    assert torch.all(records[0].gate == 0.5)
