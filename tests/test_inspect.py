"""Inspection of Deep-VRM models (injection.inspect): debiased CKA, the frozen prefix, probe transfer, the stream
switches of the gating analysis, ablation planning, and the ``inspect`` command end to end. Tiny random
Qwen2.5-VL + forensic-mini's small preset: code paths only, never findings."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from injection import DeepVRMForConditionalGeneration
from injection.inspect import cka
from injection.inspect.ablate import AblateConfig, early_layers_trainable, plan, train_config
from injection.inspect.forgetting import ForgettingConfig, probe_transfer
from injection.inspect.gating import (
    AttentionToImage,
    GatingConfig,
    answer_token_ids,
    margins,
    measure,
    partner_map,
    replacement_stream,
    select_rows,
    shuffle_map,
    verdict,
)
from injection.train import TrainConfig, default_injection_layer, train
from probes.backbones import load_backbone, wrap
from probes.data import ForensicMiniConfig, build_forensic_mini, read_manifest
from probes.errors import ConfigError

TINY = "tiny-qwen2.5-vl"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch and one BLAS thread: on a shared two-core machine more threads are many times slower."""
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1, user_api="blas"):
        yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Runs, stores and inspect results go to a temporary cache; the data sets are the shared ones."""
    shared = Path(os.environ["DEEPVRM_LENS_CACHE"])
    build_forensic_mini(ForensicMiniConfig.preset("small"))  # in the shared cache, once
    cache = tmp_path_factory.mktemp("cache")
    (cache / "data").symlink_to(shared / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPVRM_LENS_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def data_dir(private_cache):
    return build_forensic_mini(ForensicMiniConfig.preset("small")).path


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """A naive run and a stage-2 run (from the tiny backbone) of two optimizer steps each."""
    root = tmp_path_factory.mktemp("runs")

    def config(stage: str, **kw) -> TrainConfig:
        return TrainConfig(stage=stage, model=TINY, preset="small", max_steps=2, batch_size=2,
                           out=str(root / stage), **kw)

    return {"naive": train(config("naive"), progress=False)["out"],
            "deepvrm": train(config("2", lr=1e-2), progress=False)["out"]}


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(TINY, attn_implementation="eager")


def _deep_vrm(tiny, **settings):
    model = DeepVRMForConditionalGeneration.from_backbone(tiny.model, **{"injection_layer": 2, **settings})
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a low-level encoder unlike the main one, as after training
        for p in model.low_level_encoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=noise))
    return wrap(model.eval(), tiny.processor, source="tiny+deep-vrm", settings=tiny.settings)


@pytest.fixture(scope="module")
def rows(data_dir):
    records = read_manifest(data_dir / "manifest.jsonl")
    return select_rows(records, "test")


def _kornblith(x: np.ndarray, y: np.ndarray) -> float:
    """Reference debiased CKA from n x n Gram matrices (Kornblith et al.'s unbiased centring)."""

    def center(g):
        n = len(g)
        g = g.copy()
        np.fill_diagonal(g, 0)
        means = g.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        g -= means[:, None] + means[None, :]
        np.fill_diagonal(g, 0)
        return g

    a, b = center(x @ x.T), center(y @ y.T)
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


# --- CKA ---------------------------------------------------------------------------------------------


def test_cka_of_identical_representations_is_one():
    x = np.random.default_rng(0).normal(size=(30, 4, 16))
    assert cka.debiased_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3, 12))
    z = x[..., :8] @ rng.normal(size=(8, 10)) + rng.normal(size=(40, 3, 10))
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    y = 2.5 * x @ q
    assert cka.debiased_cka(x, y) == pytest.approx(1.0, abs=1e-10)
    assert cka.debiased_cka(y, z) == pytest.approx(cka.debiased_cka(x, z), abs=1e-10)
    assert cka.debiased_cka(z, 0.1 * y) == pytest.approx(cka.debiased_cka(z, x), abs=1e-10)


def test_debiased_cka_is_near_zero_for_independent_features_where_plain_cka_is_not():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(2000, 64)), rng.normal(size=(2000, 64))
    assert abs(cka.debiased_cka(x, y)) < 0.01
    xc, yc = x - x.mean(0), y - y.mean(0)
    plain = np.linalg.norm(xc.T @ yc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert plain > 0.02  # the biased estimator's floor at this n and width


def test_cka_matches_the_gram_matrix_reference():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, 5, 7))
    y = x[..., :6] @ rng.normal(size=(6, 9)) + rng.normal(size=(12, 5, 9))
    assert cka.debiased_cka(x, y) == pytest.approx(_kornblith(x.reshape(60, 7), y.reshape(60, 9)), abs=1e-12)


def test_a_bootstrap_draw_is_the_replicated_rows_with_copies_as_the_diagonal():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(8, 3, 5))
    y = x @ rng.normal(size=(5, 4)) + rng.normal(size=(8, 3, 4))
    w = np.array([2, 0, 1, 3, 1, 0, 1, 2])
    origin = [(m, t) for m in range(8) for _ in range(w[m]) for t in range(3)]
    xr = np.array([x[m, t] for m, t in origin])
    yr = np.array([y[m, t] for m, t in origin])
    same = np.array([[a == b for b in origin] for a in origin])

    def hsic(a, b):
        a, b = np.where(same, 0, a), np.where(same, 0, b)
        n = len(a)
        return (a * b).sum() + a.sum() * b.sum() / ((n - 1) * (n - 2)) - 2 * (a.sum(1) * b.sum(1)).sum() / (n - 2)

    gx, gy = xr @ xr.T, yr @ yr.T
    expected = hsic(gx, gy) / np.sqrt(hsic(gx, gx) * hsic(gy, gy))
    assert cka.debiased_cka(x, y, w[None])[0] == pytest.approx(expected, abs=1e-12)
    assert cka.debiased_cka(x, y, np.ones((1, 8)))[0] == pytest.approx(cka.debiased_cka(x, y), abs=1e-12)


def test_layer_cka_gives_a_ci_per_layer():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(40, 3, 4, 8))
    y = x.copy()
    y[:, 2] = rng.normal(size=(40, 4, 8))
    table = cka.layer_cka(x, y, n_boot=200, layers=[0, 1, 7])
    assert list(table.layer) == [0, 1, 7] and (table.n_boot == 200).all()
    assert table.estimate[:2].tolist() == pytest.approx([1.0, 1.0])
    assert abs(table.estimate[2]) < 0.1 and table.lo[2] <= table.estimate[2] <= table.hi[2]
    moved = cka.drift(x, y)
    assert moved.max_abs[:2].tolist() == [0.0, 0.0] and moved.relative[2] > 0.5


# --- forgetting ------------------------------------------------------------------------------------


def test_layers_up_to_k_do_not_drift_after_stage2_training(runs, rows, data_dir):
    """Deep-VRM's frozen prefix: indices 0..K (K read before the fusion) equal its start's bit for bit."""
    from injection.train import load_model
    from probes.cache import ActivationStore
    from probes.capture import capture

    subset = rows[:6]
    stores = {}
    for name, source in (("start", TINY), ("deepvrm", runs["deepvrm"])):
        adapter = load_model(source)
        report = capture(adapter, subset, data_dir, positions=["image_mean"], per_token=True, batch_size=3,
                         store_dtype="float32", progress=False)
        stores[name] = ActivationStore.open(report.store).load("image_tokens")[1]
    k = load_model(runs["deepvrm"]).model.injection_layer
    assert k == default_injection_layer(8)
    moved = cka.drift(stores["start"], stores["deepvrm"])
    assert (moved.max_abs[: k + 1] == 0).all()
    assert (moved.max_abs[k + 1 :] > 0).all()  # trained layers after the fusion did move


def test_frozen_check_separates_trained_answer_embeddings_from_the_layers(data_dir, tmp_path):
    """With answer_tokens, the word "image" of the analysis prompt has a trained embedding row: the layers < K
    are still frozen (exact on the bare prompt), and the check says why the prompt's activations moved."""
    from injection.inspect.forgetting import run_forgetting

    run = train(TrainConfig(stage="2", model=TINY, preset="small", max_steps=2, batch_size=2, lr=1e-2,
                            answer_tokens=True, out=str(tmp_path / "tokens")), progress=False)["out"]
    config = ForgettingConfig(positions=("image_mean",), cka_images=8, qa_max_rows=4, n_boot=20, n_folds=2,
                              inner_folds=2)
    check = run_forgetting({"base": TINY, "deepvrm": run}, str(data_dir), config, progress=False)["frozen_check"]
    assert check["zero_drift"] is True and check["max_abs_drift"] == 0.0 and check["reference"] == "base"
    prompt = check["with_capture_prompt"]
    assert prompt["max_abs_drift"] > 0 and prompt["changed_prompt_embeddings"] == ["image#10"]


def test_probe_transfer_scores_the_base_probe_on_other_models():
    rng = np.random.default_rng(6)
    n = 60
    y = np.repeat([0, 1], n // 2)
    groups = np.arange(n) // 2
    base = rng.normal(size=(n, 2, 6)).astype(np.float32)
    base[:, 1, 0] += 3.0 * y  # layer 1 carries the label
    X = {"base": base, "copy": base.copy(), "noise": rng.normal(size=(n, 2, 6)).astype(np.float32)}
    config = ForgettingConfig(seeds=(0,), n_folds=3, inner_folds=2, Cs=(0.1, 1.0))
    own, transfer = probe_transfer(X, y, groups, config)
    assert set(own) == set(transfer) == {"base", "copy", "noise"}
    assert transfer["base"].shape == own["base"].scores.shape == (1, 2, n)
    assert np.isfinite(transfer["base"]).all()
    np.testing.assert_array_equal(transfer["copy"], transfer["base"])
    acc = {role: ((s[0, 1] > 0.5) == y).mean() for role, s in transfer.items()}
    assert acc["base"] > 0.9 and acc["noise"] < 0.8


# --- gating ----------------------------------------------------------------------------------------


def test_partners_and_donors(rows):
    partners = partner_map(rows)
    by_id = {r.id: r for r in rows}
    assert partners
    for a, b in partners.items():
        assert by_id[a].scene_id == by_id[b].scene_id and {by_id[a].label, by_id[b].label} == {"real", "fake"}
        assert (by_id[b].post or "none") == "none" or by_id[b].label == "fake"
    clean = {r.scene_id for r in rows if r.label == "real" and (r.post or "none") == "none"}
    fakes = [r for r in rows if r.label == "fake"]
    assert all((r.id in partners) == (r.scene_id in clean) for r in fakes)  # all but unconditional generators
    donors = shuffle_map(rows, seed=0)
    assert donors == shuffle_map(rows, seed=0) and set(donors) == {r.id for r in rows}
    assert all(by_id[d].scene_id != by_id[i].scene_id for i, d in donors.items())


def test_replacement_stream_wiring():
    features = {"a": torch.zeros(2, 3), "b": torch.ones(2, 3), "c": torch.full((2, 3), 2.0), "d": torch.ones(4, 3)}
    stream, replaced = replacement_stream(["a", "b", "c"], {"a": "c", "b": "d"}, features)
    assert replaced.tolist() == [True, False, False]  # b's donor has another token count; c has none
    torch.testing.assert_close(stream, torch.cat([features["c"], features["b"], features["c"]]))


@pytest.fixture(scope="module")
def average(tiny, rows, data_dir):
    adapter = _deep_vrm(tiny)
    return adapter, measure(adapter, rows, data_dir, GatingConfig(batch_size=8), progress=False)


def _plain_margins(adapter, rows, data_dir, off: bool = False) -> np.ndarray:
    from injection.train import load_image

    out = []
    with torch.no_grad():
        for start in range(0, len(rows), 8):
            part = rows[start : start + 8]
            prompts = [r.prompt for r in part]
            inputs = adapter.build_inputs([load_image(str(r.image_path(data_dir))) for r in part], prompts)
            fake, real = answer_token_ids(adapter.processor.tokenizer, prompts)
            if off:
                with adapter.model.fusion_off():
                    logits = adapter.model(**inputs, use_cache=False).logits
            else:
                logits = adapter.model(**inputs, use_cache=False).logits
            out.append(margins(logits, fake, real))
    return np.concatenate(out)


def test_removing_the_stream_is_the_fusion_off_forward_and_the_base_model(average, tiny, rows, data_dir):
    adapter, tables = average
    table = tables["margins"]
    assert list(table.id) == [r.id for r in rows]
    np.testing.assert_allclose(table.margin_removed, _plain_margins(adapter, rows, data_dir, off=True), atol=1e-5)
    np.testing.assert_allclose(table.margin_removed, _plain_margins(tiny, rows, data_dir), atol=1e-5)
    np.testing.assert_allclose(table.margin_fused, _plain_margins(adapter, rows, data_dir), atol=1e-5)
    assert (table.margin_fused - table.margin_removed).abs().min() > 0  # the fusion changed every answer


def test_a_zero_gate_leaves_every_condition_at_the_fused_margin(tiny, rows, data_dir):
    adapter = _deep_vrm(tiny, fusion="gated")  # g = 0: the stream exists but adds nothing
    table = measure(adapter, rows[:8], data_dir, GatingConfig(batch_size=4, attention=False), progress=False)["margins"]
    for condition in ("removed", "shuffled", "partner"):
        values = table[f"margin_{condition}"]
        np.testing.assert_array_equal(values[values.notna()], table.margin_fused[values.notna()])
    assert (table.ratio_mean == 0).all()


def test_shuffled_and_partner_streams_reach_the_fusion(average, rows, data_dir):
    adapter, tables = average
    table = tables["margins"].set_index("id")
    has = table.partner.notna()
    assert table.margin_partner[has].notna().all() and table.margin_partner[~has].isna().all()
    assert (table.margin_partner[has] != table.margin_fused[has]).all()
    assert table.margin_shuffled.notna().all() and (table.margin_shuffled != table.margin_fused).all()
    # the rows a partner swap feeds the fusion are the partner's own stream
    from injection.train import load_image

    model = adapter.model
    pair = [r for r in rows if table.partner[r.id] is not None and isinstance(table.partner[r.id], str)][:2]
    donors = {r.id: table.partner[r.id] for r in pair}
    by_id = {r.id: r for r in rows}
    features = {}
    with torch.no_grad():
        for r in pair + [by_id[d] for d in donors.values()]:
            inputs = adapter.build_inputs([load_image(str(r.image_path(data_dir)))], [r.prompt])
            features[r.id] = model.low_level_features(inputs["pixel_values"], inputs["image_grid_thw"])
        stream, replaced = replacement_stream([r.id for r in pair], donors, features)
        inputs = adapter.build_inputs([load_image(str(r.image_path(data_dir))) for r in pair], [r.prompt for r in pair])
        with model.low_level_override(stream), model.record_fusion() as records:
            logits = model(**inputs, use_cache=False).logits
    fake, real = answer_token_ids(adapter.processor.tokenizer, [r.prompt for r in pair])
    swapped = margins(logits, fake, real)
    assert replaced.all()
    torch.testing.assert_close(records[0].stream, torch.cat([features[donors[r.id]] for r in pair]))
    np.testing.assert_allclose(swapped, table.margin_partner[[r.id for r in pair]].to_numpy(), atol=1e-4)


def test_gate_values_and_ratios_for_gated_fusion(tiny, rows, data_dir):
    adapter = _deep_vrm(tiny, fusion="gated", gate="token")
    with torch.no_grad():
        adapter.model.fusion.mlp[2].bias.fill_(0.5)
    tables = measure(adapter, rows[:4], data_dir, GatingConfig(batch_size=4, conditions=("removed",)),
                     progress=False)
    tokens = tables["tokens"]
    assert len(tokens) == 4 * 16 and tokens.gate.notna().all()
    assert tokens.gate.to_numpy() == pytest.approx(0.5)  # the MLP's zero output layer leaves its bias
    assert (tokens.ratio > 0).all() and tables["gate"].empty
    scalar = _deep_vrm(tiny, fusion="gated", gate="scalar")
    with torch.no_grad():
        scalar.model.fusion.gate.fill_(0.25)
    tables = measure(scalar, rows[:4], data_dir, GatingConfig(batch_size=4, conditions=()), progress=False)
    assert tables["gate"].gate.tolist() == [0.25] and tables["tokens"].gate.isna().all()
    with torch.no_grad(), scalar.model.record_fusion() as records:
        from injection.train import load_image

        r = rows[0]
        scalar.model(**scalar.build_inputs([load_image(str(r.image_path(data_dir)))], [r.prompt]), use_cache=False)
    first = tables["tokens"][tables["tokens"].id == r.id].ratio.to_numpy()
    expected = (0.25 * records[0].stream).norm(dim=-1) / records[0].hidden.norm(dim=-1)
    np.testing.assert_allclose(first, expected.numpy(), rtol=1e-5)


def test_attention_mass_to_image_tokens_is_a_share_and_unchanged_before_k(average):
    adapter, tables = average
    attn = tables["attention"]
    k = adapter.model.injection_layer
    assert set(attn.condition) == {"fused", "removed"} and sorted(set(attn.layer)) == list(range(1, 9))
    assert ((attn.mass >= 0) & (attn.mass <= 1 + 1e-6)).all()
    wide = attn.pivot_table(index=["id", "layer"], columns="condition", values="mass").reset_index()
    before = wide[wide.layer <= k]
    np.testing.assert_allclose(before.fused, before.removed, atol=1e-6)
    assert (wide[wide.layer > k].fused - wide[wide.layer > k].removed).abs().max() > 0
    foot = tables["footprint"]
    assert (foot[foot.layer < k].relative == 0).all() and (foot[foot.layer > k].relative > 0).all()


def test_attention_needs_eager_weights(rows, data_dir):
    sdpa = load_backbone(TINY)
    adapter = _deep_vrm(sdpa)
    with pytest.raises(ConfigError, match="eager"):
        measure(adapter, rows[:2], data_dir, GatingConfig(batch_size=2, attn="eager"), progress=False)
    assert isinstance(AttentionToImage(adapter).modules[0], torch.nn.Module)


def test_verdict_reads_the_two_paths():
    rng = np.random.default_rng(7)

    def table(trace_drop: float, semantic_drop: float) -> pd.DataFrame:
        rows = []
        for group, drop, n in (("trace", trace_drop, 30), ("semantic", semantic_drop, 30), ("real", 0.0, 60)):
            fake = group != "real"
            fused = rng.normal(2.0 if fake else -2.0, 0.3, n)
            sign = 1.0 if fake else -1.0
            rows.append(pd.DataFrame({"label": "fake" if fake else "real", "group": group, "margin_fused": fused,
                                      "margin_removed": fused - sign * drop,
                                      "margin_partner": fused - sign * drop if group == "trace" else fused}))
        return pd.concat(rows, ignore_index=True)

    from injection.inspect.gating import auc_table

    config = GatingConfig(n_boot=200)
    data = table(1.0, 0.0).assign(generator="g")
    good = verdict(data, auc_table(data, ("removed", "partner"), config), config)
    assert good["outcome"] == "holds" and all(c["holds"] for c in good["criteria"].values())
    data = table(0.0, 1.0).assign(generator="g")
    bad = verdict(data, auc_table(data, ("removed", "partner"), config), config)
    assert not bad["criteria"]["A"]["holds"] and not bad["criteria"]["B"]["holds"]


# --- ablations -------------------------------------------------------------------------------------


def test_plan_dedupes_the_base_run_and_changes_one_thing_per_variant():
    base = TrainConfig(stage="2", model=TINY, preset="small", max_steps=2, batch_size=2)
    config = AblateConfig(depths=(2, 5))
    specs = plan(base, config)
    names = [s.name for s in specs]
    assert names == ["K=2", "K=5", "init=copy", "init=random", "fusion=average", "fusion=add", "fusion=gated",
                     "early=frozen", "early=trainable"]
    hashes = {s.name: train_config(base, s, config).hash() for s in specs if s.start is None}
    baseline = {h for n, h in hashes.items() if n in ("K=5", "init=copy", "fusion=average", "early=frozen")}
    assert baseline == {base.hash()}  # K = 5 is the default depth of 8 layers: the base run itself
    assert len(set(hashes.values())) == len(hashes) - 3
    assert train_config(base, specs[0], config).injection_layer == 2
    assert "early layers trainable" in train_config(base, specs[-1], config).notes
    with pytest.raises(ConfigError, match="stage 2"):
        plan(TrainConfig(stage="1"), config)


def test_early_layers_trainable_puts_lora_on_every_decoder_layer(tiny):
    from injection import peft_targets
    from injection.peft_targets import lora_config

    original = peft_targets.llm_linear_names

    model = _deep_vrm(tiny, injection_layer=5).model

    def layers(config):
        return {int(t.split("layers.")[1].split(".")[0]) for t in config.target_modules if "layers." in t}

    assert layers(lora_config(model, 2)) == {5, 6, 7}
    with early_layers_trainable():
        assert layers(lora_config(model, 2)) == set(range(8))
    assert layers(lora_config(model, 2)) == {5, 6, 7}
    assert peft_targets.llm_linear_names is original


# --- the command -----------------------------------------------------------------------------------


def _main(argv: list[str]) -> int:
    import analysis

    return analysis.main(argv)


def test_inspect_all_end_to_end(runs, data_dir, tmp_path, capsys):
    out = tmp_path / "inspect"
    common = ["--base", TINY, "--naive", runs["naive"], "--deepvrm", runs["deepvrm"], "--data", str(data_dir),
              "--out", str(out), "--n-boot", "50", "--threads", "1", "--quiet"]
    code = _main(["inspect", "all", *common, "--seeds", "0", "--positions", "image_mean", "--qa-max-rows", "8",
                  "--max-rows", "12", "--depths", "2", "5", "--variants", "early", "--eval-forensic", "12",
                  "--eval-semantic", "6", "--recommendation", "4"])
    assert code == 0, capsys.readouterr().err
    import json

    summary = json.loads(capsys.readouterr().out)
    frozen = summary["forgetting"]["frozen_check"]
    assert frozen["zero_drift"] is True and frozen["with_capture_prompt"]["max_abs_drift"] == 0.0
    assert [r["role"] for r in summary["forgetting"]["table2"]] == ["base", "naive", "deepvrm"]
    assert summary["gating"]["verdict"]["outcome"] in ("holds", "partly", "does not hold", "undetermined")
    cost = summary["ablate"]["sweep_cost"]
    assert cost["runs"] == 3 and cost["reused"] == 1 and cost["trained_now"] == 2
    for name in ("forgetting/table2.csv", "forgetting/table2.md", "forgetting/forgetting.png",
                 "forgetting/forgetting.pdf", "forgetting/cka.csv", "gating/reliance.png", "gating/margins.csv",
                 "gating/attention.png", "gating/stream.png", "ablate/depth.png", "ablate/variants.png",
                 "ablate/ablate.csv"):
        assert (out / name).is_file(), name
    table2 = pd.read_csv(out / "forgetting" / "table2.csv")
    assert {"qa_object", "qa_scene", "probe_transfer_semantic_image_mean", "cka_final"} <= set(table2.columns)
    # a second call reuses every cached result; --no-train lists the runs it would need
    assert _main(["inspect", "gating", *common, "--max-rows", "12"]) == 0
    assert json.loads(capsys.readouterr().out)["reused"] is True
    assert _main(["inspect", "ablate", *common, "--depths", "3", "--variants", "--no-train", "--eval-forensic", "12",
                  "--eval-semantic", "6"]) == 0
    ablate = json.loads(capsys.readouterr().out)
    assert len(ablate["sweep_cost"]["missing"]) == 1 and ablate["sweep_cost"]["trained_now"] == 0
    assert [r["status"] for r in ablate["runs"]] == ["missing", "reference", "reference"]


def test_inspect_errors_are_one_line(capsys):
    assert _main(["inspect", "gating", "--base", TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --deepvrm") and "\n" not in err
    assert _main(["inspect", "gating", "--deepvrm", TINY, "--preset", "small", "--quiet"]) == 2
    assert "not a Deep-VRM model" in capsys.readouterr().err
