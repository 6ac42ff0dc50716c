"""The injection-depth criterion on synthetic curves: plateau layer, max over tasks, clipping, evidence.

Layer names follow the activation store: layer 0 is the input of decoder layer 1, layer i the output of
decoder layer i, so a curve of an L-layer model has layers 0..L and K (inject after decoder layer K) is
the layer name itself, kept within 1..L-1.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from probes.depth import Recommendation, recommend
from probes.errors import BadInputError, ConfigError


def curve(task: str, values, half: float = 0.02, layers=None, metric: str | None = None) -> pd.DataFrame:
    values = np.asarray(values, dtype=float)
    out = pd.DataFrame({"task": task, "layer": list(layers if layers is not None else range(len(values))),
                        "estimate": values, "lo": values - half, "hi": values + half})
    return out if metric is None else out.assign(metric=metric)


def rising(plateau_at: int, num_layers: int, low: float = 0.5, high: float = 0.95) -> np.ndarray:
    """0..L: chance, then a ramp that reaches ``high`` at ``plateau_at`` and stays (small wiggles)."""
    x = np.arange(num_layers + 1)
    v = np.clip(low + (high - low) * x / max(plateau_at, 1), low, high)
    v[x >= plateau_at] = high - 0.01 * (x[x >= plateau_at] % 2)  # within the CI of the maximum
    return v


def selectivity(task: str, lo, layers=None) -> pd.DataFrame:
    lo = np.asarray(lo, dtype=float)
    return pd.DataFrame({"task": task, "layer": list(layers if layers is not None else range(len(lo))),
                         "estimate": lo + 0.05, "lo": lo, "hi": lo + 0.1})


@pytest.mark.parametrize("k", [2, 4, 6])
def test_the_earliest_layer_at_the_plateau_is_k(k):
    L = 8
    curves = curve("semantic", rising(k, L)).sample(frac=1, random_state=0)  # row order must not matter
    rec = recommend(curves, L, tasks=("semantic",))
    assert rec.layer == k
    assert rec.per_task["semantic"]["earliest_at_plateau"] == k
    assert rec.per_task["semantic"]["plateau"] == pytest.approx(0.95)
    assert rec.num_layers == L and rec.excluded == {}


def test_a_layer_within_the_ci_of_the_maximum_beats_the_argmax():
    values = [0.5, 0.6, 0.90, 0.91, 0.92, 0.92]
    rec = recommend(curve("semantic", values, half=0.03), 5, tasks=("semantic",))
    assert rec.per_task["semantic"]["plateau_layer"] == 4  # the argmax (first of ties)
    assert rec.layer == 2  # hi = 0.93 >= 0.92
    assert rec.per_task["semantic"]["ci_there"] == pytest.approx([0.87, 0.93])


def test_k_is_the_deepest_over_the_criterion_tasks():
    L = 10
    curves = pd.concat([curve("semantic", rising(3, L)), curve("d1", rising(7, L)), curve("d2", rising(9, L))])
    rec = recommend(curves, L)  # default tasks: semantic and D1; D2 does not count
    assert rec.layer == 7
    assert {t: v["earliest_at_plateau"] for t, v in rec.per_task.items()} == {"semantic": 3, "d1": 7}
    assert "semantic, d1" in rec.criterion and "1..L-1" in rec.criterion


@pytest.mark.parametrize(("plateau_at", "expected"), [(0, 1), (8, 7)])
def test_k_is_clipped_to_1_through_l_minus_1(plateau_at, expected):
    L = 8
    values = np.full(L + 1, 0.9) if plateau_at == 0 else np.r_[np.full(L, 0.5), 0.95]
    rec = recommend(curve("semantic", values), L, tasks=("semantic",))
    assert rec.per_task["semantic"]["earliest_at_plateau"] == plateau_at
    assert rec.layer == expected


def test_k_is_one_based_and_follows_layer_names_not_positions():
    """A 28-layer model whose store kept every 4th layer: the plateau at stored layer 16 (the output of
    decoder layer 16) gives K = 16, inject after decoder layer 16, as in the paper's Qwen2.5-VL-7B."""
    layers = list(range(0, 29, 4))  # 0, 4, ..., 28
    values = [0.5, 0.6, 0.7, 0.8, 0.95, 0.95, 0.94, 0.95]
    rec = recommend(curve("semantic", values, layers=layers), 28, tasks=("semantic",))
    assert rec.layer == 16 and rec.num_layers == 28
    # layer 0 (the input of decoder layer 1) is never K: at least decoder layer 1 stays frozen before fusion
    rec = recommend(curve("semantic", [0.9] * 8, layers=layers), 28, tasks=("semantic",))
    assert rec.per_task["semantic"]["earliest_at_plateau"] == 0 and rec.layer == 1


def test_a_task_whose_selectivity_never_clears_zero_is_excluded_and_named():
    L = 6
    curves = pd.concat([curve("semantic", rising(2, L)), curve("d1", rising(5, L))])
    sel = pd.concat([selectivity("semantic", [-0.1, 0.0, 0.2, 0.3, 0.3, 0.3, 0.3]),
                     selectivity("d1", [-0.1, -0.05, 0.0, -0.02, 0.0, -0.01, 0.0])])
    rec = recommend(curves, L, selectivity=sel)
    assert rec.layer == 2  # d1 would have given 5
    assert list(rec.per_task) == ["semantic"]
    assert "never clears 0" in rec.excluded["d1"]
    assert "(semantic)" in rec.criterion


def test_a_task_that_was_not_measured_is_named():
    rec = recommend(curve("semantic", rising(3, 6)), 6)
    assert rec.excluded == {"d1": "not measured"} and rec.layer == 3


def test_no_evidence_is_a_one_line_error():
    L = 5
    curves = pd.concat([curve("semantic", rising(2, L)), curve("d1", rising(3, L))])
    flat = pd.concat([selectivity(t, np.zeros(L + 1)) for t in ("semantic", "d1")])
    with pytest.raises(BadInputError) as err:
        recommend(curves, L, selectivity=flat)
    text = str(err.value)
    assert "\n" not in text and text.startswith("curves: no semantic curve with evidence")
    assert "semantic" in text and "d1" in text
    with pytest.raises(BadInputError, match="^curves: "):
        recommend(curve("scene", rising(2, L)), L)  # none of the criterion tasks measured


def test_only_the_asked_metric_is_used_from_a_full_curves_table():
    L = 6
    curves = pd.concat([curve("semantic", rising(2, L), metric="accuracy"),
                        curve("semantic", rising(5, L), metric="roc_auc")])
    assert recommend(curves, L, tasks=("semantic",)).layer == 2
    rec = recommend(curves, L, tasks=("semantic",), metric="roc_auc")
    assert rec.layer == 5 and rec.metric == "roc_auc"
    assert {row["metric"] for row in rec.curves} == {"roc_auc"}


def test_bad_curves_and_layer_counts_are_named():
    bad = curve("semantic", rising(2, 6))
    bad.loc[3, "lo"] = bad.loc[3, "estimate"] + 0.1
    with pytest.raises(BadInputError, match=r"^curve 'semantic' layer 3: .*lo <= estimate <= hi"):
        recommend(bad, 6, tasks=("semantic",))
    nan = curve("semantic", rising(2, 6))
    nan.loc[4, "hi"] = np.nan
    with pytest.raises(BadInputError, match=r"^curve 'semantic' layer 4: needs finite"):
        recommend(nan, 6, tasks=("semantic",))
    with pytest.raises(ConfigError, match="^num_layers=1: "):
        recommend(curve("semantic", [0.5, 0.9]), 1, tasks=("semantic",))


def test_the_recommendation_is_json_with_its_evidence():
    L = 6
    rec = recommend(pd.concat([curve("semantic", rising(3, L)), curve("d1", rising(2, L))]), L, position="last")
    assert isinstance(rec, Recommendation)
    d = json.loads(json.dumps(rec.to_dict()))
    assert d["layer"] == 3 and d["num_layers"] == L and d["position"] == "last" and d["metric"] == "accuracy"
    assert len(d["curves"]) == 2 * (L + 1)
    assert all(r["lo"] <= r["estimate"] <= r["hi"] for r in d["curves"])
    assert set(d["per_task"]["semantic"]) == {"earliest_at_plateau", "plateau", "plateau_layer", "value_there",
                                              "ci_there"}
