"""L2-regularised logistic probes on cached activations: one probe per layer, C by nested grouped CV.

Shapes: ``N`` images, ``L`` layer outputs, ``D`` hidden size, ``K`` classes, ``P`` logistic problems
solved together. Binary problems carry one logit (``K' = 1``), multi-class ones ``K' = K``
(multinomial, softmax), as in scikit-learn's ``LogisticRegression``.

Splits are by group only: the caller gives ``groups`` (e.g. source-photo ids) and whole groups go to
one fold (:func:`grouped_folds`). There is no row-level split anywhere in this module.

How :func:`sweep` is fast (numbers in ``bench/README.md``):

* **One problem batch per layer.** For every C, the ``S x F x (I + 1)`` problems of a layer (each
  inner fold of each outer fold of each seed, plus each outer refit) are solved together: their
  training sets are row weights on the same ``[N, D]`` matrix, so a solver step is two
  matrix-matrix products instead of ``P`` matrix-vector ones. On a GPU several layers go together
  (``bmm``); on CPU one at a time (a batch runs as long as its slowest layer).
* **Warm starts along the path.** Cs run from the strongest regularisation up, each starting from
  the previous solution. The outer refits ride along the path, so the chosen C needs no extra fit.
* **A preconditioner from the covariance, computed once per layer.** The solver's initial inverse
  Hessian is the inverse of Böhning's bound ``c * Cov + lam`` (c = 1/4 binary, 1/2 multinomial),
  built from the covariance's top 256 eigenpairs (randomised subspace iteration: a few passes over
  the layer) plus the mean of the other eigenvalues; exact when D <= 512. On activations, whose
  spectrum is dominated by a few directions, this cuts the iterations several-fold, without the
  ``O(D^3)`` eigendecomposition that a full rotation (or the dual/Gram form, which would also need
  one per layer) costs at D = 3584.
* **L-BFGS with an exact line search.** The step along a direction only needs that direction's
  logits, so it is found by a few 1-D Newton steps at ``O(N K' P)`` cost with no pass over the
  activations. Converged problems leave the batch.

Leakage trade-off of the shared standardisation: :func:`sweep` standardises each layer once, with
the mean and scale of all N rows. Centring is absorbed exactly by the unpenalised intercept, so only
the per-feature scale of the outer test rows enters a fit, and no label does. (The preconditioner
also uses all rows; it changes how fast the solver reaches the optimum, not the optimum.)
:class:`LayerProbe` and the ``estimator=`` path of :func:`sweep` standardise per fit instead (the
strict version); ``bench/bench_probes.py`` reports the held-out accuracy difference between the two
(under a quarter of a point there).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from scipy.special import expit, softmax
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from probes import stats
from probes.errors import BadInputError, ConfigError

DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-5, 1, 7))
"""C grid (sklearn's C: inverse L2 strength on standardised features). Wide enough for D = 3584
(which wants strong regularisation) and D = 128; check ``SweepResult.path`` for picks at an edge."""

Scoring = Literal["log_loss", "accuracy"]


# --- folds ----------------------------------------------------------------------------------------


def grouped_folds(y: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Assign whole groups to folds, stratified by class and shuffled by ``seed``.

    Greedy, like scikit-learn's ``StratifiedGroupKFold`` but vectorised over folds: groups are taken
    in random order, larger ones first, and each goes to the fold that holds the fewest images of
    its classes (``fold_counts @ group_counts``; ties go to the smaller fold). That is the fold where
    adding the group least increases the squared distance of the fold's class counts from an equal
    share.

    Args:
        y: ``[N]`` integer labels.
        groups: ``[N]`` group ids (any hashable values); all rows of a group land in one fold.
        n_folds: number of folds.
        seed: shuffles the groups.

    Returns:
        ``[N]`` fold index of each row (``0 .. n_folds - 1``).
    """
    y, groups = np.asarray(y), np.asarray(groups)
    if y.shape != groups.shape or y.ndim != 1:
        raise BadInputError(
            "groups", f"expected one group id per label, got shapes {groups.shape} and {y.shape}"
        )
    group_ids = np.unique(groups, return_inverse=True)[1]
    classes = np.unique(y, return_inverse=True)[1]
    n_groups = group_ids.max() + 1
    if n_groups < n_folds:
        raise BadInputError(
            "groups", f"{n_groups} groups for {n_folds} folds; need at least one group per fold"
        )
    counts = np.zeros((n_groups, classes.max() + 1))
    np.add.at(counts, (group_ids, classes), 1)
    order = np.random.default_rng(seed).permutation(n_groups)
    order = order[np.argsort(-counts[order].sum(1), kind="stable")]
    fold_counts = np.zeros((n_folds, counts.shape[1]))
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    for g in order:
        size = fold_counts.sum(1)
        f = int(
            np.argmin(fold_counts @ counts[g] + size / (size.sum() + 1))
        )  # the size term only breaks ties
        fold_counts[f] += counts[g]
        fold_of_group[g] = f
    return fold_of_group[group_ids]


def _check_fold_classes(
    codes: np.ndarray, groups: np.ndarray, folds: np.ndarray, classes: np.ndarray, where: str
) -> None:
    """Every fold's train and test side must hold every class (for training and for AUC)."""
    for k in np.unique(folds[folds >= 0]):
        for side, rows in (("test", folds == k), ("train", (folds >= 0) & (folds != k))):
            missing = np.setdiff1d(np.arange(len(classes)), codes[rows])
            if len(missing):
                c = classes[missing[0]].tolist()
                holders = np.unique(groups[(codes == missing[0]) & (folds >= 0)]).tolist()
                shown = ", ".join(map(repr, holders[:3])) + (" ..." if len(holders) > 3 else "")
                raise BadInputError(
                    f"{where} fold {k}",
                    f"{side} side has no image of class {c!r}; it occurs only in group(s) {shown}, and whole "
                    "groups go to one fold: add images of that class in other groups or use fewer folds",
                )


def _check_whole_groups(groups: np.ndarray, folds: np.ndarray, seed: int) -> None:
    """Caller-given folds must keep every group whole."""
    gid = np.unique(groups, return_inverse=True)[1]
    first = np.full(gid.max() + 1, -1)
    first[gid[::-1]] = folds[::-1]
    split = np.flatnonzero(first[gid] != folds)
    if len(split):
        raise BadInputError(
            f"group {groups[split[0]].tolist()!r}",
            f"split across folds for seed {seed}; folds must keep groups whole",
        )


def _nested_folds(
    codes: np.ndarray,
    groups: np.ndarray,
    outer: np.ndarray,
    inner_folds: int,
    seeds: Sequence[int],
    classes: np.ndarray,
) -> np.ndarray:
    """Inner folds inside each outer training set: ``[S, F, N]``, ``-1`` on the outer test rows."""
    n_seeds, n = outer.shape
    n_folds = outer.max() + 1
    inner = np.full((n_seeds, n_folds, n), -1, dtype=np.int64)
    for i, seed in enumerate(seeds):
        for f in range(n_folds):
            rows = np.flatnonzero(outer[i] != f)
            if len(np.unique(groups[rows])) < inner_folds:
                raise BadInputError(
                    f"seed {seed} outer fold {f}",
                    f"training side has fewer groups than inner_folds={inner_folds}",
                )
            inner[i, f, rows] = grouped_folds(
                codes[rows], groups[rows], inner_folds, seed=_inner_seed(seed, f)
            )
            _check_fold_classes(codes, groups, inner[i, f], classes, f"seed {seed} outer fold {f}, inner")
    return inner


def _inner_seed(seed: int, fold: int) -> int:
    return int(np.random.default_rng([seed, fold]).integers(2**31 - 1))


# --- input checks ---------------------------------------------------------------------------------


def _encode_labels(y: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``[N]`` integer labels -> (classes ``[K]``, codes ``[N]`` in ``0 .. K-1``)."""
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise BadInputError("y", f"expected {n} labels (one per row of X), got shape {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
        raise BadInputError("y", f"labels must be integers, got dtype {y.dtype}")
    classes, codes = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise BadInputError("y", f"only one class ({classes[0]}) present; a probe needs at least two")
    return classes, codes


def _check_activations(X: Any) -> tuple[int, int, int]:
    if X.ndim != 3:
        raise BadInputError("X", f"expected activations of shape [N, L, D], got shape {tuple(X.shape)}")
    return tuple(int(s) for s in X.shape)


def _check_finite(X: Any, layers: Sequence[int], chunk_bytes: int = 1 << 28) -> None:
    """Scan the used layers once, before any fit, in row chunks (``X`` may be a memmap)."""
    n, _, d = X.shape
    rows = max(1, chunk_bytes // (4 * d * len(layers)))
    bad = np.zeros((n, len(layers)), dtype=bool)
    for s in range(0, n, rows):
        block = X[s : s + rows][:, list(layers)]
        block = (
            block.detach().isfinite().cpu().numpy() if isinstance(block, torch.Tensor) else np.isfinite(block)
        )
        bad[s : s + rows] = ~block.all(-1)
    if bad.any():
        j = int(np.flatnonzero(bad.any(0))[0])
        raise BadInputError(
            f"X layer {layers[j]}, row {int(np.flatnonzero(bad[:, j])[0])}",
            "non-finite activation (NaN or inf)",
        )


def _check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    out = [int(layer) for layer in layers]
    for layer in out:
        if not 0 <= layer < n_layers:
            raise ConfigError(f"layer {layer}", f"out of range for X with {n_layers} layers")
    if not out:
        raise ConfigError("layers", "empty")
    return out


def _check_options(
    n_folds: int, inner_folds: int, seeds: Sequence[int], Cs: Sequence[float], scoring: str
) -> list[float]:
    if n_folds < 2:
        raise ConfigError("n_folds", f"{n_folds}; need at least 2")
    if inner_folds < 2:
        raise ConfigError("inner_folds", f"{inner_folds}; need at least 2")
    if len(seeds) == 0 or len(set(seeds)) != len(seeds):
        raise ConfigError("seeds", f"{tuple(seeds)}; need at least one, without repeats")
    if scoring not in ("log_loss", "accuracy"):
        raise ConfigError(f"scoring {scoring!r}", "unknown; use 'log_loss' or 'accuracy'")
    cs = sorted(float(c) for c in Cs)
    if not cs or cs[0] <= 0 or not all(math.isfinite(c) for c in cs) or len(set(cs)) != len(cs):
        raise ConfigError("Cs", f"{tuple(Cs)}; need distinct finite positive values")
    return cs


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    out = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if out not in (torch.float32, torch.float64):
        raise ConfigError(f"dtype {dtype}", "use float32 or float64")
    return out


# --- standardise, and find the directions that make the problem ill-conditioned ------------------


@dataclass
class _Design:
    """A layer batch standardised per feature, with a ones column for the intercept, and the top
    eigenpairs of its covariance (the preconditioner)."""

    Z: torch.Tensor  # [B, N, D + 1] (x - mean) / std, then 1
    mean: torch.Tensor  # [B, 1, D]
    std: torch.Tensor  # [B, 1, D]
    V: torch.Tensor  # [B, D, k] top eigenvectors of the standardised covariance (all D of them if exact)
    top: torch.Tensor  # [B, k] their eigenvalues
    rest: torch.Tensor  # [B] mean of the other eigenvalues
    exact: bool  # k == D


def _design(x: torch.Tensor, rank: int = 256, exact_up_to: int = 512) -> _Design:
    """Standardise ``x [B, N, D]`` per feature; eigendecompose its covariance, fully when
    ``D <= exact_up_to`` and else its top ``rank`` directions (randomised subspace iteration: a
    few passes over ``x`` instead of an ``O(D^3)`` eigendecomposition)."""
    n, d = x.shape[1:]
    mean = x.mean(1, keepdim=True)
    xs = x - mean
    std = xs.square().mean(1, keepdim=True).sqrt()
    # (near-)constant features are left as they are: dividing rounding noise by its own tiny spread would
    # blow it up into a feature (or into inf)
    constant = std <= 1e-6 * mean.abs().clamp_min(1.0)
    xs = torch.where(constant, torch.zeros_like(xs), xs)
    std = torch.where(constant, torch.ones_like(std), std)
    xs = xs / std
    exact = d <= exact_up_to
    if exact:
        top, V = _eigh(xs.mT @ xs / n)
        rest = torch.zeros_like(top[:, 0])
    else:
        top, V = _top_eigen(xs, rank)
        trace = xs.square().sum((1, 2)) / n
        rest = (trace - top.sum(-1)).clamp_min(0) / (d - rank)
    Z = torch.cat([xs, torch.ones_like(xs[:, :, :1])], 2)
    return _Design(Z=Z, mean=mean, std=std, V=V, top=top.clamp_min(0), rest=rest, exact=exact)


def _eigh(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh``, retried in float64 with a small ridge when the float32 solver fails to
    converge (clustered eigenvalues of nearly degenerate layers)."""
    try:
        return torch.linalg.eigh(cov)
    except torch.linalg.LinAlgError:
        d = cov.shape[-1]
        eye = torch.eye(d, dtype=torch.float64, device=cov.device)
        ridge = 1e-9 * cov.diagonal(dim1=-2, dim2=-1).sum(-1).double().clamp_min(1.0)[:, None, None] / d
        top, V = torch.linalg.eigh(cov.double() + ridge * eye)
        return top.to(cov.dtype), V.to(cov.dtype)


def _top_eigen(xs: torch.Tensor, rank: int, oversample: int = 16, power: int = 2):
    """Top ``rank`` eigenpairs of ``xs^T xs / N`` for ``xs [B, N, D]`` (Halko et al., seeded)."""
    b, n, d = xs.shape
    gen = torch.Generator(device=xs.device).manual_seed(0)
    q = torch.randn(b, d, rank + oversample, generator=gen, device=xs.device, dtype=xs.dtype)
    for _ in range(power + 1):
        q = torch.linalg.qr(xs.mT @ (xs @ q)).Q
    vals, u = torch.linalg.eigh(q.mT @ (xs.mT @ (xs @ q)) / n)
    return vals[:, -rank:], (q @ u)[:, :, -rank:]


# --- the batched solver ---------------------------------------------------------------------------
#
# Problem p of layer b minimises   sum_n w[n, p] * loss(f[b, n, :, p], y[n]) + lam[p] / 2 * |W[b, :, p]|^2
# with logits f = Z @ theta (Z ends in a ones column, so theta's last entry is the unpenalised
# intercept). ``w`` holds the training rows of each problem scaled to sum to 1, so lam = 1 / (C n_train)
# gives scikit-learn's objective divided by C n_train, and the stopping rule (largest gradient entry
# <= tol) is scikit-learn's lbfgs one. Layouts: parameters theta [B, K', P, D + 1],
# logits [B, N, K', P] (both matrix products of a step are single (b)mm calls, and the softmax runs
# over a middle axis, which is several times faster on CPU than over a short last one).


def _logits(Z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``[B, N, K', P]`` logits of parameters (or directions) ``theta [B, K', P, D + 1]``."""
    b, k, p, r1 = theta.shape
    return (Z @ theta.view(b, k * p, r1).mT).view(b, -1, k, p)


def _gradient(
    Z: torch.Tensor,
    theta: torch.Tensor,
    res: torch.Tensor,
    w: torch.Tensor,
    lam: torch.Tensor,
    penalised: torch.Tensor,
) -> torch.Tensor:
    """``[B, K', P, D + 1]`` gradients, from the residuals ``res = d loss / d logits [B, N, K', P]``."""
    b, n, k, p = res.shape
    g = ((res * w[:, None]).view(b, n, k * p).mT @ Z).view(b, k, p, -1)
    return g + lam[:, None] * penalised * theta


def _probabilities(f: torch.Tensor, binary: bool) -> torch.Tensor:
    return torch.sigmoid(f) if binary else torch.softmax(f, 2)


def _row_loss(f: torch.Tensor, y: torch.Tensor, binary: bool) -> torch.Tensor:
    """Log-loss of each row under each problem, ``[B, N, P]``."""
    if binary:
        return (torch.nn.functional.softplus(f) - y * f)[:, :, 0]
    return torch.logsumexp(f, 2) - (y * f).sum(2)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-problem inner product of two ``[B, K', P, D + 1]`` tensors: ``[B, P]``."""
    return torch.einsum("bkpr,bkpr->bp", a, b)


def _over_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted sum over rows of per-row quantities ``[B, N, P]``: ``[B, P]``."""
    return torch.einsum("bnp,np->bp", x, w)


def _precondition(
    g: torch.Tensor, design: _Design, lam: torch.Tensor, bound: float, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply the inverse of Böhning's bound on each problem's Hessian, ``bound * Cov + lam`` on the
    weights and ``bound`` on the intercept, to ``g [B, K', P, D + 1]``, times ``scale [B, P]``. The
    covariance is its top eigenpairs plus the mean of the other eigenvalues."""
    b, k, p, _ = g.shape
    h_top = 1 / (bound * design.top[:, None, :] + lam[None, :, None])  # [B, P, k]
    g_w = g[..., :-1].reshape(b, k * p, -1)
    coord = (g_w @ design.V).view(b, k, p, -1)  # in the eigenbasis
    if design.exact:
        out_w = (h_top[:, None] * coord).view(b, k * p, -1) @ design.V.mT
    else:
        h_rest = 1 / (bound * design.rest[:, None] + lam)  # [B, P]
        correction = ((h_top - h_rest[..., None])[:, None] * coord).view(b, k * p, -1) @ design.V.mT
        out_w = h_rest[:, None, :, None] * g[..., :-1] + correction.view(b, k, p, -1)
    out = torch.cat([out_w.view(b, k, p, -1), g[..., -1:] / bound], -1)
    return out if scale is None else _per_problem(scale) * out


def _per_problem(x: torch.Tensor) -> torch.Tensor:
    """``[B, P]`` -> ``[B, 1, P, 1]``, to scale parameter tensors problem by problem."""
    return x[:, None, :, None]


def _line_search(f, q, y, w, lam, pen_theta, pen_d, slope, binary: bool, steps: int = 8):
    """Step along each direction by safeguarded 1-D Newton on the directional derivative, from t = 1.

    ``q [B, N, K', P]`` are the direction's logits, so a trial step costs ``O(N K' P)`` and no pass over
    the activations. A problem stops at the first t with ``|phi'(t)| <= 0.25 |phi'(0)|``.

    Returns:
        ``t [B, P]``, and the logits and residuals at that step (reused for the gradient).
    """
    wd, dd = _dot(pen_theta, pen_d), _dot(pen_d, pen_d)
    yq = (y * q).sum(2)
    t, lo, hi = torch.ones_like(slope), torch.zeros_like(slope), torch.full_like(slope, math.inf)
    for step in range(steps + 1):
        ft = f + t[:, None, None, :] * q
        prob = _probabilities(ft, binary)
        if step == steps:
            break
        pq = prob * q
        spq = pq.sum(2)
        d1 = _over_rows(spq - yq, w) + lam * (wd + t * dd)
        done = d1.abs() <= 0.25 * slope.abs()
        if bool(done.all()):
            break
        curv = (pq * q * (1 - prob)).sum(2) if binary else (pq * q).sum(2) - spq.square()
        d2 = _over_rows(curv, w) + lam * dd
        lo, hi = torch.where(d1 < 0, t, lo), torch.where(d1 < 0, hi, t)
        newton = t - d1 / d2.clamp_min(torch.finfo(d2.dtype).tiny)
        fallback = torch.where(hi.isinf(), 4 * t, (lo + hi) / 2)
        t = torch.where(done, t, torch.where((newton > lo) & (newton < hi), newton, fallback))
    return t, ft, prob - y


@dataclass
class _Fit:
    theta: torch.Tensor  # [B, K', P, D + 1]
    converged: torch.Tensor  # [B, P]
    n_iter: torch.Tensor  # [B, P]


def _solve(
    design: _Design, y, w, lam, theta, *, binary: bool, tol: float, max_iter: int, memory: int = 10
) -> _Fit:
    """Batched L-BFGS over layers and problems, from ``theta`` (a warm start).

    The initial inverse Hessian is the inverse of Böhning's bound on the Hessian
    (:func:`_precondition`), scaled per problem by the usual ``s^T y / y^T H0 y``.

    Args:
        design: the layer batch (``Z [B, N, D + 1]``).
        y: ``[1, N, K', 1]`` targets (0/1 for binary, one-hot otherwise).
        w: ``[N, P]`` training-row weights, each column summing to 1.
        lam: ``[P]`` L2 strengths.
        theta: ``[B, K', P, D + 1]`` start.
        tol: stop a problem when its largest gradient entry is at most ``tol``.
    """
    Z, n_b, n_p = design.Z, theta.shape[0], theta.shape[2]
    penalised = torch.ones_like(Z[0, 0])
    penalised[-1] = 0
    out = _Fit(
        theta.clone(),
        torch.zeros(n_b, n_p, dtype=torch.bool, device=Z.device),
        torch.zeros(n_b, n_p, dtype=torch.long, device=Z.device),
    )
    cols = torch.arange(n_p, device=Z.device)  # the problems still in the batch
    bound = 0.25 if binary else 0.5
    th, f = theta, _logits(Z, theta)
    g = _gradient(Z, th, _probabilities(f, binary) - y, w, lam, penalised)
    gamma = torch.ones(n_b, n_p, dtype=th.dtype, device=Z.device)
    it = torch.zeros(n_b, n_p, dtype=torch.long, device=Z.device)
    hist: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    while True:
        conv = g.abs().amax((1, 3)) <= tol
        active = ~conv & (it < max_iter)
        live = active.any(0)
        if not bool(live.all()):  # write finished problems out and drop them from the batch
            out.theta[:, :, cols], out.converged[:, cols], out.n_iter[:, cols] = th, conv, it
            if not bool(live.any()):
                return out
            cols, th, f, g, w, lam, gamma, it, active = (
                cols[live],
                th[:, :, live],
                f[..., live],
                g[:, :, live],
                w[:, live],
                lam[live],
                gamma[:, live],
                it[:, live],
                active[:, live],
            )
            hist = [(s[:, :, live], yv[:, :, live], rho[:, live]) for s, yv, rho in hist]
        h0 = partial(_precondition, design=design, lam=lam, bound=bound, scale=gamma)
        d = _two_loop(g, hist, h0) * _per_problem(active)
        slope = _dot(g, d)
        uphill = (slope >= 0) & active  # lost curvature information: use the preconditioned gradient
        if bool(uphill.any()):
            d = torch.where(_per_problem(uphill), -h0(g) * _per_problem(active), d)
            slope = _dot(g, d)
        t, f, res = _line_search(f, _logits(Z, d), y, w, lam, th * penalised, d * penalised, slope, binary)
        s = _per_problem(t) * d
        th = th + s
        g_new = _gradient(Z, th, res, w, lam, penalised)
        yv = g_new - g
        sy, yhy = _dot(s, yv), _dot(yv, _precondition(yv, design, lam, bound))
        ok = (sy > 0) & (yhy > 0)
        hist = [*hist[len(hist) + 1 - memory :], (s, yv, torch.where(ok, 1 / sy, torch.zeros_like(sy)))]
        gamma = torch.where(ok, sy / yhy, gamma)
        g, it = g_new, it + active


def _two_loop(g: torch.Tensor, hist, h0: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """L-BFGS direction ``-H g`` from the stored pairs, with ``h0`` applying the initial inverse Hessian."""
    q, alphas = g.clone(), []
    for s, yv, rho in reversed(hist):
        a = rho * _dot(s, q)
        q -= _per_problem(a) * yv
        alphas.append(a)
    r = h0(q)
    for (s, yv, rho), a in zip(hist, reversed(alphas)):
        r += _per_problem(a - rho * _dot(yv, r)) * s
    return -r


def _start(y: torch.Tensor, w: torch.Tensor, n_b: int, width: int, binary: bool) -> torch.Tensor:
    """Zero weights and the class-prior intercept: ``[B, K', P, width]``."""
    prior = (y[0, :, :, 0].T @ w).clamp(1e-6, 1 - 1e-6)  # [K', P]
    theta = torch.zeros(n_b, *prior.shape, width, dtype=y.dtype, device=y.device)
    theta[..., -1] = torch.logit(prior) if binary else prior.log()
    return theta


def _targets(codes: np.ndarray, n_classes: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[1, N, K', 1]`` targets."""
    t = torch.as_tensor(codes, device=device)
    y = t[:, None].to(dtype) if n_classes == 2 else torch.nn.functional.one_hot(t, n_classes).to(dtype)
    return y[None, :, :, None]


# --- one layer: a scikit-learn estimator ----------------------------------------------------------


class LayerProbe(ClassifierMixin, BaseEstimator):
    """L2-regularised logistic regression on one layer's activations ``[N, D]``, standardised inside.

    The objective is that of ``make_pipeline(StandardScaler(), LogisticRegression(C=C))``: binary
    logistic for two classes, multinomial (softmax) otherwise, unpenalised intercept. It is solved
    by the same torch L-BFGS as :func:`sweep`, so it runs on ``device`` unchanged. Standardisation
    statistics come from the rows given to ``fit`` only.

    Attributes:
        classes_: ``[K]`` labels.
        coef_: ``[1, D]`` (binary) or ``[K, D]`` weights on the raw (unstandardised) features.
        intercept_: ``[1]`` or ``[K]``.
        n_iter_: solver iterations.
    """

    def __init__(
        self,
        C: float = 1.0,
        *,
        tol: float = 1e-4,
        max_iter: int = 1000,
        device: str = "cpu",
        dtype: str = "float32",
    ):
        self.C = C
        self.tol = tol
        self.max_iter = max_iter
        self.device = device
        self.dtype = dtype

    def fit(self, X, y) -> LayerProbe:
        """Fit on ``X [N, D]`` and labels ``y [N]``."""
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise BadInputError(
                "y", f"only one class ({self.classes_[0]}) present; a probe needs at least two"
            )
        if not (self.C > 0 and math.isfinite(self.C)):
            raise ConfigError(f"C {self.C}", "must be finite and positive")
        dtype, device = _torch_dtype(self.dtype), torch.device(self.device)
        n, n_classes = len(X), len(self.classes_)
        binary = n_classes == 2
        design = _design(torch.tensor(X, dtype=dtype, device=device)[None])
        yt = _targets(codes, n_classes, dtype, device)
        w = torch.full((n, 1), 1 / n, dtype=dtype, device=device)
        lam = torch.tensor([1 / (self.C * n)], dtype=dtype, device=device)
        fit = _solve(
            design,
            yt,
            w,
            lam,
            _start(yt, w, 1, design.Z.shape[2], binary),
            binary=binary,
            tol=self.tol,
            max_iter=self.max_iter,
        )
        if not bool(fit.converged.all()):
            warnings.warn(
                f"LayerProbe: not converged in max_iter={self.max_iter} iterations",
                ConvergenceWarning,
                stacklevel=2,
            )
        theta = fit.theta[0, :, 0]  # [K', D + 1]
        coef = theta[:, :-1] / design.std[0]  # on the raw features
        self.coef_ = coef.double().cpu().numpy()
        self.intercept_ = (theta[:, -1] - coef @ design.mean[0, 0]).double().cpu().numpy()
        self.n_iter_ = int(fit.n_iter.max())
        return self

    def decision_function(self, X) -> np.ndarray:
        """Logits: ``[N]`` (binary, for ``classes_[1]``) or ``[N, K]``."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        scores = X @ self.coef_.T + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities ``[N, K]``."""
        scores = self.decision_function(X)
        if scores.ndim == 1:
            p = expit(scores)
            return np.stack([1 - p, p], axis=1)
        return softmax(scores, axis=1)

    def predict(self, X) -> np.ndarray:
        """Labels ``[N]``."""
        scores = self.decision_function(X)
        idx = (scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(1)
        return self.classes_[idx]


# --- all layers: nested grouped CV ----------------------------------------------------------------


@dataclass(frozen=True)
class SweepResult:
    """What :func:`sweep` returns.

    Attributes:
        table: one row per (layer, seed, fold): ``layer, seed, fold, C`` (chosen), ``inner_score``
            (its mean inner-CV score), ``accuracy, roc_auc, average_precision`` (outer test fold;
            macro one-vs-rest for multi-class), ``n_train, n_test, converged``.
        path: one row per (layer, seed, fold, C): ``inner_score`` along the whole C grid.
        scores: out-of-fold probabilities ``[S, L, N]`` (binary: of ``classes[1]``) or
            ``[S, L, N, K]``; row n of seed s comes from the probe that did not train on it.
        labels: ``[N]`` label codes, indices into ``classes`` (what :mod:`probes.stats` takes).
        classes: ``[K]`` the label values.
        folds: ``[S, N]`` outer fold of each row per seed (pass back as ``folds=`` to reuse).
        layers: the layer indices, in the order of the ``L`` axis of ``scores``.
        seeds: the seeds, in the order of the ``S`` axis.
        scoring: what ``inner_score`` is (``log_loss``: lower is better; ``accuracy``: higher).
    """

    table: pd.DataFrame
    path: pd.DataFrame
    scores: np.ndarray
    labels: np.ndarray
    classes: np.ndarray
    folds: np.ndarray
    layers: list[int]
    seeds: list[int]
    scoring: str


def sweep(
    X: np.ndarray | torch.Tensor,
    y: np.ndarray,
    groups: np.ndarray,
    *,
    n_folds: int = 5,
    seeds: Sequence[int] = (0, 1, 2),
    Cs: Sequence[float] = DEFAULT_CS,
    inner_folds: int = 3,
    scoring: Scoring = "log_loss",
    layers: Sequence[int] | None = None,
    folds: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    tol: float = 1e-4,
    max_iter: int = 1000,
    layer_batch: int | None = None,
    estimator: BaseEstimator | None = None,
    param: str = "C",
) -> SweepResult:
    """Fit one L2 logistic probe per layer, seed and outer fold, with C chosen by nested grouped CV.

    For each seed, whole groups are dealt to ``n_folds`` outer folds; inside each outer training
    set, whole groups are dealt again to ``inner_folds`` inner folds. C is the one with the best mean
    inner-fold ``scoring`` (ties go to the smaller C); the probe refit on the outer training set
    with that C scores the outer test fold. The outer test labels are never used before that.

    Args:
        X: activations ``[N, L, D]`` (numpy array, memmap or torch tensor, on any device).
        y: ``[N]`` integer labels, two classes or more (multinomial for more than two).
        groups: ``[N]`` group ids; a group never straddles folds.
        n_folds, seeds, inner_folds: the outer split, its shuffles, and the inner split.
        Cs: the grid of C (inverse L2 strength on standardised features, as in scikit-learn).
        scoring: ``"log_loss"`` (default: a proper, smooth score, with fewer ties than accuracy on
            small folds) or ``"accuracy"`` for choosing C.
        layers: layer indices to probe (default all).
        folds: ``[S, N]`` outer folds to reuse (e.g. ``SweepResult.folds`` of the task when probing
            its control task); each must keep groups whole.
        device, dtype: where and in what precision to fit (``"cuda"`` works unchanged).
        tol, max_iter: per-problem stop on the largest gradient entry, and the iteration cap per C.
        layer_batch: layers fitted together in one batched solve (default: one on CPU; on a GPU,
            as many as fit in a quarter of its free memory).
        estimator: fit this scikit-learn classifier instead, in a plain loop over the same folds and
            protocol (e.g. ``make_pipeline(StandardScaler(), LogisticRegression())`` or an MLP);
            ``param`` names its parameter that takes the values of ``Cs``.

    Returns:
        A :class:`SweepResult`.
    """
    n, n_layers, _ = _check_activations(X)
    classes, codes = _encode_labels(y, n)
    groups = np.asarray(groups.detach().cpu() if isinstance(groups, torch.Tensor) else groups)
    if groups.shape != (n,):
        raise BadInputError("groups", f"expected {n} group ids (one per row of X), got shape {groups.shape}")
    seeds = [int(s) for s in seeds]
    cs = _check_options(n_folds, inner_folds, seeds, Cs, scoring)
    layers = _check_layers(layers, n_layers)
    if estimator is not None and param not in estimator.get_params():
        raise ConfigError(f"param {param!r}", f"not a parameter of {type(estimator).__name__}")
    outer = _outer_folds(codes, groups, n_folds, seeds, folds)
    for i, seed in enumerate(seeds):
        _check_fold_classes(codes, groups, outer[i], classes, f"seed {seed} outer")
    inner = _nested_folds(codes, groups, outer, inner_folds, seeds, classes)
    n_classes = len(classes)
    _check_finite(X, layers)
    if estimator is None:
        run = _sweep_torch(
            X,
            codes,
            n_classes,
            layers,
            outer,
            inner,
            cs,
            scoring,
            torch.device(device),
            _torch_dtype(dtype),
            tol,
            max_iter,
            layer_batch,
        )
    else:
        run = _sweep_estimator(X, codes, n_classes, layers, outer, inner, cs, scoring, estimator, param)
    return _assemble(run, codes, classes, outer, layers, seeds, cs, scoring)


def _outer_folds(codes, groups, n_folds: int, seeds: list[int], folds: np.ndarray | None) -> np.ndarray:
    if folds is None:
        return np.stack([grouped_folds(codes, groups, n_folds, seed) for seed in seeds])
    folds = np.asarray(folds)
    if folds.shape != (len(seeds), len(codes)):
        raise BadInputError(
            "folds", f"expected shape {(len(seeds), len(codes))} ([seeds, N]), got {folds.shape}"
        )
    if folds.min() < 0 or set(np.unique(folds).tolist()) != set(range(n_folds)):
        raise BadInputError("folds", f"each seed's folds must be 0 .. {n_folds - 1}, all used")
    for i, seed in enumerate(seeds):
        _check_whole_groups(groups, folds[i], seed)
    return folds.astype(np.int64)


@dataclass
class _Run:
    """Raw output of one engine: ``chosen [L, S, F]`` C indices, ``inner [L, S, F, nC]`` mean inner
    scores (lower is better), ``scores [S, L, N, K']`` out-of-fold probabilities, ``converged [L, S, F]``."""

    chosen: np.ndarray
    inner: np.ndarray
    scores: np.ndarray
    converged: np.ndarray


def _problems(outer: np.ndarray, inner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training and evaluation rows of every problem, ``[N, P]`` 0/1 each, P = S * F * (I + 1).

    Problem ``(s, f, j)``: for j < I, train on outer-train rows outside inner fold j and evaluate on
    inner fold j; for j = I, train on the whole outer-train set and evaluate on outer fold f.
    """
    n_seeds, n_folds, n = inner.shape
    n_inner = inner.max() + 1
    train = np.zeros((n_seeds, n_folds, n_inner + 1, n), dtype=bool)
    evaluate = np.zeros_like(train)
    for s in range(n_seeds):
        for f in range(n_folds):
            for j in range(n_inner):
                train[s, f, j] = (inner[s, f] >= 0) & (inner[s, f] != j)
                evaluate[s, f, j] = inner[s, f] == j
            train[s, f, n_inner] = outer[s] != f
            evaluate[s, f, n_inner] = outer[s] == f
    return train.reshape(-1, n).T, evaluate.reshape(-1, n).T


def _layers_per_batch(n: int, d: int, n_layers: int, width: int, itemsize: int, device: torch.device) -> int:
    """How many layers to fit together. On a GPU, as many as fit in a quarter of its free memory:
    one batch of kernels serves them all. On CPU one: the work is compute-bound already, and a batch
    runs as long as its slowest layer needs."""
    if device.type != "cuda":
        return 1
    per_layer = itemsize * (3 * n * d + 30 * (d + 1) * width + 12 * n * width)
    return max(1, min(n_layers, torch.cuda.mem_get_info(device)[0] // 4 // per_layer))


def _load(X, layers: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[B, N, D]`` activations of ``layers``."""
    if isinstance(X, torch.Tensor):
        return X[:, list(layers)].to(device=device, dtype=dtype).transpose(0, 1).contiguous()
    block = np.stack([np.asarray(X[:, layer, :]) for layer in layers])
    return torch.from_numpy(block).to(device=device, dtype=dtype)


def _sweep_torch(
    X, codes, n_classes, layers, outer, inner, cs, scoring, device, dtype, tol, max_iter, layer_batch
) -> _Run:
    n_seeds, n_folds, n = inner.shape
    n_inner, binary = inner.max() + 1, n_classes == 2
    k = 1 if binary else n_classes
    train, evaluate = _problems(outer, inner)
    n_train = train.sum(0)
    w = torch.as_tensor(train / n_train, dtype=dtype, device=device)
    v = torch.as_tensor(evaluate / evaluate.sum(0), dtype=dtype, device=device)
    y = _targets(codes, n_classes, dtype, device)
    test_fold = torch.as_tensor(outer, device=device)  # [S, N]
    batch = layer_batch or _layers_per_batch(
        n, X.shape[2], len(layers), w.shape[1] * k, dtype.itemsize, device
    )

    chosen = np.zeros((len(layers), n_seeds, n_folds), dtype=np.int64)
    inner_scores = np.zeros((len(layers), n_seeds, n_folds, len(cs)))
    scores = np.zeros((n_seeds, len(layers), n, k), dtype=np.float32)
    converged = np.ones((len(layers), n_seeds, n_folds), dtype=bool)
    for start in range(0, len(layers), batch):
        part = slice(start, start + batch)
        design = _design(_load(X, layers[part], device, dtype))
        n_b = design.Z.shape[0]
        theta = _start(y, w, n_b, design.Z.shape[2], binary)
        best = torch.full((n_b, n_seeds, n_folds), math.inf, dtype=torch.float64, device=device)
        best_scores = torch.zeros(n_b, n_seeds, n, k, dtype=dtype, device=device)
        for ci, c in enumerate(cs):  # from the strongest regularisation up, each fit warm-started
            lam = torch.as_tensor(1 / (c * n_train), dtype=dtype, device=device)
            fit = _solve(design, y, w, lam, theta, binary=binary, tol=tol, max_iter=max_iter)
            theta = fit.theta
            f = _logits(design.Z, theta)
            score = _over_rows(_eval_loss(f, y, binary, scoring), v).double().view(n_b, n_seeds, n_folds, -1)
            mean_inner = score[..., :n_inner].mean(-1)  # [B, S, F]; the last problem is the outer refit
            better = mean_inner < best  # strictly: ties keep the smaller C
            best = torch.where(better, mean_inner, best)
            take = better.gather(2, test_fold[None].expand(n_b, -1, -1))  # [B, S, N]
            best_scores = torch.where(
                take[..., None], _refit_probabilities(f, binary, test_fold, n_folds), best_scores
            )
            chosen[part][better.cpu().numpy()] = ci
            inner_scores[part, ..., ci] = mean_inner.cpu().numpy()
            converged[part] &= fit.converged.view(n_b, n_seeds, n_folds, -1).all(-1).cpu().numpy()
        scores[:, part] = best_scores.transpose(0, 1).cpu().numpy()
    if scoring == "accuracy":
        inner_scores = 1 - inner_scores
    return _Run(chosen=chosen, inner=inner_scores, scores=scores, converged=converged)


def _eval_loss(f: torch.Tensor, y: torch.Tensor, binary: bool, scoring: str) -> torch.Tensor:
    """Lower-is-better score of every row under every problem, ``[B, N, P]``: log-loss or error."""
    if scoring == "log_loss":
        return _row_loss(f, y, binary)
    hit = (f[:, :, 0] > 0) == (y[:, :, 0] > 0.5) if binary else f.argmax(2) == y.argmax(2)
    return (~hit).to(f.dtype)


def _refit_probabilities(
    f: torch.Tensor, binary: bool, test_fold: torch.Tensor, n_folds: int
) -> torch.Tensor:
    """Probabilities ``[B, S, N, K']`` of each row under the outer refit that held it out.

    ``f [B, N, K', P]``: problems ordered (seed, outer fold, inner problem), the refit last.
    """
    b, n, k, _ = f.shape
    prob = _probabilities(f, binary).view(b, n, k, len(test_fold), n_folds, -1)[..., -1]  # [B, N, K', S, F]
    index = test_fold[None, :, :, None, None].expand(b, -1, -1, k, 1)
    return prob.permute(0, 3, 1, 2, 4).gather(4, index)[..., 0]


def _sweep_estimator(X, codes, n_classes, layers, outer, inner, cs, scoring, estimator, param) -> _Run:
    """The same protocol as :func:`_sweep_torch`, one scikit-learn fit at a time."""
    n_seeds, n_folds, n = inner.shape
    n_inner, k = inner.max() + 1, 1 if n_classes == 2 else n_classes
    chosen = np.zeros((len(layers), n_seeds, n_folds), dtype=np.int64)
    inner_scores = np.zeros((len(layers), n_seeds, n_folds, len(cs)))
    scores = np.zeros((n_seeds, len(layers), n, k), dtype=np.float32)
    converged = np.ones((len(layers), n_seeds, n_folds), dtype=bool)

    def fit_predict(x, train, test, c) -> np.ndarray:
        model = clone(estimator).set_params(**{param: c}).fit(x[train], codes[train])
        prob = model.predict_proba(x[test])
        return prob[:, 1:] if k == 1 else prob

    def inner_score(x, fold_of: np.ndarray, j: int, c: float) -> float:
        val = fold_of == j
        return _score(fit_predict(x, (fold_of >= 0) & ~val, val, c), codes[val], scoring)

    for li, layer in enumerate(layers):
        x = X[:, layer, :]
        x = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        for s, f in np.ndindex(n_seeds, n_folds):
            test = outer[s] == f
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                for ci, c in enumerate(cs):
                    inner_scores[li, s, f, ci] = np.mean(
                        [inner_score(x, inner[s, f], j, c) for j in range(n_inner)]
                    )
                chosen[li, s, f] = int(np.argmin(inner_scores[li, s, f]))  # first of ties: the smaller C
                scores[s, li, test] = fit_predict(x, ~test, test, cs[chosen[li, s, f]])
            converged[li, s, f] = not any(issubclass(m.category, ConvergenceWarning) for m in caught)
            for m in caught:  # pass the others on
                if not issubclass(m.category, ConvergenceWarning):
                    warnings.warn_explicit(m.message, m.category, m.filename, m.lineno)
    if scoring == "accuracy":
        inner_scores = 1 - inner_scores
    return _Run(chosen=chosen, inner=inner_scores, scores=scores, converged=converged)


def _score(prob: np.ndarray, codes: np.ndarray, scoring: str) -> float:
    """Lower-is-better score of probabilities ``[n, K']`` (binary: of class 1)."""
    full = np.concatenate([1 - prob, prob], 1) if prob.shape[1] == 1 else prob
    if scoring == "log_loss":
        return float(-np.log(np.clip(full[np.arange(len(codes)), codes], 1e-15, None)).mean())
    return float((full.argmax(1) != codes).mean())


def _assemble(run: _Run, codes, classes, outer, layers, seeds, cs, scoring) -> SweepResult:
    scores = run.scores[..., 0] if run.scores.shape[-1] == 1 else run.scores
    rows, path = [], []
    for li, layer in enumerate(layers):
        for si, seed in enumerate(seeds):
            for f in range(outer.max() + 1):
                test = outer[si] == f
                y_test, s_test = codes[test], scores[si, li, test]
                ci = run.chosen[li, si, f]
                rows.append(
                    {
                        "layer": layer,
                        "seed": seed,
                        "fold": f,
                        "C": cs[ci],
                        "inner_score": run.inner[li, si, f, ci],
                        "accuracy": float(stats.accuracy(y_test, s_test)),
                        "roc_auc": float(stats.roc_auc(y_test, s_test)),
                        "average_precision": float(stats.average_precision(y_test, s_test)),
                        "n_train": int((~test).sum()),
                        "n_test": int(test.sum()),
                        "converged": bool(run.converged[li, si, f]),
                    }
                )
                path += [
                    {"layer": layer, "seed": seed, "fold": f, "C": c, "inner_score": run.inner[li, si, f, i]}
                    for i, c in enumerate(cs)
                ]
    n_bad = int((~run.converged).sum())
    if n_bad:
        warnings.warn(
            f"sweep: {n_bad} of {run.converged.size} (layer, seed, fold) cells had a fit that did not "
            "converge (see table.converged); raise max_iter",
            ConvergenceWarning,
            stacklevel=3,
        )
    return SweepResult(
        table=pd.DataFrame(rows),
        path=pd.DataFrame(path),
        scores=scores,
        labels=codes,
        classes=classes,
        folds=outer,
        layers=list(layers),
        seeds=list(seeds),
        scoring=scoring,
    )
