"""Figures: each written as PNG + PDF + the CSV of what was drawn, from LayerwiseResult-shaped tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from probes.plots import emergence_figure, generator_heatmap

LAYERS = 5


def curves_table(tasks, metrics=("accuracy", "roc_auc"), offset: float = 0.0) -> pd.DataFrame:
    rows = []
    for t, task in enumerate(tasks):
        for metric in metrics:
            for layer in range(LAYERS):
                est = 0.5 + 0.08 * layer + 0.01 * t + offset
                rows.append({"layer": layer, "estimate": est, "lo": est - 0.05, "hi": est + 0.05, "n_boot": 50,
                             "task": task, "metric": metric})
    return pd.DataFrame(rows)


def selectivity_table(tasks) -> pd.DataFrame:
    rows = []
    for task in tasks:
        for layer in range(LAYERS):
            value, control = 0.5 + 0.08 * layer, 0.5
            rows.append({"layer": layer, "task_value": value, "control_value": control, "estimate": value - control,
                         "lo": value - control - 0.05, "hi": value - control + 0.05, "n_boot": 50, "task": task})
    return pd.DataFrame(rows)


def check_files(written: list[str], stem: Path) -> pd.DataFrame:
    assert written == [str(stem.with_suffix(s)) for s in (".png", ".pdf", ".csv")]
    with Image.open(stem.with_suffix(".png")) as im:
        im.verify()
    with Image.open(stem.with_suffix(".png")) as im:
        assert im.format == "PNG" and min(im.size) > 100
    assert stem.with_suffix(".pdf").read_bytes().startswith(b"%PDF")
    return pd.read_csv(stem.with_suffix(".csv"))


def png_width(stem: Path) -> int:
    with Image.open(stem.with_suffix(".png")) as im:
        return im.size[0]


def test_emergence_figure_writes_png_pdf_and_the_plotted_rows(tmp_path):
    tasks = ("semantic", "d1", "d2")
    curves, sel = curves_table(tasks), selectivity_table(tasks)
    baseline = curves_table(tasks, offset=-0.1)
    stem = tmp_path / "fig" / "emergence"
    table = check_files(emergence_figure(curves, sel, stem, recommended=2, baseline=baseline, title="t"), stem)
    assert table.groupby("series").size().to_dict() == {
        "task": 3 * LAYERS, "selectivity": 3 * LAYERS, "random weights": 3 * LAYERS}
    drawn = table[table.series == "task"].sort_values(["task", "layer"]).reset_index(drop=True)
    want = curves[curves.metric == "accuracy"].sort_values(["task", "layer"]).reset_index(drop=True)
    np.testing.assert_allclose(drawn[["estimate", "lo", "hi"]], want[["estimate", "lo", "hi"]])
    assert set(drawn.metric) == {"accuracy"}
    sel_drawn = table[table.series == "selectivity"].sort_values(["task", "layer"])
    np.testing.assert_allclose(sel_drawn.control_value, 0.5)
    base_drawn = table[table.series == "random weights"].sort_values(["task", "layer"]).reset_index(drop=True)
    np.testing.assert_allclose(base_drawn.estimate, want.estimate - 0.1)


def test_emergence_figure_with_one_task_and_no_baseline(tmp_path):
    curves, sel = curves_table(("semantic", "d1", "d2")), selectivity_table(("semantic",))
    one = tmp_path / "one"
    table = check_files(emergence_figure(curves, sel, one, tasks=("semantic",)), one)
    assert set(table.task) == {"semantic"} and set(table.series) == {"task", "selectivity"}
    assert len(table) == 2 * LAYERS
    # tasks asked for but not measured are left out: one column each for those present
    three = tmp_path / "three"
    table = check_files(emergence_figure(curves, sel, three, tasks=("semantic", "scene", "d1", "d2"),
                                         recommended=1), three)
    assert set(table.task) == {"semantic", "d1", "d2"}
    assert png_width(three) > 1.3 * png_width(one)


def test_emergence_figure_without_selectivity_rows_for_a_task(tmp_path):
    stem = tmp_path / "nosel"
    table = check_files(emergence_figure(curves_table(("d1",)), selectivity_table(("semantic",)), stem,
                                         tasks=("d1",), metric="roc_auc"), stem)
    assert set(table.series) == {"task"} and set(table.metric) == {"roc_auc"} and len(table) == LAYERS


@pytest.mark.parametrize("families", [("cyclegan",), ("cugan", "cyclegan", "esrgan")])
def test_generator_heatmap_writes_png_pdf_and_its_cells(tmp_path, families):
    curves = curves_table(("semantic", *(f"gen:{f}" for f in families)))
    stem = tmp_path / "generators"
    table = check_files(generator_heatmap(curves, stem, title="t"), stem)
    assert list(table.columns) == ["generator", "layer", "metric", "estimate", "lo", "hi"]
    assert sorted(set(table.generator)) == sorted(families) and set(table.metric) == {"roc_auc"}
    assert len(table) == len(families) * LAYERS
    want = curves[(curves.task == f"gen:{families[0]}") & (curves.metric == "roc_auc")]
    got = table[table.generator == families[0]].sort_values("layer")
    np.testing.assert_allclose(got.estimate, want.sort_values("layer").estimate)
