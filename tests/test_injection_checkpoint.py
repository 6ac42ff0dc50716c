"""Loading Deep-VRM checkpoints: the official preview layout (checked against a re-implementation of the
official decoder loop), base checkpoints, our own saves, and the one-line weight errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration
from transformers.masking_utils import create_causal_mask

from injection import DeepVRMForConditionalGeneration
from probes.backbones import load_backbone, wrap
from probes.backbones.processing import IMAGE_PAD_ID, word_tokenizer
from probes.backbones.tiny import tiny_processor
from probes.errors import BadInputError, WeightsError

PROMPTS = ["Is this image real or fake? <image>", "What is in this image? <image>"]
OFFICIAL_K = 16

# A config.json as transformers 4.x wrote it for Qwen2.5-VL (flat text fields, `rope_scaling`), shrunk:
# 18 decoder layers so that the official K = 16 fits. No Deep-VRM fields, like the preview's checkpoints.
LEGACY_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "transformers_version": "4.51.3",
    "torch_dtype": "float32",
    "vocab_size": len(word_tokenizer()),
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 18,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "vision_start_token_id": 3,
    "vision_end_token_id": 4,
    "image_token_id": IMAGE_PAD_ID,
    "video_token_id": 6,
    "vision_config": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "in_chans": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
        "out_hidden_size": 64,
    },
}


def _images(n: int = 2) -> list[Image.Image]:
    return [Image.fromarray((np.random.RandomState(i).rand(112, 112, 3) * 255).astype("uint8")) for i in range(n)]


def _legacy_key(name: str) -> str:
    """A transformers-5 module name in the transformers-4 layout of the preview's checkpoints."""
    if name.startswith("model.visual"):
        return name.removeprefix("model.")
    return name.replace("model.language_model.", "model.", 1)


def _official_preview_logits(base, low_level_visual, inputs, k: int = OFFICIAL_K) -> torch.Tensor:
    """The preview's forward, by hand: image embeddings scattered into the input, the decoder layers run one
    by one, and after the layer with ``depth == k`` the image rows replaced by (h + low_level) / 2."""
    model, text = base.model, base.model.language_model
    ids, grid = inputs["input_ids"], inputs["image_grid_thw"]
    pixels = inputs["pixel_values"].type(model.visual.dtype)
    image_mask = ids == base.config.image_token_id
    embeds = text.embed_tokens(ids)
    image_embeds = model.visual(pixels, grid_thw=grid).pooler_output
    low_level_embeds = low_level_visual(pixels, grid_thw=grid).pooler_output
    embeds = embeds.masked_scatter(image_mask[..., None].expand_as(embeds), image_embeds)
    position_ids, _ = model.get_rope_index(
        ids, mm_token_type_ids=image_mask.long(), image_grid_thw=grid, attention_mask=inputs["attention_mask"]
    )
    causal_mask = create_causal_mask(
        config=text.config, inputs_embeds=embeds, attention_mask=inputs["attention_mask"], cache=None
    )
    position_embeddings = text.rotary_emb(embeds, position_ids)
    hidden = embeds
    for depth, layer in enumerate(text.layers, start=1):
        hidden = layer(hidden, attention_mask=causal_mask, position_embeddings=position_embeddings)
        if depth == k:
            hidden[image_mask] = (hidden[image_mask] + low_level_embeds) / 2
    return base.lm_head(text.norm(hidden))


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A tiny random Qwen2.5-VL with a different random low-level ViT, saved as the preview code saved."""
    folder = tmp_path_factory.mktemp("official")
    (folder / "config.json").write_text(json.dumps(LEGACY_CONFIG))
    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    base = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    low_level = type(base.model.visual)._from_config(config.vision_config).eval()
    state = {_legacy_key(n): t for n, t in base.state_dict().items()}
    state |= {f"visual_low_level.{n}": t for n, t in low_level.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    inputs = wrap(base, tiny_processor()).build_inputs(_images(), PROMPTS)
    return folder, base, low_level, inputs


def test_loads_the_official_preview_checkpoint_as_it_is(official):
    folder, base, low_level, inputs = official
    model = DeepVRMForConditionalGeneration.from_pretrained(folder)
    assert model.injection_layer == OFFICIAL_K and model.deep_vrm_config.fusion == "average"
    assert model.checkpoint_info["layout"] == "legacy" and model.checkpoint_info["low_level"] == "checkpoint"
    with torch.no_grad():
        logits = model(**inputs).logits
        reference = _official_preview_logits(base, low_level, inputs)
        plain = base(**inputs).logits
    assert (logits - reference).abs().max() <= 1e-4
    assert (plain - reference).abs().max() > 1e-2  # the fusion matters, so the match is not trivial


def test_base_checkpoint_copies_the_main_encoder(tmp_path):
    tiny = load_backbone("tiny-qwen2.5-vl", num_layers=4)
    tiny.model.save_pretrained(tmp_path)
    model = DeepVRMForConditionalGeneration.from_pretrained(tmp_path, injection_layer=2)
    assert model.checkpoint_info["low_level"] == "copied from the main encoder"
    main = model.model.visual.state_dict()
    assert all(torch.equal(t, main[n]) for n, t in model.low_level_encoder.state_dict().items())
    torch.manual_seed(0)
    random = DeepVRMForConditionalGeneration.from_pretrained(tmp_path, injection_layer=2, low_level_init="random")
    assert random.checkpoint_info["low_level"] == "random"
    assert not torch.equal(random.low_level_encoder.merger.mlp[0].weight, main["merger.mlp.0.weight"])


@pytest.mark.parametrize("fusion", ["average", "gated"])
def test_save_and_load_round_trip(tmp_path, fusion):
    tiny = load_backbone("tiny-qwen2.5-vl", num_layers=4)
    model = DeepVRMForConditionalGeneration.from_backbone(tiny.model, injection_layer=3, fusion=fusion, gate="token")
    with torch.no_grad():
        model.model.visual_low_level.merger.mlp[0].weight.mul_(1.5)
        if fusion == "gated":
            model.fusion.mlp[2].bias.fill_(0.25)
    model.save_pretrained(tmp_path)
    loaded = DeepVRMForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.deep_vrm_config == model.deep_vrm_config
    assert loaded.checkpoint_info["layout"] == "current"
    assert loaded.checkpoint_info["fusion"] == ("checkpoint" if fusion == "gated" else "none")
    inputs = tiny.build_inputs(_images(), PROMPTS)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


# --- one-line errors ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    tiny = load_backbone("tiny-qwen2.5-vl", num_layers=4)
    DeepVRMForConditionalGeneration.from_backbone(tiny.model, injection_layer=2).save_pretrained(folder)
    return folder


def _edit_weights(source, target, edit) -> None:
    (target / "config.json").write_text((source / "config.json").read_text())
    save_file(edit(load_file(source / "model.safetensors")), target / "model.safetensors")


def _error(exc_type, folder) -> str:
    with pytest.raises(exc_type) as err:
        DeepVRMForConditionalGeneration.from_pretrained(folder)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_shape_mismatch_names_the_key(saved, tmp_path):
    key = "model.language_model.layers.1.mlp.up_proj.weight"
    _edit_weights(saved, tmp_path, lambda s: s | {key: torch.zeros(3, 3)})
    assert _error(WeightsError, tmp_path) == f"{key}: shape [3, 3] in the checkpoint but [512, 128] in the model"


def test_missing_and_unexpected_keys(saved, tmp_path):
    key = "model.language_model.norm.weight"
    _edit_weights(saved, tmp_path, lambda s: {k: v for k, v in s.items() if k != key})
    assert _error(WeightsError, tmp_path).startswith(f"{key}: missing from the checkpoint")
    _edit_weights(saved, tmp_path, lambda s: s | {"model.extra.weight": torch.zeros(1)})
    assert _error(WeightsError, tmp_path).startswith("model.extra.weight: not a weight of DeepVRMQwen2_5_VL")
    partial = "model.visual_low_level.merger.ln_q.weight"
    _edit_weights(saved, tmp_path, lambda s: {k: v for k, v in s.items() if k != partial})
    assert "only part of the low_level weights" in _error(WeightsError, tmp_path)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LEGACY_CONFIG))
    assert "no model.safetensors" in _error(BadInputError, tmp_path)
    assert "no config.json" in _error(BadInputError, tmp_path / "nowhere")
