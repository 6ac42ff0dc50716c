"""Statistics for per-layer probes: metrics, bootstrap CIs, control tasks, selectivity, plateaus.

Labels are codes ``y [N]`` in ``0 .. K-1`` (``SweepResult.labels``). Scores follow
``SweepResult.scores``: ``[..., N]`` probabilities of class 1 (binary) or ``[..., N, K]`` class
probabilities (multi-class); every leading axis (seeds, layers) is kept. Multi-class ROC-AUC and
AP are macro one-vs-rest averages, as scikit-learn's ``roc_auc_score(multi_class="ovr")`` and
``average_precision_score(label_binarize(y), ...)``.

The bootstraps resample by weighting: a draw is a vector of multiplicities ``[N]``, so one sort of
each score row serves every draw, and all layers and seeds share the same draws (paired).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import pandas as pd

from probes.errors import BadInputError, ConfigError

Metric = Literal["accuracy", "roc_auc", "average_precision"]

# --- metrics --------------------------------------------------------------------------------------


def accuracy(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Accuracy over the ``N`` axis: ``[...]`` (binary: class 1 when its probability is above 0.5)."""
    y, s, _ = _check_scores(y, scores, "accuracy")
    return _accuracy(y, s, None)[0]


def roc_auc(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC-AUC over the ``N`` axis (ties count one half): ``[...]``."""
    y, s, _ = _check_scores(y, scores, "roc_auc")
    return _roc_auc(y, s, None)[0]


def average_precision(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Average precision over the ``N`` axis (scikit-learn's step-wise definition): ``[...]``."""
    y, s, _ = _check_scores(y, scores, "average_precision")
    return _average_precision(y, s, None)[0]


def _check_scores(y, scores, metric: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate; return label codes ``[N]``, scores as float and the number of classes."""
    y, s = np.asarray(y), np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or len(y) == 0:
        raise BadInputError("y", f"expected a non-empty 1-D array of label codes, got shape {y.shape}")
    n = len(y)
    if s.ndim >= 1 and s.shape[-1] == n:
        n_classes = 2
    elif s.ndim >= 2 and s.shape[-2] == n:
        n_classes = s.shape[-1]
    else:
        raise BadInputError("scores", f"shape {s.shape} ends neither in N={n} (binary) nor in [N={n}, K]")
    if not np.isfinite(s).all():
        raise BadInputError("scores", "contain NaN or inf")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= n_classes:
        raise BadInputError(
            "y", f"label codes must be integers in 0 .. {n_classes - 1} for scores of shape {s.shape}"
        )
    if metric != "accuracy":
        absent = np.setdiff1d(np.arange(n_classes), y)
        if len(absent):
            raise BadInputError("y", f"{metric} is undefined: class {int(absent[0])} has no image")
    return y, s, n_classes


def _accuracy(y: np.ndarray, s: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    """Weighted accuracy ``[B, ...]`` for weights ``w [B, N]`` (``None``: one draw of ones)."""
    n = len(y)
    binary = s.shape[-1] == n
    pred = (s > 0.5).astype(np.int64) if binary else s.argmax(-1)
    correct = (pred == y).reshape(-1, n).astype(np.float64)  # [M, N]
    w = np.ones((1, n)) if w is None else w
    lead = pred.shape[:-1]
    return ((w @ correct.T) / w.sum(-1, keepdims=True)).reshape(len(w), *lead)


def _one_vs_rest(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Positives ``[K', N]`` and scores ``[M, K', N]`` of each one-vs-rest task (K' = 1 if binary)."""
    n = len(y)
    if s.shape[-1] == n:
        return (y == 1)[None], s.reshape(-1, 1, n), s.shape[:-1]
    k = s.shape[-1]
    return y[None] == np.arange(k)[:, None], np.moveaxis(s.reshape(-1, n, k), -1, 1), s.shape[:-2]


def _tie_groups(sorted_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last index of each position's run of equal values: two ``[..., N]`` arrays."""
    n = sorted_s.shape[-1]
    idx = np.broadcast_to(np.arange(n), sorted_s.shape)
    change = sorted_s[..., 1:] != sorted_s[..., :-1]
    is_first = np.concatenate([np.ones_like(change[..., :1]), change], -1)
    is_last = np.concatenate([change, np.ones_like(change[..., :1])], -1)
    first = np.maximum.accumulate(np.where(is_first, idx, 0), -1)
    last = np.minimum.accumulate(np.where(is_last, idx, n - 1)[..., ::-1], -1)[..., ::-1]
    return first, last


def _ranked(y, s, w, descending: bool):
    """Sort each one-vs-rest score row once; return weights ``[B, M, K', N]`` and positives in that
    order, tie-group bounds, and the leading shape."""
    pos, s, lead = _one_vs_rest(y, s)
    order = np.argsort(-s if descending else s, axis=-1, kind="stable")
    first, last = _tie_groups(np.take_along_axis(s, order, -1))
    w = np.ones((1, len(y))) if w is None else w
    ws = w[:, order]
    ps = np.take_along_axis(np.broadcast_to(pos, s.shape), order, -1)
    return ws, ps, first, last, lead


def _roc_auc(y, s, w) -> np.ndarray:
    """Weighted ROC-AUC ``[B, ...]``, macro over one-vs-rest tasks; NaN where a class has no weight."""
    ws, ps, first, last, lead = _ranked(y, s, w, descending=False)
    neg = ws * ~ps
    below = np.cumsum(neg, -1) - neg  # negative weight strictly before each position
    below_group = np.take_along_axis(below, first[None], -1)
    tied = np.take_along_axis(below + neg, last[None], -1) - below_group
    num = (ws * ps * (below_group + 0.5 * tied)).sum(-1)
    den = (ws * ps).sum(-1) * neg.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (num / den).mean(-1).reshape(len(ws), *lead)


def _average_precision(y, s, w) -> np.ndarray:
    """Weighted average precision ``[B, ...]``, macro over one-vs-rest tasks; NaN without positives."""
    ws, ps, _, last, lead = _ranked(y, s, w, descending=True)
    pos = ws * ps
    tp = np.take_along_axis(np.cumsum(pos, -1), last[None], -1)
    seen = np.take_along_axis(np.cumsum(ws, -1), last[None], -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(seen > 0, tp / seen, 0.0)
        return ((pos * precision).sum(-1) / pos.sum(-1)).mean(-1).reshape(len(ws), *lead)


_METRICS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray | None], np.ndarray]] = {
    "accuracy": _accuracy,
    "roc_auc": _roc_auc,
    "average_precision": _average_precision,
}


# --- bootstrap ------------------------------------------------------------------------------------


def bootstrap_ci(
    y: np.ndarray,
    scores: np.ndarray,
    *,
    metric: Metric = "accuracy",
    n_boot: int = 1000,
    ci: float = 0.95,
    groups: np.ndarray | None = None,
    seed: int = 0,
    layers: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Per-layer metric with a percentile bootstrap CI, from out-of-fold scores.

    The metric is computed per (seed, layer) and averaged over seeds; each draw resamples the
    images once for every seed and layer.

    Resampling unit: by default images (rows), stratified by class, as the probing checklist asks:
    the metric is a per-image quantity, every draw keeps each class (so AUC and AP stay defined),
    and it works with few groups. Pass ``groups`` for a cluster bootstrap that resamples whole
    groups instead: wider and more honest when images of a group are correlated (a source photo
    and the fakes made from it), but it needs many groups (tens) to be reliable; draws that miss
    a class are dropped (see ``n_boot`` in the output).

    Args:
        y: ``[N]`` label codes.
        scores: ``[S, L, N]`` (binary) or ``[S, L, N, K]`` out-of-fold probabilities.
        metric: ``accuracy``, ``roc_auc`` or ``average_precision``.
        n_boot, ci, seed: number of draws, coverage, and the seed of the draws.
        groups: ``[N]`` group ids for the cluster bootstrap.
        layers: names of the ``L`` axis (default ``0 .. L-1``).

    Returns:
        One row per layer: ``layer, estimate, lo, hi, n_boot`` (valid draws).
    """
    y, s = _check_stack(y, scores, metric)
    draws, estimate = _draws(y, [s], metric, n_boot, groups, seed)
    return _summary(estimate[0], draws[0], ci, layers)


def selectivity(
    y: np.ndarray,
    scores: np.ndarray,
    control_y: np.ndarray,
    control_scores: np.ndarray,
    *,
    metric: Metric = "accuracy",
    n_boot: int = 1000,
    ci: float = 0.95,
    groups: np.ndarray | None = None,
    seed: int = 0,
    layers: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Selectivity (Hewitt & Liang) per layer: task metric minus control-task metric.

    The CI comes from a paired bootstrap: each draw resamples the images once and scores both the
    task probe and the control probe on it. Resampling units as in :func:`bootstrap_ci`.

    Args:
        y, scores: the task's label codes ``[N]`` and out-of-fold scores ``[S, L, N(, K)]``.
        control_y, control_scores: the same for the control task (:func:`control_labels`).

    Returns:
        One row per layer: ``layer, task_value, control_value, estimate`` (their difference),
        ``lo, hi, n_boot``.
    """
    y, s = _check_stack(y, scores, metric)
    control_y, control_s = _check_stack(control_y, control_scores, metric)
    if s.shape != control_s.shape:
        raise BadInputError("control_scores", f"shape {control_s.shape} differs from the task's {s.shape}")
    draws, estimate = _draws(y, [s, control_s], metric, n_boot, groups, seed, [y, control_y])
    out = _summary(estimate[0] - estimate[1], draws[0] - draws[1], ci, layers)
    out.insert(1, "task_value", estimate[0])
    out.insert(2, "control_value", estimate[1])
    return out


def _check_stack(y, scores, metric: str) -> tuple[np.ndarray, np.ndarray]:
    if metric not in _METRICS:
        raise ConfigError(f"metric {metric!r}", f"unknown; use one of {sorted(_METRICS)}")
    y, s, n_classes = _check_scores(y, scores, metric)
    if s.ndim != (3 if n_classes == 2 else 4):
        raise BadInputError(
            "scores", f"expected [S, L, N] or [S, L, N, K] (as SweepResult.scores), got {s.shape}"
        )
    return y, s


def _draws(y, stacks, metric, n_boot, groups, seed, labels=None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-layer seed-averaged metric of each score stack: draws ``[n_boot, L]`` and estimates ``[L]``."""
    if n_boot < 1:
        raise ConfigError("n_boot", f"{n_boot}; need at least 1")
    labels = labels or [y] * len(stacks)
    weights = _resample(y, groups, n_boot, np.random.default_rng(seed))
    fn = _METRICS[metric]
    per_draw = max(1, 4_000_000 // stacks[0].size)  # bound the [draws, S, L, N(, K)] temporaries
    draws = [
        np.concatenate([fn(lab, s, weights[i : i + per_draw]).mean(1) for i in range(0, n_boot, per_draw)])
        for lab, s in zip(labels, stacks)
    ]
    estimates = [fn(lab, s, None)[0].mean(0) for lab, s in zip(labels, stacks)]
    return draws, estimates


def _resample(y: np.ndarray, groups: np.ndarray | None, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicity of each image in each draw, ``[n_boot, N]``."""
    n = len(y)
    if groups is None:
        w = np.zeros((n_boot, n))
        for c in np.unique(y):
            rows = np.flatnonzero(y == c)
            w[:, rows] = rng.multinomial(len(rows), np.full(len(rows), 1 / len(rows)), size=n_boot)
        return w
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise BadInputError("groups", f"expected {n} group ids, got shape {groups.shape}")
    gid = np.unique(groups, return_inverse=True)[1]
    n_groups = gid.max() + 1
    if n_groups < 2:
        raise BadInputError("groups", "a cluster bootstrap needs at least two groups")
    return rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=n_boot)[:, gid].astype(np.float64)


def _summary(
    estimate: np.ndarray, draws: np.ndarray, ci: float, layers: Sequence[int] | None
) -> pd.DataFrame:
    if not 0 < ci < 1:
        raise ConfigError(f"ci {ci}", "must be in (0, 1)")
    names = list(range(len(estimate))) if layers is None else list(layers)
    if len(names) != len(estimate):
        raise BadInputError("layers", f"{len(names)} names for {len(estimate)} layers")
    valid = np.isfinite(draws)
    if not valid.any(0).all():
        raise BadInputError(
            "groups", "no bootstrap draw holds every class; use more groups or the image bootstrap"
        )
    lo, hi = np.nanquantile(draws, [(1 - ci) / 2, (1 + ci) / 2], axis=0)
    return pd.DataFrame({"layer": names, "estimate": estimate, "lo": lo, "hi": hi, "n_boot": valid.sum(0)})


# --- control tasks --------------------------------------------------------------------------------


def control_labels(y: np.ndarray, *, groups: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Random labels with the class balance of ``y``, for a control task (Hewitt & Liang).

    By default each image gets its own random label: ``y`` shuffled, so class counts are exact.
    With ``groups``, all images of a group share one label; groups are dealt to classes in random
    order so that each class gets about its share of images (off by less than one group per class).

    With grouped folds a held-out image (or group) never appears in training, so a control probe
    should score at chance on the test folds; clearly more flags leakage across the split (e.g.
    near-duplicate images in different groups).

    Returns:
        ``[N]`` labels, drawn from the values of ``y``.
    """
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.permutation(y)
    groups = np.asarray(groups)
    if groups.shape != y.shape:
        raise BadInputError("groups", f"expected shape {y.shape}, got {groups.shape}")
    classes, counts = np.unique(y, return_counts=True)
    gid = np.unique(groups, return_inverse=True)[1]
    sizes = np.bincount(gid)
    order = rng.permutation(len(sizes))
    middle = np.cumsum(sizes[order]) - sizes[order] / 2  # where each group sits on the image axis
    label = np.empty(len(sizes), dtype=np.int64)
    label[order] = np.searchsorted(np.cumsum(counts), middle, side="right")
    return classes[label[gid]]


# --- plateau --------------------------------------------------------------------------------------


def earliest_within_plateau(
    mean: np.ndarray, lo: np.ndarray, hi: np.ndarray, *, plateau: Literal["max", "final"] = "max"
) -> int:
    """Earliest layer whose CI reaches the plateau of a per-layer curve.

    The plateau level is the curve's maximum (``"max"``) or its last layer's value (``"final"``).
    Layer ``l`` has reached it when ``hi[l] >= level``: its value is not significantly below the
    plateau. (With ``"final"``, a layer above the final value counts too: the curve reached the
    plateau there and came down later.) A building block for choosing a depth: it returns the
    shallowest layer that is statistically as good as the best, not the argmax.

    Args:
        mean, lo, hi: ``[L]`` the curve and its CI (e.g. from :func:`bootstrap_ci`).

    Returns:
        The index into the ``L`` axis.
    """
    mean, lo, hi = (np.asarray(a, dtype=np.float64) for a in (mean, lo, hi))
    if mean.ndim != 1 or len(mean) == 0 or lo.shape != mean.shape or hi.shape != mean.shape:
        raise BadInputError(
            "mean, lo, hi", f"need three 1-D arrays of one length, got {mean.shape}, {lo.shape}, {hi.shape}"
        )
    if not (np.isfinite(mean).all() and np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise BadInputError("mean, lo, hi", "contain NaN or inf")
    bad = np.flatnonzero((lo > mean) | (mean > hi))
    if len(bad):
        raise BadInputError(f"layer {int(bad[0])}", "needs lo <= mean <= hi")
    if plateau not in ("max", "final"):
        raise ConfigError(f"plateau {plateau!r}", "use 'max' or 'final'")
    level = mean.max() if plateau == "max" else mean[-1]
    return int(np.flatnonzero(hi >= level)[0])
