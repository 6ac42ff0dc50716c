"""Figures of the inspection commands (seaborn). Each is written as PNG and PDF, with its numbers as CSV
(:func:`probes.plots._save`). Nothing here computes a statistic: figures read the tidy tables of
:mod:`~injection.inspect.forgetting`, :mod:`~injection.inspect.gating` and :mod:`~injection.inspect.ablate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from probes.plots import _save  # noqa: E402

ROLE_COLORS = {"base": "#444444", "naive": "#d95f02", "deepvrm": "#1b9e77", "deepvrm_start": "#7570b3"}
ROLE_NAMES = {"base": "base", "naive": "naive FT (D2)", "deepvrm": "Deep-VRM", "deepvrm_start": "Deep-VRM start"}
GROUP_COLORS = {"trace": "#7570b3", "semantic": "#d95f02", "real": "#1b9e77", "distractor": "#66a61e",
                "other": "#999999"}
GROUP_NAMES = {"trace": "trace-only fakes", "semantic": "semantic-cue fakes", "real": "clean reals",
               "distractor": "post-processed reals", "other": "other fakes"}


def _band(ax, frame: pd.DataFrame, color: str, label: str, style: str = "-", x: str = "layer") -> None:
    frame = frame.sort_values(x)
    ax.plot(frame[x], frame.estimate, style, color=color, label=label, lw=1.6, marker="o", ms=3)
    ax.fill_between(frame[x], frame.lo, frame.hi, color=color, alpha=0.15, lw=0)


def _mark_k(ax, k: int | None, label: bool = True) -> None:
    if k:
        ax.axvline(k, color="black", lw=1, ls="-.")
        if label:
            ax.text(k, ax.get_ylim()[1], f" K = {k}", va="top", ha="left", fontsize=8)


def _errorbars(frame: pd.DataFrame) -> np.ndarray:
    return np.vstack([frame.estimate - frame.lo, frame.hi - frame.estimate]).clip(min=0)


# --- forgetting --------------------------------------------------------------------------------------


def forgetting_figure(tables: dict[str, pd.DataFrame], stem: str | Path, *, injection_layer: int | None = None,
                      frozen: dict[str, Any] | None = None) -> list[str]:
    """Four panels: held-out semantic QA per model; own semantic-probe accuracy per layer; the base's probes
    scored on each model (transfer); debiased CKA to the base per layer (dashed: Deep-VRM against its start)."""
    sns.set_theme(style="whitegrid", context="paper")
    qa, probes, cka = tables["qa"], tables["probes"], tables["cka"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    rows = []
    ax = axes[0, 0]
    part = qa[qa.metric == "accuracy"]
    questions = [q for q in ("object", "scene", "all") if q in set(part.question)]
    roles = [r for r in ROLE_COLORS if r in set(part.role)]
    width = 0.8 / max(1, len(roles))
    for j, role in enumerate(roles):
        p = part[part.role == role].set_index("question").reindex(questions)
        x = np.arange(len(questions)) + (j - (len(roles) - 1) / 2) * width
        ax.bar(x, p.estimate, width, yerr=_errorbars(p), color=ROLE_COLORS[role], label=ROLE_NAMES[role], capsize=2)
    ax.set_xticks(np.arange(len(questions)), [f"{q} QA" for q in questions])
    ax.set_ylabel("held-out accuracy (generated answer)")
    ax.set_title("semantic QA (stand-in for BLINK / MME)", fontsize=9)
    ax.legend(fontsize=7)
    rows.append(part.assign(panel="qa"))
    first = probes.iloc[0] if len(probes) else None
    for ax, kind, title in ((axes[0, 1], "own", "semantic probe, fit on each model"),
                            (axes[1, 0], "transfer", "base model's probe, scored on each model")):
        if first is None:
            continue
        for role in ROLE_COLORS:
            for position, style in (("image_mean", "-"), ("last", "--")):
                p = probes[(probes.role == role) & (probes.kind == kind) & (probes.task == first.task)
                           & (probes.position == position)]
                if len(p):
                    _band(ax, p, ROLE_COLORS[role], f"{ROLE_NAMES[role]} ({position})", style)
                    rows.append(p.assign(panel=kind))
        _mark_k(ax, injection_layer)
        ax.set_title(f"{title}: task {first.task}", fontsize=9)
        ax.set_ylabel("held-out probe accuracy")
        ax.set_xlabel("layer (0 = input of layer 1; K = before the fusion)")
        ax.legend(fontsize=6)
    ax = axes[1, 1]
    for (ref, model), p in cka.groupby(["reference", "model"]):
        style = "-" if ref == "base" else "--"
        _band(ax, p, ROLE_COLORS.get(model, "#000000"), f"{ROLE_NAMES.get(model, model)} vs {ROLE_NAMES.get(ref, ref)}",
              style)
    rows.append(cka.assign(panel="cka"))
    _mark_k(ax, injection_layer)
    ax.set_ylabel("debiased linear CKA (image tokens)")
    ax.set_xlabel("layer")
    title = "representation drift"
    if frozen and frozen.get("applicable"):
        title += f" — layers 0..K frozen: {'yes' if frozen['zero_drift'] else 'NO'}"
        moved = frozen.get("with_capture_prompt", {}).get("changed_prompt_embeddings")
        if moved:
            title += f"\n(with this prompt they move a little: embeddings of {', '.join(moved)} were trained)"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, Path(stem), pd.concat(rows, ignore_index=True))


# --- gating ------------------------------------------------------------------------------------------


def gating_figures(tables: dict[str, pd.DataFrame], folder: str | Path, *, injection_layer: int | None,
                   verdict: dict[str, Any] | None = None) -> list[str]:
    folder = Path(folder)
    files = reliance_figure(tables["reliance"], folder / "reliance", verdict=verdict)
    files += auc_figure(tables["auc"], folder / "auc")
    if not tables["attention"].empty:
        files += attention_figure(tables["attention"], tables["margins"], folder / "attention", injection_layer)
    files += stream_figure(tables["margins"], tables["tokens"], tables["gate"], folder / "stream")
    if not tables["footprint"].empty:
        files += footprint_figure(tables["footprint"], tables["margins"], folder / "footprint", injection_layer)
    return files


def _conditions(frame: pd.DataFrame) -> list[str]:
    return [c for c in ("fused", "removed", "shuffled", "partner") if c in set(frame.condition)]


def reliance_figure(reliance: pd.DataFrame, stem: str | Path, *, verdict: dict[str, Any] | None = None) -> list[str]:
    """Left: reliance on the stream (drop of the label-signed margin) per condition and cue group. Right: per
    generator (trace families and the semantic-cue family) when the stream is removed / swapped for the partner's."""
    sns.set_theme(style="whitegrid", context="paper")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=(1, 1.2))
    cue = reliance[reliance.level == "cue"]
    conditions = _conditions(cue)
    groups = [g for g in GROUP_COLORS if g in set(cue.group)]
    width = 0.8 / max(1, len(groups))
    for j, group in enumerate(groups):
        p = cue[cue.group == group].set_index("condition").reindex(conditions)
        x = np.arange(len(conditions)) + (j - (len(groups) - 1) / 2) * width
        left.errorbar(x, p.estimate, yerr=_errorbars(p), fmt="o", color=GROUP_COLORS[group], capsize=3,
                      label=GROUP_NAMES[group])
    left.axhline(0, color="grey", lw=0.8)
    left.set_xticks(np.arange(len(conditions)), [f"stream {c}" for c in conditions])
    left.set_ylabel("reliance: label-signed margin, fused − condition")
    left.legend(fontsize=7)
    gen = reliance[(reliance.level == "generator") & reliance.condition.isin(["removed", "partner"])]
    names = sorted(set(gen.group))
    for j, condition in enumerate(c for c in ("removed", "partner") if c in set(gen.condition)):
        p = gen[gen.condition == condition].set_index("group").reindex(names)
        y = np.arange(len(names)) + (j - 0.5) * 0.35
        right.errorbar(p.estimate, y, xerr=_errorbars(p), fmt="o", capsize=3, label=f"stream {condition}",
                       color=("#7570b3", "#e7298a")[j])
    right.axvline(0, color="grey", lw=0.8)
    right.set_yticks(np.arange(len(names)), names)
    right.set_xlabel("reliance (fakes of each generator)")
    right.legend(fontsize=7)
    if verdict:
        fig.suptitle(f"Trace fakes on the stream, semantic-cue fakes on the semantic path? {verdict['outcome']}",
                     fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(stem), reliance)


def auc_figure(auc: pd.DataFrame, stem: str | Path) -> list[str]:
    """Detection ROC-AUC (margin; each fake group against every real) under each condition."""
    sns.set_theme(style="whitegrid", context="paper")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    cue = auc[auc.level == "cue"]
    conditions = _conditions(cue)
    groups = [g for g in GROUP_COLORS if g in set(cue.group)]
    width = 0.8 / max(1, len(groups))
    for j, group in enumerate(groups):
        p = cue[cue.group == group].set_index("condition").reindex(conditions)
        x = np.arange(len(conditions)) + (j - (len(groups) - 1) / 2) * width
        ax.bar(x, p.estimate - 0.5, width, bottom=0.5, yerr=_errorbars(p), color=GROUP_COLORS[group],
               label=GROUP_NAMES[group], capsize=2)
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_xticks(np.arange(len(conditions)), [f"stream {c}" for c in conditions])
    ax.set_ylabel("detection ROC-AUC vs reals")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, Path(stem), auc)


def attention_figure(attention: pd.DataFrame, margins: pd.DataFrame, stem: str | Path,
                     injection_layer: int | None) -> list[str]:
    """Attention mass from the answer position to the image tokens per layer (fused solid, removed dashed)."""
    sns.set_theme(style="whitegrid", context="paper")
    merged = attention.merge(margins[["id", "group"]], on="id")
    table = merged.groupby(["group", "condition", "layer"], as_index=False).mass.agg(["mean", "sem"]).reset_index()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (group, condition), p in table.groupby(["group", "condition"]):
        style = "-" if condition == "fused" else "--"
        ax.plot(p.layer, p["mean"], style, color=GROUP_COLORS.get(group, "#000"), marker="o", ms=3,
                label=f"{GROUP_NAMES.get(group, group)} ({condition})")
    _mark_k(ax, injection_layer)
    ax.set_xlabel("decoder layer (1-based; the fusion follows layer K)")
    ax.set_ylabel("attention mass: answer position → image tokens")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return _save(fig, Path(stem), table)


def stream_figure(margins: pd.DataFrame, tokens: pd.DataFrame, gate: pd.DataFrame, stem: str | Path) -> list[str]:
    """‖injected‖ / ‖h‖ per cue group, its mean per image-token position (a grid when square), and the gate."""
    sns.set_theme(style="whitegrid", context="paper")
    has_gate = margins.gate_mean.notna().any() or not gate.empty
    fig, axes = plt.subplots(1, 3 if has_gate else 2, figsize=(13 if has_gate else 9, 4))
    order = [g for g in GROUP_COLORS if g in set(margins.group)]
    sns.boxplot(data=margins, x="group", y="ratio_mean", order=order, ax=axes[0], hue="group", legend=False,
                palette=GROUP_COLORS)
    axes[0].set_xticks(range(len(order)), [GROUP_NAMES[g] for g in order], rotation=20, fontsize=7)
    axes[0].set_ylabel("‖injected‖ / ‖h‖ (mean over image tokens)")
    axes[0].set_xlabel("")
    per_token = tokens.groupby("token").ratio.mean()
    side = int(round(np.sqrt(len(per_token))))
    if side * side == len(per_token):
        sns.heatmap(per_token.to_numpy().reshape(side, side), ax=axes[1], cmap="viridis", annot=side <= 8,
                    fmt=".2g", cbar_kws={"label": "mean ‖injected‖ / ‖h‖"})
        axes[1].set_title("per image-token position (row-major grid)", fontsize=9)
    else:
        axes[1].plot(per_token.index, per_token.values, marker="o", ms=2)
        axes[1].set_xlabel("image token")
    if has_gate:
        if margins.gate_mean.notna().any():
            sns.boxplot(data=margins, x="group", y="gate_mean", order=order, ax=axes[2], hue="group", legend=False,
                        palette=GROUP_COLORS)
            axes[2].set_ylabel("token gate g (mean over tokens)")
            axes[2].set_xticks(range(len(order)), [GROUP_NAMES[g] for g in order], rotation=20, fontsize=7)
        elif len(gate) == 1:
            axes[2].bar(["g"], gate.gate)
            axes[2].set_ylabel("scalar gate g")
        else:
            axes[2].hist(gate.gate, bins=30)
            axes[2].set_xlabel("channel gate g")
    fig.tight_layout()
    table = margins[["id", "group", "generator", "ratio_mean", "gate_mean"]]
    return _save(fig, Path(stem), table)


def footprint_figure(footprint: pd.DataFrame, margins: pd.DataFrame, stem: str | Path,
                     injection_layer: int | None) -> list[str]:
    """‖h_fused − h_removed‖ / ‖h_removed‖ per layer at the answer position and the image tokens."""
    sns.set_theme(style="whitegrid", context="paper")
    merged = footprint.merge(margins[["id", "group"]], on="id")
    table = merged.groupby(["group", "position", "layer"], as_index=False).relative.mean()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, position in zip(axes, ("image", "answer")):
        for group, p in table[table.position == position].groupby("group"):
            ax.plot(p.layer, p.relative, color=GROUP_COLORS.get(group, "#000"), marker="o", ms=3,
                    label=GROUP_NAMES.get(group, group))
        _mark_k(ax, injection_layer)
        ax.set_title(f"stream footprint at the {position} {'tokens' if position == 'image' else 'position'}",
                     fontsize=9)
        ax.set_xlabel("hidden-state index (L: after the final norm)")
        ax.set_ylabel("‖h_fused − h_removed‖ / ‖h_removed‖")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, Path(stem), table)


# --- ablations ---------------------------------------------------------------------------------------


def depth_figure(table: pd.DataFrame, stem: str | Path, *, recommended: int | None = None) -> list[str]:
    """Detection (AUC, all fakes and per cue) and semantic QA against the injection depth K, the recommended K
    marked; the base (and naive) models as horizontal lines."""
    sns.set_theme(style="whitegrid", context="paper")
    depth = table[table.group == "depth"].sort_values("value")
    refs = table[table.group == "reference"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    if len(depth):
        x = depth.value.astype(float)
        top.errorbar(x, depth.auc, yerr=_errorbars(depth.rename(columns={"auc": "estimate", "auc_lo": "lo",
                                                                         "auc_hi": "hi"})),
                     fmt="o-", color="#1b9e77", capsize=3, label="all fakes")
        for column, color, label in (("auc_trace", "#7570b3", "trace-only fakes"),
                                     ("auc_semantic", "#d95f02", "semantic-cue fakes")):
            if column in depth and depth[column].notna().any():
                top.plot(x, depth[column], "s--", color=color, ms=4, label=label)
        bottom.errorbar(x, depth.semantic_acc, yerr=_errorbars(depth.rename(columns={
            "semantic_acc": "estimate", "semantic_lo": "lo", "semantic_hi": "hi"})), fmt="o-", color="#1b9e77",
            capsize=3, label="Deep-VRM at K")
    for _, ref in refs.iterrows():
        style = ":" if ref["name"] == "base" else "--"
        top.axhline(ref.auc, color="grey", ls=style, lw=1, label=ref["name"])
        bottom.axhline(ref.semantic_acc, color="grey", ls=style, lw=1, label=ref["name"])
    for ax in (top, bottom):
        _mark_k(ax, recommended)
    if recommended:
        top.text(recommended, top.get_ylim()[0], " recommended K", va="bottom", fontsize=8)
    bottom.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    top.set_ylabel("detection ROC-AUC (test)")
    bottom.set_ylabel("held-out semantic QA accuracy")
    bottom.set_xlabel("injection depth K (fusion after decoder layer K)")
    top.legend(fontsize=7)
    bottom.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, Path(stem), pd.concat([depth, refs], ignore_index=True))


def variants_figure(table: pd.DataFrame, stem: str | Path) -> list[str]:
    """Detection AUC and semantic QA of each ablation variant (init, fusion, early layers) and the references."""
    sns.set_theme(style="whitegrid", context="paper")
    rows = table[table.group.isin(["init", "fusion", "early", "reference"])].copy()
    rows["label"] = np.where(rows.group == "reference", rows["name"], rows.group + ": " + rows.value.astype(str))
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 + 0.4 * max(3, len(rows))), sharey=True)
    y = np.arange(len(rows))
    colors = [{"init": "#1b9e77", "fusion": "#d95f02", "early": "#7570b3"}.get(g, "#888888") for g in rows.group]
    for ax, (column, lo, hi, label) in zip(axes, (("auc", "auc_lo", "auc_hi", "detection ROC-AUC (test)"),
                                                   ("semantic_acc", "semantic_lo", "semantic_hi",
                                                    "held-out semantic QA accuracy"))):
        frame = rows.rename(columns={column: "estimate", lo: "lo", hi: "hi"})
        ax.barh(y, frame.estimate, xerr=_errorbars(frame), color=colors, capsize=2)
        ax.set_xlabel(label)
    axes[0].set_yticks(y, rows.label)
    fig.tight_layout()
    return _save(fig, Path(stem), rows)


__all__ = ["attention_figure", "auc_figure", "depth_figure", "footprint_figure", "forgetting_figure",
           "gating_figures", "reliance_figure", "stream_figure", "variants_figure"]
