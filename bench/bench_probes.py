"""Benchmark: ``probes.linear.sweep`` against a plain scikit-learn ``LogisticRegression`` loop.

Both run the same protocol on the same data: the same grouped outer folds, inner folds, C grid and
C choice (``sweep(..., estimator=make_pipeline(StandardScaler(), LogisticRegression()))`` is the
plain loop: one lbfgs fit per (layer, seed, outer fold, C, inner fold) plus one refit per cell).
Prints wall times, the ratio (scikit-learn / ours), the largest per-layer difference in held-out
accuracy, and the device. No assertions: timings are for reading.

    python bench/bench_probes.py --size small|7b|all [--device cuda]

Sizes:
    small  N=2000, L=13, D=128, binary and 10-class (the embedded default's shape).
    7b     N=4000, L=29, D=3584, binary (Qwen2.5-VL-7B's layer outputs). The scikit-learn loop takes
           minutes per layer on a 2-core CPU, so both are timed on ``--sklearn-layers`` (default: the
           middle layer, 14) for the ratio; ours is then also timed on all 29 layers.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probes.linear import DEFAULT_CS, sweep  # noqa: E402


def synthetic_activations(
    n: int,
    n_layers: int,
    dim: int,
    *,
    n_classes: int = 2,
    group_size: int = 4,
    seed: int = 0,
    chunk: int = 512,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Structured synthetic activations ``[N, L, D]`` (float32), labels ``[N]`` and groups ``[N]``.

    Each image has a latent class score; its label is that score plus noise (so no probe is
    perfect). Every layer holds: content shared by the images of a group (rank 32, large), an
    image-specific nuisance with a decaying spectrum (rank 64), the label signal along a few random
    directions with a strength that rises with depth (a sigmoid centred at 40% of the depth),
    isotropic noise, and four outlier dimensions at 30x scale (as LLM residual streams have).
    Generated layer by layer in row chunks, so memory stays at the output array.
    """
    rng = np.random.default_rng(seed)
    groups = np.arange(n) // group_size
    k = 1 if n_classes == 2 else n_classes
    latent = rng.standard_normal((n, k), dtype=np.float32)
    noisy = latent + 0.6 * rng.standard_normal((n, k), dtype=np.float32)
    y = (noisy[:, 0] > 0).astype(np.int64) if n_classes == 2 else noisy.argmax(1)
    content = rng.standard_normal((groups[-1] + 1, 32), dtype=np.float32)[groups]
    scale = np.ones(dim, dtype=np.float32)
    scale[rng.choice(dim, min(4, dim), replace=False)] = 30.0
    spectrum = (1.0 / np.sqrt(np.arange(1, 65, dtype=np.float32)))[:, None]
    X = np.empty((n, n_layers, dim), dtype=np.float32)
    for layer in range(n_layers):
        strength = 0.6 / (1 + np.exp(-10 * (layer / max(n_layers - 1, 1) - 0.4)))
        lr = np.random.default_rng([seed, layer])
        mix = lr.standard_normal((32, dim), dtype=np.float32) * (2 / np.sqrt(32))
        nuisance = lr.standard_normal((64, dim), dtype=np.float32) * spectrum
        signal = lr.standard_normal((k, dim), dtype=np.float32) / np.sqrt(8)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            m = len(range(n)[rows])
            x = content[rows] @ mix + lr.standard_normal((m, 64), dtype=np.float32) @ nuisance
            x += strength * latent[rows] @ signal + lr.standard_normal((m, dim), dtype=np.float32)
            X[rows, layer] = x * scale
    return X, y, groups


def sklearn_loop(max_iter: int):
    """The baseline: a per-fit StandardScaler + lbfgs LogisticRegression (scikit-learn's defaults)."""
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))


def timed(fn):
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def compare(name: str, X, y, groups, args, sklearn_layers: list[int] | None) -> None:
    """Time both on the same layers (all of them, or ``sklearn_layers``) and print the comparison."""
    n, n_layers, dim = X.shape
    cs = DEFAULT_CS if args.n_cs == len(DEFAULT_CS) else tuple(np.logspace(-5, 1, args.n_cs))
    common = dict(n_folds=args.folds, seeds=tuple(range(args.seeds)), Cs=cs, inner_folds=args.inner_folds)
    layers = list(range(n_layers)) if sklearn_layers is None else sklearn_layers
    ours, t_ours = timed(
        lambda: sweep(X, y, groups, layers=layers, device=args.device, max_iter=args.max_iter, **common)
    )
    base, t_base = timed(
        lambda: sweep(
            X,
            y,
            groups,
            layers=layers,
            estimator=sklearn_loop(args.max_iter),
            param="logisticregression__C",
            **common,
        )
    )
    cells = ours.table.merge(base.table, on=["layer", "seed", "fold"], suffixes=("", "_sklearn"))
    acc = cells.groupby("layer")[["accuracy", "accuracy_sklearn"]].mean()
    n_fits = len(layers) * args.seeds * args.folds * (len(cs) * args.inner_folds + 1)
    shown = "all layers" if sklearn_layers is None else f"layers {layers} of {n_layers}"
    print(
        f"\n== {name}: N={n}, L={n_layers}, D={dim}, classes={len(np.unique(y))} | seeds={args.seeds}, "
        f"outer folds={args.folds}, inner folds={args.inner_folds}, Cs={len(cs)} | timed on {shown} =="
    )
    print(f"sklearn loop (cpu): {t_base:8.1f} s ({n_fits} fits)")
    print(f"ours ({args.device}):{t_ours:12.1f} s")
    print(f"ratio sklearn / ours: {t_base / t_ours:.1f}x")
    print(
        f"held-out accuracy per layer (mean over seeds x folds): max |ours - sklearn| = "
        f"{100 * (acc['accuracy'] - acc['accuracy_sklearn']).abs().max():.2f} points; "
        f"same chosen C in {100 * (cells['C'] == cells['C_sklearn']).mean():.0f}% of cells"
    )
    print("accuracy by layer   ours: " + " ".join(f"{a:.3f}" for a in acc["accuracy"]))
    print("                 sklearn: " + " ".join(f"{a:.3f}" for a in acc["accuracy_sklearn"]), flush=True)
    if sklearn_layers is not None and args.all_layers:
        _, t_all = timed(lambda: sweep(X, y, groups, device=args.device, max_iter=args.max_iter, **common))
        print(
            f"ours on all {n_layers} layers: {t_all:.1f} s = {t_all / n_layers:.2f} s/layer "
            f"(sklearn, extrapolated from the timed layers: {t_base / len(layers) * n_layers:.0f} s)",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["small", "7b", "all"], default="all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--inner-folds", type=int, default=3)
    parser.add_argument("--n-cs", type=int, default=len(DEFAULT_CS), help="log-spaced C grid over 1e-5 .. 10")
    parser.add_argument("--max-iter", type=int, default=1000, help="iteration cap per fit, for both")
    parser.add_argument(
        "--sklearn-layers",
        type=int,
        nargs="+",
        default=[14],
        help="7b only: layers the scikit-learn loop runs on",
    )
    parser.add_argument(
        "--all-layers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="7b only: also time ours on all layers",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for both torch and scikit-learn's BLAS/OpenMP (default 1: on a shared "
        "machine more threads than free cores slow both sides by up to 10x, unevenly)",
    )
    args = parser.parse_args()

    threads = args.threads
    torch.set_num_threads(threads)
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    print(
        f"device: {device} | {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{threads} threads for both | load average before: {os.getloadavg()[0]:.1f} | "
        f"torch {torch.__version__}",
        flush=True,
    )
    with threadpool_limits(threads):
        run(args)
    print(
        f"\nload average after: {os.getloadavg()[0]:.1f} (other processes on the machine skew both timings)"
    )


def run(args: argparse.Namespace) -> None:
    if args.size in ("small", "all"):
        for n_classes in (2, 10):
            X, y, groups = synthetic_activations(2000, 13, 128, n_classes=n_classes)
            compare(f"small, {n_classes} classes", X, y, groups, args, None)
    if args.size in ("7b", "all"):
        (X, y, groups), t_gen = timed(lambda: synthetic_activations(4000, 29, 3584))
        print(f"\n(7b activations generated in {t_gen:.0f} s, {X.nbytes / 2**30:.2f} GiB)")
        compare("7b", X, y, groups, args, args.sklearn_layers)


if __name__ == "__main__":
    main()
