"""Debiased linear CKA (Kornblith et al. 2019; Nguyen et al. 2021) with a bootstrap over images.

Rows are image tokens; images are the resampling unit. For activations ``X [N, T, p]`` and ``Y [N, T, q]``
(N images, T image tokens each) the linear kernels are ``K = x·x'`` and ``L = y·y'`` over the ``n = N·T`` token
rows, and

    HSIC₁(K, L) = [tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1] / (n(n−3)),

K̃, L̃ the kernels with a zero diagonal (Song et al. 2012's unbiased estimator), and
CKA = HSIC₁(K, L) / √(HSIC₁(K, K) · HSIC₁(L, L)). It is 1 for identical representations, invariant to
orthogonal transforms and isotropic scaling of either side, and ≈ 0 for independent ones (the plain, biased
CKA is not: it grows with the dimension over n).

Bootstrap. A draw gives each image a multiplicity ``w``; the resampled rows are the copies of its tokens.
Pairs of copies of one token row count as the diagonal (they are left out of K̃ and L̃ like a row with
itself), so a draw never pairs a row with itself, and with all ``w = 1`` the draw is the point estimate. Every
term is a function of per-image sums, so no ``n × n`` kernel is formed: the cost of a draw is
``O(N² + n(p + q))`` after one ``O(N² p q)`` pass per layer (:class:`PairSums`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from probes.errors import BadInputError

_DRAW_BLOCK = 128  # draws evaluated together (bounds the [n, draws] temporaries)


def _as_blocks(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:  # rows are the resampling units
        x = x[:, None, :]
    if x.ndim != 3:
        raise BadInputError("activations", f"expected [n, dim] or [images, tokens, dim], got shape {x.shape}")
    return x


@dataclass
class PairSums:
    """Per-image sums of one pair (X, Y) from which HSIC₁ of any draw follows.

    ``G[m, m'] = Σ_{t,t'} (x_mt·x_m't')(y_mt·y_m't')``, ``d[m] = Σ_t |x_mt|²|y_mt|²``, ``sx/sy`` the per-image
    token sums, ``ux[m] = Σ_t |y_mt|² x_mt``, ``uy[m] = Σ_t |x_mt|² y_mt``, ``ex/ey`` the per-image ``Σ_t |x_mt|²``.
    """

    X: np.ndarray  # [N, T, p]
    Y: np.ndarray  # [N, T, q]
    G: np.ndarray
    d: np.ndarray
    sx: np.ndarray
    sy: np.ndarray
    ux: np.ndarray
    uy: np.ndarray
    ex: np.ndarray
    ey: np.ndarray

    @classmethod
    def of(cls, X: np.ndarray, Y: np.ndarray, chunk_bytes: int = 1 << 27) -> PairSums:
        X, Y = _as_blocks(X), _as_blocks(Y)
        if X.shape[:2] != Y.shape[:2]:
            raise BadInputError("activations", f"X {X.shape[:2]} and Y {Y.shape[:2]} differ in images or tokens")
        n_img, _, p = X.shape
        q = Y.shape[2]
        G = np.zeros((n_img, n_img))
        step = max(1, chunk_bytes // (8 * n_img * q))  # columns of X per pass: C is [N, step, q]
        for i in range(0, p, step):
            c = np.matmul(X[:, :, i : i + step].transpose(0, 2, 1), Y).reshape(n_img, -1)  # Xₘᵀ Yₘ
            G += c @ c.T
        kx = (X**2).sum(-1)  # [N, T]
        ky = (Y**2).sum(-1)
        return cls(X=X, Y=Y, G=G, d=(kx * ky).sum(1), sx=X.sum(1), sy=Y.sum(1),
                   ux=np.einsum("mt,mtp->mp", ky, X), uy=np.einsum("mt,mtq->mq", kx, Y), ex=kx.sum(1), ey=ky.sum(1))

    def hsic(self, w: np.ndarray, a: np.ndarray | None = None, b: np.ndarray | None = None) -> np.ndarray:
        """HSIC₁ · n(n−3) for each draw of multiplicities ``w [B, N]`` (the factor cancels in CKA).

        ``a`` / ``b``: ``[n, B]`` projections ``x_t · Σx`` / ``y_t · Σy`` of the draws when already computed.
        """
        w = np.atleast_2d(np.asarray(w, dtype=np.float64))
        n = w.sum(1) * self.X.shape[1]
        w2 = w**2
        sx, sy = w @ self.sx, w @ self.sy  # [B, p], [B, q]: Σ of the draw's rows
        tr_kl = ((w @ self.G) * w).sum(1) - w2 @ self.d
        sum_k = (sx**2).sum(1) - w2 @ self.ex
        sum_l = (sy**2).sum(1) - w2 @ self.ey
        n_img, n_tok = self.X.shape[:2]
        a = self.X.reshape(n_img * n_tok, -1) @ sx.T if a is None else a  # [n, B]: x_t · Σx
        b = self.Y.reshape(n_img * n_tok, -1) @ sy.T if b is None else b
        ab = (a * b).reshape(n_img, n_tok, -1).sum(1).T  # [B, N]: Σ_t over each image
        kl1 = (w * ab).sum(1) - (w2 * (sx @ self.ux.T + sy @ self.uy.T)).sum(1) + (w**3) @ self.d
        with np.errstate(invalid="ignore", divide="ignore"):
            return tr_kl + sum_k * sum_l / ((n - 1) * (n - 2)) - 2 * kl1 / (n - 2)


def _cka(xy: PairSums, xx: PairSums, yy: PairSums, w: np.ndarray) -> np.ndarray:
    out = np.empty(len(w))
    x = xy.X.reshape(-1, xy.X.shape[-1])
    y = xy.Y.reshape(-1, xy.Y.shape[-1])
    for i in range(0, len(w), _DRAW_BLOCK):
        part = w[i : i + _DRAW_BLOCK]
        a, b = x @ (part @ xy.sx).T, y @ (part @ xy.sy).T  # shared by the three HSICs
        denom = xx.hsic(part, a, a) * yy.hsic(part, b, b)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[i : i + _DRAW_BLOCK] = np.where(denom > 0, xy.hsic(part, a, b) / np.sqrt(np.abs(denom)), np.nan)
    return out


def debiased_cka(X: np.ndarray, Y: np.ndarray, weights: np.ndarray | None = None) -> float | np.ndarray:
    """Debiased linear CKA of ``X`` and ``Y`` (``[n, dim]`` rows, or ``[images, tokens, dim]``).

    With ``weights [B, images]`` (bootstrap multiplicities) it returns ``[B]`` values, one per draw.
    """
    X, Y = _as_blocks(X), _as_blocks(Y)
    if X.shape[0] * X.shape[1] < 4:
        raise BadInputError("activations", "debiased CKA needs at least 4 rows")
    w = np.ones((1, X.shape[0])) if weights is None else np.atleast_2d(weights)
    values = _cka(PairSums.of(X, Y), PairSums.of(X, X), PairSums.of(Y, Y), w)
    return float(values[0]) if weights is None else values


def bootstrap_weights(n_images: int, n_boot: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """``[n_boot, n_images]`` multiplicities: images drawn with replacement (whole groups with ``groups``)."""
    from injection.inspect.common import resample_weights

    return resample_weights(n_images, n_boot, seed, groups)


def layer_cka(
    X: np.ndarray,
    Y: np.ndarray | dict[str, np.ndarray],
    *,
    layers: Sequence[int] | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    groups: np.ndarray | None = None,
    progress=None,
) -> pd.DataFrame:
    """Per-layer debiased CKA of ``X [N, L, T, p]`` and ``Y [N, L, T, q]`` (``[N, L, dim]`` for one row per
    image) with a percentile-bootstrap CI over images (the same draws for every layer and comparison).

    ``Y`` may be a dict of several models' activations, compared with the one reference ``X`` (whose own sums
    are then computed once per layer); the table gets a ``model`` column.

    Returns one row per layer (and model): ``layer, estimate, lo, hi, n_boot`` (valid draws).
    """
    others = Y if isinstance(Y, dict) else {None: Y}
    for y in others.values():
        if X.shape[:2] != y.shape[:2] or X.ndim not in (3, 4) or X.ndim != y.ndim:
            raise BadInputError("activations", f"expected [N, L, T, dim] pairs with equal N and L, got {X.shape}, "
                                               f"{y.shape}")
    names = list(range(X.shape[1])) if layers is None else list(layers)
    if len(names) != X.shape[1]:
        raise BadInputError("layers", f"{len(names)} names for {X.shape[1]} layers")
    w = np.vstack([np.ones((1, X.shape[0])), bootstrap_weights(X.shape[0], n_boot, seed, groups)])
    rows = []
    for j, layer in enumerate(names):
        x = _as_blocks(X[:, j])
        xx = PairSums.of(x, x)
        for model, Ym in others.items():
            y = _as_blocks(Ym[:, j])
            values = _cka(PairSums.of(x, y), xx, PairSums.of(y, y), w)
            draws = values[1:]
            valid = draws[np.isfinite(draws)]
            lo, hi = np.quantile(valid, [(1 - ci) / 2, (1 + ci) / 2]) if len(valid) else (np.nan, np.nan)
            row = {"layer": layer, "estimate": values[0], "lo": lo, "hi": hi, "n_boot": len(valid)}
            rows.append(row if model is None else {"model": model, **row})
            if progress is not None:
                progress.update(1)
    return pd.DataFrame(rows)


def drift(X: np.ndarray, Y: np.ndarray, layers: Sequence[int] | None = None) -> pd.DataFrame:
    """Per layer, how far ``Y`` moved from ``X`` (same rows): ``relative`` = ‖Y − X‖_F / ‖X‖_F and
    ``max_abs`` = max |Y − X| (exactly 0 where the weights and inputs that feed a layer are unchanged)."""
    if X.shape != Y.shape:
        raise BadInputError("activations", f"shapes differ: {X.shape} and {Y.shape}")
    names = list(range(X.shape[1])) if layers is None else list(layers)
    rows = []
    for j, layer in enumerate(names):
        x, y = np.asarray(X[:, j], dtype=np.float64), np.asarray(Y[:, j], dtype=np.float64)
        diff = y - x
        norm = np.linalg.norm(x)
        rows.append({"layer": layer, "relative": float(np.linalg.norm(diff) / norm) if norm else float("nan"),
                     "max_abs": float(np.abs(diff).max()) if diff.size else 0.0})
    return pd.DataFrame(rows)


__all__ = ["PairSums", "bootstrap_weights", "debiased_cka", "drift", "layer_cka"]
