"""Figures of the layer-wise analysis (seaborn). Each is written as PNG and PDF, with its numbers as CSV.

Figures read only the tidy tables of :class:`probes.layerwise.LayerwiseResult` and a
:class:`probes.depth.Recommendation`; nothing here computes a statistic.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from probes.storage import atomic_path  # noqa: E402

TASK_LABELS = {
    "semantic": "semantic (object class)",
    "scene": "scene class",
    "d1": "D1: semantic-cue fakes",
    "d2": "D2: trace-only fakes",
}
PALETTE = {"semantic": "#1b9e77", "scene": "#66a61e", "d1": "#d95f02", "d2": "#7570b3"}


def _save(fig: plt.Figure, stem: Path, table: pd.DataFrame) -> list[str]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for ext in ("png", "pdf"):
        with atomic_path(stem.with_suffix(f".{ext}")) as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
        written.append(str(stem.with_suffix(f".{ext}")))
    with atomic_path(stem.with_suffix(".csv")) as tmp:
        table.to_csv(tmp, index=False)
    written.append(str(stem.with_suffix(".csv")))
    plt.close(fig)
    return written


def _band(ax, curve: pd.DataFrame, color: str, label: str, style: str = "-", alpha: float = 0.18) -> None:
    ax.plot(curve.layer, curve.estimate, style, color=color, label=label, lw=1.8, marker="o", ms=3)
    ax.fill_between(curve.layer, curve.lo, curve.hi, color=color, alpha=alpha, lw=0)


def emergence_figure(
    curves: pd.DataFrame,
    selectivity: pd.DataFrame,
    stem: str | Path,
    *,
    recommended: int | None = None,
    baseline: pd.DataFrame | None = None,
    tasks: Sequence[str] = ("semantic", "d1", "d2"),
    metric: str = "accuracy",
    title: str = "",
) -> list[str]:
    """The emergence curves, one column per task (their chance levels differ): per-layer probe accuracy
    with 95% CI bands, the control task (dashed), the random-weights baseline (dotted, ``baseline``);
    selectivity (task − control) below; the recommended layer marked.

    Layer 0 is the input of decoder layer 1: the merger output at image positions, a token embedding at
    the last position (constant across images, hence at chance there).
    """
    sns.set_theme(style="whitegrid", context="paper")
    present = [t for t in tasks if not curves[(curves.task == t) & (curves.metric == metric)].empty]
    fig, axes = plt.subplots(2, max(1, len(present)), figsize=(3.3 * max(1, len(present)), 5.6),
                             sharex=True, height_ratios=(3, 2), squeeze=False)
    rows = []
    for col, task in enumerate(present):
        top, bottom = axes[0, col], axes[1, col]
        rows += _task_column(top, bottom, task, curves, selectivity, baseline, metric)
        top.set_title(TASK_LABELS.get(task, task), fontsize=9)
        bottom.axhline(0, color="grey", lw=0.8)
        bottom.set_xlabel("layer (0 = decoder input)")
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
        for ax in (top, bottom):
            if recommended is not None:
                ax.axvline(recommended, color="black", lw=1, ls="-.")
        if recommended is not None:
            top.text(recommended, top.get_ylim()[1], f" K = {recommended}", va="top", ha="left", fontsize=8)
    axes[0, 0].set_ylabel(f"held-out probe {metric}")
    axes[1, 0].set_ylabel("selectivity\n(task − control)")
    drawn = set(pd.concat(rows).series) if rows else set()
    legend = [("task", "-", "trained model (95% CI band)"), ("selectivity", "--", "control task (random labels)"),
              ("random weights", ":", "same architecture, random weights")]
    handles = [plt.Line2D([], [], color="grey", ls=ls) for series, ls, _ in legend if series in drawn]
    labels = [label for series, _, label in legend if series in drawn]
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3, bbox_to_anchor=(0.5, -0.04))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(stem), pd.concat(rows, ignore_index=True) if rows else pd.DataFrame())


def _task_column(top, bottom, task: str, curves: pd.DataFrame, selectivity: pd.DataFrame,
                 baseline: pd.DataFrame | None, metric: str) -> list[pd.DataFrame]:
    """Draw one task's curves; return the rows drawn (for the CSV beside the figure)."""
    color = PALETTE.get(task, "#444444")
    c = curves[(curves.task == task) & (curves.metric == metric)].sort_values("layer")
    _band(top, c, color, TASK_LABELS.get(task, task))
    rows = [c.assign(series="task")]
    s = selectivity[selectivity.task == task].sort_values("layer")
    if not s.empty:
        top.plot(s.layer, s.control_value, "--", color=color, lw=1, alpha=0.8)
        _band(bottom, s, color, TASK_LABELS.get(task, task))
        rows.append(s.assign(series="selectivity", metric="accuracy"))
    if baseline is not None:
        b = baseline[(baseline.task == task) & (baseline.metric == metric)].sort_values("layer")
        if not b.empty:
            top.plot(b.layer, b.estimate, ":", color=color, lw=1.4)
            rows.append(b.assign(series="random weights"))
    return rows


def generator_heatmap(curves: pd.DataFrame, stem: str | Path, *, metric: str = "roc_auc", title: str = "") -> list[str]:
    """A layer × generator heat map of one-generator-vs-real probes (``gen:<family>`` tasks)."""
    sns.set_theme(style="white", context="paper")
    gen = curves[curves.task.str.startswith("gen:") & (curves.metric == metric)].copy()
    gen["generator"] = gen.task.str.removeprefix("gen:")
    table = gen.pivot(index="generator", columns="layer", values="estimate")
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * table.shape[1], 0.8 + 0.45 * table.shape[0]))
    sns.heatmap(table, annot=True, fmt=".2f", cmap="viridis", vmin=0.5, vmax=1.0, ax=ax,
                cbar_kws={"label": f"held-out {metric}"}, annot_kws={"fontsize": 7})
    ax.set_xlabel("layer (0 = decoder input)")
    ax.set_ylabel("generator vs its real partners")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, Path(stem), gen[["generator", "layer", "metric", "estimate", "lo", "hi"]])
