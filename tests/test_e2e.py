"""End to end on the embedded default: the README's main job (``analysis.py all``) and notebook 01.

These build forensic-mini, pretrain mini-VL, capture and probe it, all into the shared cache, so the first
test of a fresh run takes minutes and every later one reuses the artifacts (a second run is warm).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

import analysis

pytestmark = pytest.mark.slow
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="session")
def main_job(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("embedded")
    assert analysis.main(["all", "--out", str(out)]) == 0
    return out, json.loads((out / "all.json").read_text())


def test_main_job_prints_a_recommended_layer_with_its_evidence(main_job, capsys):
    out, summary = main_job
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["num_layers"] == 12 and 1 <= rec["layer"] <= 11
    assert rec["criterion"] and set(rec["per_task"]) | set(rec["excluded"]) == {"semantic", "d1"}
    curves = pd.DataFrame(rec["curves"])
    assert {"semantic", "scene", "d1", "d2"} <= set(curves.task)
    assert (curves.lo <= curves.estimate + 1e-9).all() and (curves.estimate <= curves.hi + 1e-9).all()
    assert sorted(curves.layer.unique()) == list(range(13))  # layer 0 (merger output) and 12 layer outputs
    for stem in ("emergence", "generators"):
        for ext in ("png", "pdf", "csv"):
            assert (out / f"{stem}.{ext}").stat().st_size > 0
    provenance = rec["provenance"]["model"]
    assert provenance["dtype"] == "float32" and provenance["attn_implementation"]


def test_the_backbone_carries_semantics_the_random_twin_lacks(main_job):
    """The trained decoder's best semantic probe beats the same architecture with random weights, and the
    pretrained model clears the bar against its two baselines."""
    out, summary = main_job
    backbone = summary["backbone"]
    assert backbone["bar"]["passes"], backbone["bar"]
    trained = pd.read_csv(out / "tables" / "curves.csv")
    random = pd.read_csv(out / "tables-random-weights" / "curves.csv")
    pick = lambda t: t[(t.task == "semantic") & (t.metric == "accuracy")]  # noqa: E731
    assert pick(trained).estimate.max() > pick(random).hi.max()


def test_confound_probe_sits_at_chance_on_forensic_mini(main_job):
    out, _ = main_job
    confound = json.loads((out / "tables" / "layerwise.json").read_text())["confound"]
    assert "warning" not in confound, confound


def test_a_second_run_reuses_everything(main_job, tmp_path):
    out, first = main_job
    assert analysis.main(["all", "--out", str(out)]) == 0
    again = json.loads((out / "all.json").read_text())
    assert again["data"]["path"] == first["data"]["path"] and again["backbone"]["path"] == first["backbone"]["path"]
    assert again["recommend_depth"]["layer"] == first["recommend_depth"]["layer"]
    assert again["recommend_depth"]["probe_provenance"] == first["recommend_depth"]["probe_provenance"]


def run_notebook(name: str, out: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    os.environ["DEEPVRM_NOTEBOOK_OUT"] = str(out)
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def test_notebook_01_walks_through_the_main_job(main_job, tmp_path):
    out, summary = main_job
    nb = run_notebook("01_layerwise_probing.ipynb", tmp_path)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert f"recommended K = {summary['recommend_depth']['layer']} of 12" in text
    assert (tmp_path / "emergence.png").is_file() and (tmp_path / "generators.png").is_file()
