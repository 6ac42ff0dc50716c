"""The injection-depth criterion: recommend K from the per-layer probe curves, with its evidence.

Criterion. For each semantic curve (the ``semantic`` task and D₁ by default), find the earliest layer
whose 95 % CI reaches the curve's plateau (its maximum over layers): the shallowest depth that is not
significantly worse than the best. K is the deepest of those layers across the curves, so that every
semantic signal has formed before the frozen prefix ends. K is 1-based (inject *after* layer K) and is
kept within 1 .. L−1 so that at least one trainable layer follows the fusion.

Why not the alternatives:
- the argmax layer follows noise on a flat curve and drifts late, freezing layers that add nothing;
- a fixed fraction of the maximum (say 95 %) ignores the CI, so it calls a noisy bump significant, and
  it depends on where chance lies;
- the crossing of the semantic and artifact curves is undefined when the artifact curve is flat at
  every depth, which is exactly the paper's D₂ finding;
- a fixed ratio (16/28) ignores the backbone.

A curve whose selectivity (task − control) never clears zero carries no evidence; it is left out and the
recommendation says so. Curves use one position (the last token by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from probes.errors import BadInputError, ConfigError
from probes.stats import earliest_within_plateau

CRITERION = (
    "the earliest layer at which every semantic curve ({tasks}) is within its 95% CI of its plateau "
    "(maximum over layers), clipped to 1..L-1"
)


@dataclass
class Recommendation:
    """What ``recommend-depth`` prints and writes (``recommendation.json``)."""

    layer: int  # 1-based: inject after this decoder layer
    num_layers: int
    criterion: str
    position: str
    metric: str
    per_task: dict[str, dict] = field(default_factory=dict)  # earliest converged layer, plateau, why
    excluded: dict[str, str] = field(default_factory=dict)  # task -> why it gave no evidence
    curves: list[dict] = field(default_factory=list)  # tidy rows: task, layer, estimate, lo, hi, ...
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def recommend(
    curves: pd.DataFrame,
    num_layers: int,
    *,
    tasks: Sequence[str] = ("semantic", "d1"),
    selectivity: pd.DataFrame | None = None,
    position: str = "last",
    metric: str = "accuracy",
) -> Recommendation:
    """Recommend K from ``curves`` (rows: ``task, layer, estimate, lo, hi``; layer 0 = input of layer 1).

    ``selectivity`` (rows: ``task, layer, estimate, lo, hi``) lets curves without evidence be excluded.
    """
    if num_layers < 2:
        raise ConfigError(f"num_layers={num_layers}", "need at least 2 decoder layers: K is kept within 1..L-1")
    if "metric" in curves.columns:  # a LayerwiseResult.curves table holds every metric: keep the one asked for
        curves = curves[curves.metric == metric]
    per_task, excluded = {}, {}
    for task in tasks:
        curve = curves[curves.task == task].sort_values("layer")
        if curve.empty:
            excluded[task] = "not measured"
            continue
        if selectivity is not None:
            sel = selectivity[selectivity.task == task]
            if not sel.empty and not (sel.lo > 0).any():
                excluded[task] = "selectivity (task - control) never clears 0: no evidence at any layer"
                continue
        values = curve[["estimate", "lo", "hi"]].to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values).all(1) | (values[:, 1] > values[:, 0]) | (values[:, 0] > values[:, 2])
        if bad.any():
            raise BadInputError(f"curve {task!r} layer {curve.layer.iloc[int(np.argmax(bad))]}",
                                "needs finite values with lo <= estimate <= hi")
        idx = earliest_within_plateau(curve.estimate.to_numpy(), curve.lo.to_numpy(), curve.hi.to_numpy())
        row = curve.iloc[idx]
        best = curve.loc[curve.estimate.idxmax()]
        per_task[task] = {
            "earliest_at_plateau": int(row.layer),
            "plateau": float(best.estimate),
            "plateau_layer": int(best.layer),
            "value_there": float(row.estimate),
            "ci_there": [float(row.lo), float(row.hi)],
        }
    if not per_task:
        raise BadInputError("curves", f"no semantic curve with evidence among {list(tasks)}: {excluded}")
    deepest = max(v["earliest_at_plateau"] for v in per_task.values())
    layer = int(np.clip(deepest, 1, num_layers - 1))
    return Recommendation(
        layer=layer,
        num_layers=num_layers,
        criterion=CRITERION.format(tasks=", ".join(per_task)),
        position=position,
        metric=metric,
        per_task=per_task,
        excluded=excluded,
        curves=curves.to_dict(orient="records"),
    )
