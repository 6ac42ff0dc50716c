"""The embedded-default recipe and the ``deepvrm`` command: recipe configs, the command line, the comparison
table on made-up eval summaries; one slow end-to-end run on the small preset with two steps per stage."""

from __future__ import annotations

import csv
import io
import json

import pytest

import analysis
from injection import cli, recipes
from injection.train import TrainConfig, run_folder
from probes.errors import ConfigError

# --- the recipe ------------------------------------------------------------------------------------


def test_recipe_gives_the_three_runs_chained_in_their_folders(tmp_path):
    configs = recipes.embedded_default(tmp_path / "cmp")
    assert set(configs) == {"1", "2", "naive"}
    assert configs["1"].model == configs["naive"].model == recipes.EMBEDDED_MODEL
    assert configs["2"].model == str(tmp_path / "cmp" / "stage1")
    for stage, config in configs.items():
        assert config.stage == stage
        assert run_folder(config) == tmp_path / "cmp" / recipes.RUN_NAMES[stage]
        assert TrainConfig.from_dict(config.to_dict()) == config  # valid and JSON-able


def test_recipe_keeps_the_papers_settings_except_its_documented_overrides(tmp_path):
    configs = recipes.embedded_default(tmp_path)
    run_only = {"stage", "model", "out", "notes", "preset", "device", "dtype", "attn"}
    for stage, config in configs.items():
        paper = TrainConfig(stage=stage)
        changed = {k for k, v in config.to_dict().items() if v != paper.to_dict()[k]} - run_only
        assert changed == set(recipes.EMBEDDED_DEFAULT[stage]), stage
        for key, override in recipes.EMBEDDED_DEFAULT[stage].items():
            assert getattr(config, key) == override.value
            assert override.why and key in config.notes
    described = recipes.overrides()
    assert described["2"]["merger_lr"]["paper"] == 1e-6
    assert json.loads(json.dumps(described)) == described


def test_recipe_run_overrides_apply_to_every_run_and_are_noted(tmp_path):
    configs = recipes.embedded_default(tmp_path, preset="small", extra={"max_steps": 2, "batch_size": 2})
    assert all(c.max_steps == 2 and c.batch_size == 2 and c.preset == "small" for c in configs.values())
    assert all("max_steps" in c.notes for c in configs.values())
    assert configs["1"].hash() != recipes.embedded_default(tmp_path)["1"].hash()


@pytest.mark.parametrize("extra", [{"no_such_setting": 1}, {"stage": "2"}, {"out": "x"}])
def test_recipe_refuses_unknown_or_structural_overrides(tmp_path, extra):
    with pytest.raises(ConfigError):
        recipes.embedded_default(tmp_path, extra=extra)


# --- the command line ------------------------------------------------------------------------------


def test_deepvrm_command_parses_with_its_options():
    args = analysis.parser().parse_args(
        ["deepvrm", "--preset", "small", "--device", "cpu", "--dtype", "float32", "--quiet", "--out", "x",
         "--set", "max_steps=2", "--set", "lr=1e-3", "--set", "answer_tokens=true"])
    assert args.run is cli.run_deepvrm
    assert (args.preset, args.device, args.dtype, args.quiet, args.out) == ("small", "cpu", "float32", True, "x")
    assert cli.parse_overrides(args.overrides) == {"max_steps": 2, "lr": 1e-3, "answer_tokens": True}
    defaults = analysis.parser().parse_args(["deepvrm"])
    assert (defaults.preset, defaults.device, defaults.dtype, defaults.quiet, defaults.out) == (
        "default", "cpu", "float32", False, None)


def test_existing_commands_are_kept():
    assert {"params", "train", "eval", "deepvrm"} <= set(cli.COMMANDS)


def test_bad_override_is_a_one_line_error(capsys):
    assert analysis.main(["deepvrm", "--set", "max_steps"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


# --- the comparison table --------------------------------------------------------------------------


def _metrics(acc, auc, **extra):
    return {"n": 10, "accuracy": acc, "real_accuracy": acc, "fake_accuracy": acc, "unparsed": 0, "ap": auc,
            "auc": auc, **extra}


def _eval(auc: float, semantic: float | None, generators=("cugan", "paste")) -> dict:
    result = {"rows": 10, **_metrics(0.5, auc),
              "by_generator": {g: _metrics(0.5, auc + i / 100) for i, g in enumerate(generators)}
              | {"real": _metrics(0.5, None)},
              "by_cue": {"semantic": _metrics(0.4, auc), "trace": _metrics(0.6, auc), "real": _metrics(0.5, None)}}
    if semantic is not None:
        result["semantic"] = {"n": 4, "accuracy": semantic, "closed_set_accuracy": semantic + 0.1}
    return {"model": "m", "datasets": {"forensic-mini-x": result}}


def test_comparison_table_has_a_row_per_model_and_every_group_column():
    evals = {"base": _eval(0.5, 0.4), "naive": _eval(0.6, 0.0, generators=("cugan",)), "deep-vrm": _eval(0.7, 0.4)}
    columns, rows = cli.comparison_table(evals)
    assert [r["model"] for r in rows] == ["base", "naive", "deep-vrm"]
    assert columns[:6] == ["accuracy", "real_accuracy", "fake_accuracy", "unparsed", "ap", "auc"]
    for group in ("generator=cugan", "generator=paste", "cue=semantic", "cue=trace"):
        assert [f"{group}:{m}" for m in ("accuracy", "ap", "auc")] == [c for c in columns if c.startswith(group + ":")]
    assert not any("=real:" in c for c in columns)
    assert columns[-2:] == ["semantic_accuracy", "semantic_closed_set_accuracy"]
    by_model = {r["model"]: r for r in rows}
    assert by_model["deep-vrm"]["auc"] == 0.7
    assert by_model["deep-vrm"]["generator=paste:auc"] == pytest.approx(0.71)
    assert by_model["naive"]["generator=paste:auc"] is None  # a group a model lacks
    assert by_model["naive"]["semantic_accuracy"] == 0.0
    assert all(set(columns) <= set(r) for r in rows)


def test_table_csv_and_printed_table():
    columns, rows = cli.comparison_table({"base": _eval(0.51234567, None), "deep-vrm": _eval(0.7, 0.4)})
    parsed = list(csv.DictReader(io.StringIO(cli.table_csv(columns, rows))))
    assert [r["model"] for r in parsed] == ["base", "deep-vrm"]
    assert parsed[0]["auc"] == "0.5123" and parsed[0]["semantic_accuracy"] == ""
    text = cli.format_table(columns, rows)
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "base", "deep-vrm"]
    assert any(line.split()[0] == "generator=cugan:auc" for line in lines)
    assert not any(line.split()[0].endswith(":ap") for line in lines)  # groups: AUC only when printed


def test_table_refuses_an_eval_of_several_data_sets():
    summary = _eval(0.5, 0.4)
    summary["datasets"]["other"] = summary["datasets"]["forensic-mini-x"]
    with pytest.raises(Exception, match="one data set"):
        cli.comparison_table({"base": summary})


# --- end to end (slow) -----------------------------------------------------------------------------


@pytest.mark.slow
def test_deepvrm_command_runs_end_to_end_and_is_reused(embedded_default, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["deepvrm", "--preset", "small", "--quiet", "--out", str(out),
            "--set", "max_steps=2", "--set", "batch_size=2", "--set", "max_semantic=4"]
    assert analysis.main(argv) == 0
    first = capsys.readouterr().out
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison["table"]) == {"base", "naive", "deep-vrm"}
    assert set(comparison["times_s"]) == {"eval base", "train naive", "eval naive", "train stage 1",
                                          "train stage 2", "eval deep-vrm"}
    assert not any(step["reused"] for step in comparison["times_s"].values())
    assert comparison["recipe"]["run_overrides"] == {"max_steps": 2, "batch_size": 2, "max_semantic": 4}
    for name in ("stage1", "stage2", "naive"):
        record = json.loads((out / name / "train.json").read_text())
        assert record["steps"] == 2 and "recipe" in record["config"]["notes"]
    assert json.loads((out / "stage2" / "config.json").read_text())["deep_vrm"]
    rows = list(csv.DictReader(io.StringIO((out / "comparison.csv").read_text())))
    assert [r["model"] for r in rows] == ["base", "naive", "deep-vrm"]
    assert "semantic_accuracy" in first and "generator=" in first
    # a second run reuses every step
    assert analysis.main(argv) == 0
    again = json.loads((out / "comparison.json").read_text())
    assert again["table"] == comparison["table"]
    assert all(step["reused"] and step["wall_s"] < 5 for step in again["times_s"].values())
    assert again["times_s"]["train stage 2"]["recorded_times_s"] == comparison["times_s"]["train stage 2"]["recorded_times_s"]
