"""Notebooks 02 (choose the injection depth for a new backbone) and 03 (Deep-VRM gating, stream ablation,
forgetting) run end to end on the embedded default, in their test budget (``DEEPVRM_NOTEBOOK_BUDGET=test``:
every step and every figure, tiny training budgets). They check code paths and invariants, never findings.

Both build on the session's embedded default (forensic-mini and the pretrained mini-VL, cached); what they
train goes to the shared cache too, so a second run reuses it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(name: str, out: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Execute a notebook in the test budget with outputs to ``out``; return the text it printed."""
    monkeypatch.setenv("DEEPVRM_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("DEEPVRM_NOTEBOOK_BUDGET", "test")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    texts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if output.get("name") == "stdout":
                texts.append(output.get("text", ""))
    return "\n".join(texts)


def _figure(path: Path) -> None:
    for ext in ("png", "pdf", "csv"):
        assert path.with_suffix(f".{ext}").stat().st_size > 0, path.with_suffix(f".{ext}")


def test_notebook_02_recommends_a_depth_for_a_new_backbone_and_sweeps_it(
    embedded_default, tmp_path, monkeypatch
):
    text = run_notebook("02_choose_injection_depth.ipynb", tmp_path, monkeypatch)
    assert "budget: test" in text and "NOT results" in text
    match = re.search(r"recommended K = (\d+) of (\d+)", text)
    assert match, text
    k, layers = int(match[1]), int(match[2])
    assert layers == 6 and 1 <= k <= layers - 1
    # the adapter contract holds at every K: a zero-gate fusion is the backbone, and h is layer K's output
    assert f"equals the backbone at every K = 1..{layers - 1}: True" in text
    _figure(tmp_path / "emergence")
    _figure(tmp_path / "sweep" / "depth")
    runs = pd.read_csv(tmp_path / "sweep" / "ablate.csv")
    depth = runs[runs.group == "depth"]
    assert k in set(depth.value.astype(int)) and 1 in set(depth.value.astype(int))
    assert set(depth.status) <= {"trained", "reused"} and (depth.steps == 2).all()
    assert depth.auc.between(0, 1).all() and depth.semantic_acc.between(0, 1).all()
    assert (runs.group == "reference").sum() == 1  # the base backbone on the same evaluation sample
    assert json.loads((tmp_path / "sweep" / "ablate.json").read_text())["recommended"] == k


def test_notebook_03_reads_gates_ablates_the_stream_and_the_forgetting_table(
    embedded_default, tmp_path, monkeypatch
):
    text = run_notebook("03_deepvrm_gating_and_ablation.ipynb", tmp_path, monkeypatch)
    assert "budget: test" in text and "NOT results" in text
    # the forgetting table: one row per model, detection joined from the evaluations of the same weights
    table2 = pd.read_csv(tmp_path / "forgetting" / "table2.csv").set_index("role")
    assert {"base", "naive", "deepvrm", "deepvrm_start"} <= set(table2.index)
    assert table2.loc[["base", "naive", "deepvrm"], "qa_all"].between(0, 1).all()
    assert table2.loc[["base", "naive", "deepvrm"], "detection_auc"].between(0, 1).all()
    frozen = json.loads((tmp_path / "forgetting" / "forgetting.json").read_text())["frozen_check"]
    assert frozen["applicable"] and frozen["zero_drift"], frozen  # layers 0..K did not move in stage 2
    assert "equal its start's exactly: True" in text
    _figure(tmp_path / "forgetting" / "forgetting")
    # the stream ablation: every condition measured, the verdict given
    gating = json.loads((tmp_path / "gating" / "gating.json").read_text())
    assert gating["verdict"]["outcome"] in {"holds", "partly", "does not hold", "undetermined"}
    assert gating["injection_layer"] == 7 and gating["fusion"] == "average"
    margins = pd.read_csv(tmp_path / "gating" / "margins.csv")
    assert {"margin_fused", "margin_removed", "margin_shuffled", "margin_partner"} <= set(margins.columns)
    for stem in ("reliance", "auc", "attention", "stream", "footprint"):
        _figure(tmp_path / "gating" / stem)
    # the gated variant: a scalar gate that started at 0 and was trained
    gate = json.loads((tmp_path / "gating-gated" / "gating.json").read_text())["stream"]["gate"]
    assert gate["kind"] == "scalar" and gate["n"] == 1 and gate["mean"] != 0
    _figure(tmp_path / "gating-gated" / "stream")
    assert re.search(r"moved its gate from 0 to g = -?\d", text), text
