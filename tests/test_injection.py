"""Deep-VRM model behaviour on tiny random backbones: where and how the stream is fused, generation,
the inspection switches, Qwen2-VL, and the one-line errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from injection import DeepVRMConfig, DeepVRMForConditionalGeneration
from probes.backbones import load_backbone
from probes.errors import BadInputError, ConfigError

K = 2  # fusion after decoder layer 2 of 4
PROMPTS = ["Is this image real or fake? <image>", "What is in this image? <image>"]  # different lengths: left padding


def _images(n: int = 2, size: int = 112) -> list[Image.Image]:
    return [Image.fromarray((np.random.RandomState(i).rand(size, size, 3) * 255).astype("uint8")) for i in range(n)]


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny-qwen2.5-vl", num_layers=4)


@pytest.fixture(scope="module")
def inputs(tiny):
    return tiny.build_inputs(_images(), PROMPTS)


@pytest.fixture(scope="module")
def base_out(tiny, inputs):
    with torch.no_grad():
        return tiny.model(**inputs, output_hidden_states=True)


def _deep_vrm(tiny, **settings) -> DeepVRMForConditionalGeneration:
    model = DeepVRMForConditionalGeneration.from_backbone(tiny.model, **{"injection_layer": K, **settings})
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a low-level encoder that differs from the main one, as after training
        for p in model.low_level_encoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=noise))
    return model.eval()


def _first_image_positions(inputs) -> list[int]:
    mask = inputs["input_ids"] == 5
    return [int(row.nonzero()[0]) for row in mask]


@pytest.mark.parametrize("gate", ["scalar", "channel", "token"])
def test_zero_gate_gives_the_base_model_bit_for_bit(tiny, inputs, base_out, gate):
    model = _deep_vrm(tiny, fusion="gated", gate=gate)
    with torch.no_grad(), model.record_fusion() as records:
        logits = model(**inputs).logits
    assert torch.equal(logits, base_out.logits)
    assert len(records) == 1 and torch.count_nonzero(records[0].stream) > 0  # the stream was there, gated to 0


@pytest.mark.parametrize("fusion", ["average", "add"])
def test_fusion_changes_only_image_tokens_at_layer_k(tiny, inputs, base_out, fusion):
    model = _deep_vrm(tiny, fusion=fusion)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        v = model.low_level_features(inputs["pixel_values"], inputs["image_grid_thw"])
    mask = inputs["input_ids"] == tiny.image_token_id
    h = base_out.hidden_states[K][mask]
    expected = (h + v) / 2 if fusion == "average" else h + v
    assert torch.equal(out.hidden_states[K][mask], expected)
    assert torch.equal(out.hidden_states[K][~mask], base_out.hidden_states[K][~mask])
    for i in range(K):  # layers before the fusion see nothing of it
        assert torch.equal(out.hidden_states[i], base_out.hidden_states[i])
    for row, first in enumerate(_first_image_positions(inputs)):  # causal: positions before the image never change
        assert torch.equal(out.logits[row, :first], base_out.logits[row, :first])
    assert (out.logits[:, -1] - base_out.logits[:, -1]).abs().max() > 1e-3


def test_mm_token_type_ids_are_derived(tiny, inputs):
    model = _deep_vrm(tiny)
    without = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        assert torch.equal(model(**without).logits, model(**inputs).logits)


def test_low_level_encoder_init(tiny):
    main = tiny.model.model.visual.state_dict()
    copied = DeepVRMForConditionalGeneration.from_backbone(tiny.model, injection_layer=K)
    assert all(torch.equal(v, main[k]) for k, v in copied.low_level_encoder.state_dict().items())
    assert copied.low_level_path == "model.visual_low_level"
    torch.manual_seed(1)
    random = DeepVRMForConditionalGeneration.from_backbone(tiny.model, injection_layer=K, low_level_init="random")
    weights = {k: v for k, v in random.low_level_encoder.state_dict().items() if k.endswith("proj.weight")}
    assert weights and all(not torch.equal(v, main[k]) for k, v in weights.items())


def test_generate_fuses_in_prefill_only(tiny, inputs):
    model = _deep_vrm(tiny)
    with torch.no_grad(), model.record_fusion() as records:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 4)
    assert len(records) == 1 and records[0].mask.shape == inputs["input_ids"].shape
    assert not model.fusion_site.armed


def test_decode_steps_equal_a_model_without_fusion_given_the_same_cache(tiny, inputs):
    model = _deep_vrm(tiny)
    base = tiny.model
    with torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        next_ids = prefill.logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([inputs["input_ids"], next_ids], dim=1)
        attention_mask = torch.cat([inputs["attention_mask"], torch.ones_like(next_ids)], dim=1)
        # the step's 3-D positions, as generate computes them
        positions = base._prepare_position_ids_for_generation(ids, {
            "attention_mask": attention_mask,
            "mm_token_type_ids": (ids == tiny.image_token_id).long(),
            "image_grid_thw": inputs["image_grid_thw"],
        })
        step = {"input_ids": next_ids, "attention_mask": attention_mask, "position_ids": positions[..., -1:]}
        fused = model(**step, cache=copy.deepcopy(prefill.cache)).logits
        plain = base(**step, cache=copy.deepcopy(prefill.cache)).logits
    assert torch.equal(fused, plain)
    assert (fused - model(**step).logits).abs().max() > 0  # the cache holds the fused prefill


def test_inspection_switches(tiny, inputs, base_out):
    model = _deep_vrm(tiny, fusion="add")
    n_tokens = int((inputs["input_ids"] == tiny.image_token_id).sum())
    with torch.no_grad():
        with model.fusion_off():
            assert torch.equal(model(**inputs).logits, base_out.logits)
        with model.low_level_override(torch.zeros_like):  # add + zero stream = base
            assert torch.equal(model(**inputs).logits, base_out.logits)
        v = model.low_level_features(inputs["pixel_values"], inputs["image_grid_thw"])
        swapped = v.roll(v.shape[0] // 2, dims=0)  # each image gets the other image's stream
        with model.low_level_override(swapped), model.record_fusion() as records:
            model(**inputs)
        with model.low_level_override(v[:-1]), pytest.raises(BadInputError, match="rows for"):
            model(**inputs)
    record = records[0]
    assert torch.equal(record.stream, swapped)
    assert record.hidden.shape == record.fused.shape == (n_tokens, tiny.hidden_size)
    assert record.gate is None
    ratio = record.ratio()
    assert ratio.shape == (n_tokens,)
    torch.testing.assert_close(ratio, swapped.norm(dim=-1) / record.hidden.norm(dim=-1))


def test_gate_values_are_recorded(tiny, inputs):
    model = _deep_vrm(tiny, fusion="gated", gate="token")
    with torch.no_grad():
        model.fusion.mlp[2].bias.fill_(0.5)
        with model.record_fusion() as records:
            model(**inputs)
    record = records[0]
    assert record.gate.shape == (record.hidden.shape[0], 1)
    torch.testing.assert_close(record.injected, record.gate * record.stream)


def test_gradient_checkpointing_fuses_in_the_recomputation(tiny, inputs):
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = _deep_vrm(tiny, fusion="gated", gate="channel")
        with torch.no_grad():
            model.fusion.gate.fill_(0.3)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if n.startswith(("fusion", "model.visual_low_level"))}

    plain, checkpointed = grads(False), grads(True)
    assert plain["fusion.gate"].abs().sum() > 0
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


def test_qwen2_vl_backbone():
    tiny2 = load_backbone("tiny-qwen2-vl", num_layers=4)
    inputs = tiny2.build_inputs(_images(), PROMPTS)
    model = _deep_vrm(tiny2)
    assert type(model).__name__ == "DeepVRMQwen2VLForConditionalGeneration"
    with torch.no_grad():
        base = tiny2.model(**inputs, output_hidden_states=True)
        out = model(**inputs, output_hidden_states=True)
        generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    mask = inputs["input_ids"] == tiny2.image_token_id
    assert torch.equal(out.hidden_states[K][~mask], base.hidden_states[K][~mask])
    assert not torch.equal(out.hidden_states[K][mask], base.hidden_states[K][mask])
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 2


# --- one-line errors ---------------------------------------------------------------------------------


def _one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("k", [0, 4, 40])
def test_injection_layer_out_of_range(tiny, k):
    with pytest.raises(ConfigError) as err:
        DeepVRMForConditionalGeneration.from_backbone(tiny.model, injection_layer=k)
    assert _one_line(err) == f"injection_layer={k}: out of range 1..3 for qwen2_5_vl (4 layers)"


def test_unknown_settings():
    with pytest.raises(ConfigError) as err:
        DeepVRMConfig(fusion="concat")
    assert _one_line(err).startswith("fusion='concat': unknown fusion")
    with pytest.raises(ConfigError, match="gate='pixel'"):
        DeepVRMConfig(fusion="gated", gate="pixel")
    with pytest.raises(ConfigError, match="deep_vrm.depth"):
        DeepVRMConfig.from_dict({"depth": 3})


def test_image_token_count_mismatch(tiny, inputs):
    model = _deep_vrm(tiny)
    ids = inputs["input_ids"].clone()
    row, col = (ids == tiny.image_token_id).nonzero()[0]
    ids[row, col] = 8  # one image token fewer than image features
    with pytest.raises(BadInputError) as err:
        model(**{**inputs, "input_ids": ids, "mm_token_type_ids": None})
    assert _one_line(err) == "batch: 31 image tokens in input_ids but 32 image features"


def test_images_without_input_ids_or_pixels(tiny, inputs):
    model = _deep_vrm(tiny)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    with pytest.raises(BadInputError, match="pass input_ids"):
        model(inputs_embeds=embeds, **rest)
    encoded = {"image": model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])}
    text = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with pytest.raises(BadInputError, match="needs pixel_values"):
        model(**text, mm_encoder_outputs=encoded)


def test_mini_vl_backbone_plugs_in_through_its_adapter():
    from injection.peft_targets import apply_stage, lora_config
    from probes.backbones.mini_vl import build_mini_vl, mini_vl_config

    mini = build_mini_vl(mini_vl_config(num_layers=4), pretrained_tower=False)
    inputs = mini.build_inputs(_images(size=128), PROMPTS)
    model = _deep_vrm(mini)
    assert model.low_level_path == "model.visual_low_level"
    with torch.no_grad():
        base = mini.model(**inputs, output_hidden_states=True)
        out = model(**inputs, output_hidden_states=True)
    mask = inputs["input_ids"] == mini.image_token_id
    assert torch.equal(out.hidden_states[K][~mask], base.hidden_states[K][~mask])
    assert not torch.equal(out.hidden_states[K][mask], base.hidden_states[K][mask])
    convs = [n for n in lora_config(model, 2, conv="pointwise").target_modules if "tower" in n]
    assert convs and all(n.endswith(("_expand_conv", "_project_conv", "_conv_head")) for n in convs)
    peft_model = apply_stage(model, 2, low_level="full")  # the whole low-level copy (tower + merger) trains
    peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "visual_low_level" in n and p.requires_grad]
    assert grads and all(g is not None for g in grads)
