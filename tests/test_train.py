"""Deep-VRM training: stage data, prompts, the three runs on a tiny model, resume after a kill, and the
config. Tiny random Qwen2.5-VL + forensic-mini's small preset: code paths only, never findings."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from injection import DeepVRMForConditionalGeneration
from injection.train import (
    PROMPT_ANSWERS,
    TrainConfig,
    answer_token_ids,
    default_injection_layer,
    epoch_rows,
    forensic_parts,
    load_model,
    param_groups,
    stage_examples,
    train,
    training_examples,
)
from probes.backbones import load_backbone
from probes.backbones.processing import FORENSIC_PROMPTS
from probes.data import ForensicMiniConfig, build_forensic_mini, parse_answer, read_manifest
from probes.errors import BadInputError, ConfigError

TINY = "tiny-qwen2.5-vl"


@pytest.fixture(scope="module")
def manifest():
    return build_forensic_mini(ForensicMiniConfig.preset("small")).manifest_path


def _config(stage: str, out, **overrides) -> TrainConfig:
    values = dict(stage=stage, model=TINY, data=None, preset="small", max_steps=2, batch_size=2, out=str(out))
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    return train(_config("1", tmp_path_factory.mktemp("runs") / "s1"), progress=False)


@pytest.fixture(scope="module")
def stage2(stage1, tmp_path_factory):
    return train(_config("2", tmp_path_factory.mktemp("runs") / "s2", model=stage1["out"]), progress=False)


# --- data and prompts ------------------------------------------------------------------------------


def test_every_prompt_variant_has_answer_words_that_parse_back():
    assert set(PROMPT_ANSWERS) == set(FORENSIC_PROMPTS)
    for prompt, (real_word, fake_word) in PROMPT_ANSWERS.items():
        assert parse_answer(prompt, real_word) == "real"
        assert parse_answer(prompt, fake_word) == "fake"


def test_forensic_parts_follow_cues_and_scenes(manifest):
    records = read_manifest(manifest)
    parts = forensic_parts(records)
    ids = [r.id for rows in parts.values() for r in rows]
    assert len(ids) == len(set(ids))  # each row in one part
    assert all(r.split == "train" for rows in parts.values() for r in rows)
    for part, cue in (("d1", "semantic"), ("d2", "trace")):
        fakes = [r for r in parts[part] if r.label == "fake"]
        assert fakes and all(r.cue == cue for r in fakes)
        scenes = {r.scene_id for r in fakes}
        assert all(r.scene_id in scenes for r in parts[part] if r.label == "real")  # their content twins
    twins = {r.scene_id for r in parts["d1"] if r.label == "real"}
    assert twins and twins <= {r.scene_id for r in parts["d1"] if r.label == "fake"}
    assert all(r.post != "none" and r.label == "real" for r in parts["distractor"])


def test_each_stage_reads_its_parts(manifest):
    def parts(stage, **kw):
        return {e.part for e in stage_examples(TrainConfig(stage=stage, **kw), manifest)}

    assert parts("1") == {"semantic", "d1"}
    assert parts("2") == {"semantic", "d1", "d2", "distractor", "other"}
    assert parts("naive") == {"d2"}
    capped = [e for e in stage_examples(TrainConfig(stage="1", max_semantic=5), manifest) if e.part == "semantic"]
    assert len(capped) == 5
    one = stage_examples(TrainConfig(stage="naive"), manifest)
    assert training_examples(TrainConfig(stage="naive"), [manifest, manifest]) == one + one  # pooled


def test_data_without_cues_gives_every_labelled_row_to_every_stage(manifest, tmp_path):
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    plain = [{k: v for k, v in r.items() if k != "cue"} | {"images": [str(manifest.parent / r["images"][0])]}
             for r in rows if r["split"] == "train"]
    path = tmp_path / "user.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in plain))
    for stage in ("1", "naive"):
        examples = stage_examples(TrainConfig(stage=stage), path)
        assert len([e for e in examples if e.part != "semantic"]) == len(plain)


def test_epoch_rows_are_seeded_and_draw_prompt_variants(manifest):
    examples = stage_examples(TrainConfig(stage="2"), manifest)
    rows = epoch_rows(examples, seed=0, epoch=0, variants=True)
    assert rows == epoch_rows(examples, seed=0, epoch=0, variants=True)
    assert rows != epoch_rows(examples, seed=0, epoch=1, variants=True)
    forensic = [(p, a) for _, p, a in rows if p in PROMPT_ANSWERS]
    assert len({p for p, _ in forensic}) == len(FORENSIC_PROMPTS)
    assert all(a in PROMPT_ANSWERS[p] for p, a in forensic)
    fixed = epoch_rows(examples, seed=0, epoch=0, variants=False)
    assert {p for _, p, _ in fixed if p in PROMPT_ANSWERS} == {FORENSIC_PROMPTS[0]}


# --- config ------------------------------------------------------------------------------------------


def test_config_round_trip_and_hash(tmp_path):
    config = TrainConfig(stage="2", lr=3e-4, betas=[0.9, 0.95])
    config.save(tmp_path / "c.json")
    loaded = TrainConfig.load(tmp_path / "c.json")
    assert loaded == config and loaded.hash() == config.hash()
    assert TrainConfig(stage="2", lr=3e-4, device="cuda", out="x", checkpoint_every=7).hash() == config.hash()
    assert TrainConfig(stage="2", lr=1e-4).hash() != config.hash()


@pytest.mark.parametrize("values, match", [
    ({"stage": "3"}, "unknown stage"),
    ({"stage": "2", "fusion": "concat"}, "fusion"),
    ({"stage": "1", "epochs": 0}, "at least 1"),
    ({"stage": "1", "learning_rate": 1e-4}, "unknown"),
])
def test_bad_config_is_a_one_line_error(values, match):
    with pytest.raises(ConfigError, match=match) as err:
        TrainConfig.from_dict(values)
    assert "\n" not in str(err.value)


def test_default_injection_layer_keeps_the_papers_depth():
    assert default_injection_layer(28) == 16
    assert default_injection_layer(12) == 7
    assert default_injection_layer(2) == 1


def test_learning_rates_per_part():
    low_level = torch.nn.ModuleDict({"merger": torch.nn.Linear(2, 2), "blocks": torch.nn.Linear(2, 2)})
    model = torch.nn.ModuleDict({"visual_low_level": low_level, "layer": torch.nn.Linear(2, 2)})
    config = TrainConfig(stage="2", lr=1e-3, merger_lr=1e-6, low_level_lr=1e-4, weight_decay=0.1)
    by_lr = {(g["lr"], g["weight_decay"]): sum(p.numel() for p in g["params"]) for g in param_groups(model, config)}
    assert by_lr == {(lr, wd): n for lr in (1e-3, 1e-4, 1e-6) for wd, n in ((0.1, 4), (0.0, 2))}
    same = param_groups(model, TrainConfig(stage="2", lr=1e-3, merger_lr=1e-6))
    assert {g["lr"] for g in same} == {1e-3, 1e-6}  # low_level_lr defaults to lr


# --- runs ----------------------------------------------------------------------------------------


def test_stage1_trains_the_decoder_lora_and_saves_it_merged(stage1):
    assert stage1["steps"] == 2 and len(stage1["losses"]) == 2
    assert set(stage1["trainable"]["by_part"]) == {"decoder_layers"}
    assert set(stage1["data"]["parts"]) == {"semantic", "d1"}
    for key in ("config", "config_hash", "versions", "times_s", "dtype", "attn_implementation", "samples_per_s"):
        assert key in stage1
    trained = load_model(stage1["out"])
    assert not isinstance(trained.model, DeepVRMForConditionalGeneration)
    base = load_backbone(TINY).model.state_dict()
    state = trained.model.state_dict()
    assert set(state) == set(base)  # merged: no LoRA keys left
    layer = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state[layer], base[layer])
    assert torch.equal(state["model.visual.merger.mlp.0.weight"], base["model.visual.merger.mlp.0.weight"])


def test_stage2_starts_from_stage1_and_saves_a_deep_vrm_checkpoint(stage1, stage2):
    assert stage2["source"]["model"] == stage1["out"]
    assert stage2["source"]["low_level"] == "copied from the main encoder"
    k = stage2["deep_vrm"]["injection_layer"]
    assert k == default_injection_layer(8)
    assert set(stage2["trainable"]["by_part"]) == {"decoder_layers", "low_level.encoder", "low_level.merger"}
    model = load_model(stage2["out"]).model
    assert isinstance(model, DeepVRMForConditionalGeneration) and model.injection_layer == k
    before = load_model(stage1["out"]).model.state_dict()
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(int(n.split("layers.")[1].split(".")[0]) >= k for n in changed)  # layers < K frozen
    assert any(n.startswith("model.visual_low_level.") and not torch.equal(after[n], before[n.replace("_low_level", "")])
               for n in after if n.startswith("model.visual_low_level."))


def test_naive_fine_tunes_every_decoder_layer_in_full(tmp_path):
    record = train(_config("naive", tmp_path / "naive"), progress=False)
    assert set(record["data"]["parts"]) == {"d2"}
    base = load_backbone(TINY)
    assert record["trainable"]["by_part"] == {"decoder_layers": sum(p.numel() for p in base.layers.parameters())}
    state = load_model(record["out"]).model.state_dict()
    before = base.model.state_dict()
    changed = {n.split(".")[2] for n in before if not torch.equal(before[n], state[n])}
    assert changed == {"layers"}  # model.language_model.layers.*: no vision, embedding or norm change


def test_answer_tokens_train_only_the_answer_words_rows_and_stay_tied(tmp_path):
    record = train(_config("naive", tmp_path / "tokens", answer_tokens=True, lr=1e-2), progress=False)
    tokenizer = load_backbone(TINY).processor.tokenizer
    ids = answer_token_ids(tokenizer)
    assert set(ids) >= {tokenizer.convert_tokens_to_ids(w) for w in ("real", "fake", "yes", "no", "natural")}
    assert record["trainable"]["by_part"]["answer_tokens"] == len(ids) * 128
    model = load_model(record["out"]).model
    before = load_backbone(TINY).model.get_input_embeddings().weight
    after = model.get_input_embeddings().weight
    changed = (before != after).any(dim=1).nonzero().flatten().tolist()
    assert changed == ids
    assert model.lm_head.weight.data_ptr() == after.data_ptr()  # still tied


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    settings = dict(max_steps=4, checkpoint_every=1, lora_dropout=0.3)  # dropout: the RNG state must be restored
    whole = train(_config("2", tmp_path / "whole", **settings), progress=False)
    stopped = train(_config("2", tmp_path / "killed", **settings), stop_after=2, progress=False)
    assert stopped["stopped_at"] == 2 and not (tmp_path / "killed" / "train.json").exists()
    resumed = train(_config("2", tmp_path / "killed", **settings), progress=False)
    assert resumed["resumed_at"] == [2] and resumed["losses"] == whole["losses"]
    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert not (tmp_path / "killed" / "checkpoint").exists()  # removed once the model is saved


def test_one_config_gives_one_set_of_weights_whatever_the_global_seed(stage1, tmp_path):
    """Each process seeds torch at random; LoRA init and dropout must follow the config's seed instead.
    Stage 2 starts from a saved folder, so nothing in loading seeds torch for it."""
    settings = dict(max_steps=2, lora_dropout=0.3, model=stage1["out"])
    torch.manual_seed(123)
    first = train(_config("2", tmp_path / "a", **settings), progress=False)
    torch.manual_seed(456)
    second = train(_config("2", tmp_path / "b", **settings), progress=False)
    assert first["losses"] == second["losses"]
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_is_reused_and_other_runs_are_refused(stage1, tmp_path):
    config = _config("1", stage1["out"])
    assert train(config, progress=False)["times_s"] == stage1["times_s"]
    with pytest.raises(ConfigError, match="another config"):
        train(_config("1", stage1["out"], seed=1), progress=False)
    (tmp_path / "stuff.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a training run folder"):
        train(_config("1", tmp_path), progress=False)


def test_stage_without_rows_is_a_one_line_error(tmp_path, manifest):
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    reals = [r | {"images": [str(manifest.parent / r["images"][0])]} for r in rows if r["label"] == "real"]
    only_reals = tmp_path / "reals.jsonl"
    only_reals.write_text("".join(json.dumps(r) + "\n" for r in reals))
    with pytest.raises(BadInputError, match="no training rows for stage naive") as err:
        training_examples(TrainConfig(stage="naive"), [only_reals])
    assert "\n" not in str(err.value)
