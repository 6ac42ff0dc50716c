"""How a Deep-VRM model uses its injected low-level stream, per generator and per cue.

For every labelled row of a split (the test split by default) the logit margin at the answer position (first
token of the prompt's fake word minus its real word, as :mod:`injection.evaluate`) is read under:

- ``fused``: the model as trained;
- ``removed``: no fusion (:meth:`~injection.DeepVRMForConditionalGeneration.fusion_off`: the stream is gone, and
  h passes layer K unchanged);
- ``shuffled``: the stream replaced by another image's low-level features (a seeded draw among the rows of
  other scenes);
- ``partner``: the stream replaced by the content-aligned partner's features: a fake gets the real crop it was
  made from, a clean real gets the fake made from it (same ``scene_id``). Rows without a partner get NaN.

**Reliance** on the stream under a condition is the drop of the label-signed margin (``+margin`` for a fake,
``−margin`` for a real): ``s_fused − s_condition``. Positive: the true stream pushed the answer toward the right
label. It is summarised with bootstrap CIs per cue group (trace fakes, semantic-cue fakes, clean reals,
post-processed reals) and per generator; detection AUC (each group's fakes against all reals) per condition too.

Also recorded, for every fusion: ‖injected‖ / ‖h‖ per image token (‖g ⊙ v‖ / ‖h‖ for a gated fusion), the gate
(its value, per channel, or per token), the attention mass from the answer position to the image tokens per
layer (mean over heads; fused and removed; layers ≤ K are identical by causality), and the stream's footprint
per layer: ‖h_fused − h_removed‖ / ‖h_removed‖ at the answer position and at the image tokens (from HF's
``hidden_states``: index L is after the final norm).

The verdict tests the paper's claim that trace-only fakes lean on the injected stream while semantic-cue fakes
lean on the semantic path (:func:`verdict`). Attention weights need eager attention (the default here).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from injection.inspect.common import (
    InspectConfig,
    cache_dir,
    data_hash,
    describe,
    diff_ci,
    is_deep_vrm,
    jsonable,
    load,
    load_tables,
    mean_ci,
    provenance,
    release,
    resolve_manifest,
    save_tables,
    threads,
    write_table,
)
from probes import stats
from probes.backbones.base import BackboneAdapter
from probes.data.manifest import LABELS, Record, read_manifest
from probes.errors import BadInputError, ConfigError
from probes.storage import hash_json, write_json

CONDITIONS = ("removed", "shuffled", "partner")
TABLES = ("margins", "tokens", "attention", "footprint", "gate")
GROUPS = ("trace", "semantic", "real", "distractor")
GROUP_LABELS = {"trace": "trace-only fakes", "semantic": "semantic-cue fakes", "real": "clean reals",
                "distractor": "post-processed reals"}


@dataclass
class GatingConfig(InspectConfig):
    """What ``inspect gating`` computes; recorded and hashed with its results.

    Args:
        split: the manifest split whose labelled rows are read (default ``test``).
        conditions: any of ``removed``, ``shuffled``, ``partner`` (``fused`` is always run).
        max_rows: a seeded sample of the rows (their partners are added); ``None``: every row.
        prompt: the question for every row; ``None``: each row's own.
        attention: record the attention mass from the answer position to the image tokens (needs eager).
        footprint: record ‖h_fused − h_removed‖ / ‖h_removed‖ per layer.
        n_boot, ci, seed: bootstrap draws and coverage; ``seed`` also draws the shuffled donors.
        attn: attention implementation the model is loaded with (``eager`` for attention weights).
    """

    split: str = "test"
    conditions: tuple[str, ...] = CONDITIONS
    max_rows: int | None = None
    prompt: str | None = None
    attention: bool = True
    footprint: bool = True
    n_boot: int = 1000
    ci: float = 0.95
    seed: int = 0
    dtype: str = "float32"
    attn: str = "eager"
    device: str = "cpu"
    batch_size: int = 16
    threads: int | None = None

    _tuple_fields = ("conditions",)

    def __post_init__(self):
        super().__post_init__()
        unknown = [c for c in self.conditions if c not in CONDITIONS]
        if unknown:
            raise ConfigError(f"conditions={list(self.conditions)}", f"use any of {list(CONDITIONS)}")
        if self.attention and self.attn != "eager":
            raise ConfigError(f"attn={self.attn}", "attention weights need attn='eager' (or attention=False)")


# --- rows, partners, donors --------------------------------------------------------------------------


def select_rows(records: Sequence[Record], split: str, max_rows: int | None = None, seed: int = 0) -> list[Record]:
    """The labelled rows of ``split`` (manifest order); with ``max_rows`` a seeded sample plus their partners."""
    rows = [r for r in records if r.label in LABELS and (split == "all" or r.split == split)]
    if not rows:
        raise BadInputError(f"split={split}", "no labelled rows in this split")
    if max_rows is None or max_rows >= len(rows):
        return rows
    keep = {rows[i].id for i in np.random.default_rng(seed).choice(len(rows), max_rows, replace=False)}
    partner = partner_map(rows)
    keep |= {partner[i] for i in list(keep) if i in partner}
    return [r for r in rows if r.id in keep]


def group_of(r: Record) -> str:
    """The cue group of a row: ``trace`` / ``semantic`` (fakes by cue), ``real`` (clean), ``distractor``."""
    if r.label == "fake":
        return r.cue if r.cue in ("trace", "semantic") else "other"
    return "real" if (r.post or "none") == "none" else "distractor"


def partner_map(rows: Sequence[Record]) -> dict[str, str]:
    """Content-aligned partners within ``rows``: fake → the clean real of its scene, clean real → the fake of its
    scene (the first by id when there are several). Rows of scenes without the other kind are left out."""
    scenes: dict[str, dict[str, list[str]]] = {}
    for r in rows:
        if r.scene_id is None:
            continue
        kind = "fake" if r.label == "fake" else "real" if group_of(r) == "real" else None
        if kind:
            scenes.setdefault(r.scene_id, {"fake": [], "real": []})[kind].append(r.id)
    out = {}
    for members in scenes.values():
        fakes, reals = sorted(members["fake"]), sorted(members["real"])
        if fakes and reals:
            out.update({f: reals[0] for f in fakes})
            out.update({r: fakes[0] for r in reals})
    return out


def shuffle_map(rows: Sequence[Record], seed: int = 0) -> dict[str, str]:
    """Each row's donor of low-level features: the next row of another scene in a seeded random cycle."""
    order = np.random.default_rng(seed).permutation(len(rows))
    scene = [rows[i].scene_id or f"row:{rows[i].id}" for i in order]
    out = {}
    for k, i in enumerate(order):
        for step in range(1, len(order)):
            j = (k + step) % len(order)
            if scene[j] != scene[k]:
                out[rows[i].id] = rows[order[j]].id
                break
    return out


def replacement_stream(ids: Sequence[str], donors: dict[str, str], features: dict[str, torch.Tensor]) -> tuple[
        torch.Tensor, np.ndarray]:
    """The stream of a batch (rows ``ids``, image-token order) with each row's donor's features in place of its
    own, and which rows got a donor (a row without one, or whose donor has another token count, keeps its own)."""
    parts, replaced = [], []
    for i in ids:
        d = donors.get(i)
        ok = d is not None and d in features and features[d].shape == features[i].shape
        parts.append(features[d] if ok else features[i])
        replaced.append(ok)
    return torch.cat(parts), np.array(replaced, dtype=bool)


# --- model readouts ------------------------------------------------------------------------------


def answer_token_ids(tokenizer, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt, the first token of its fake-answer word and of its real-answer word (as ``evaluate``)."""
    from injection.evaluate import DEFAULT_ANSWERS, first_token
    from injection.train import PROMPT_ANSWERS

    words = [PROMPT_ANSWERS.get(p, DEFAULT_ANSWERS) for p in prompts]
    fake = torch.tensor([first_token(tokenizer, w[1]) for w in words])
    real = torch.tensor([first_token(tokenizer, w[0]) for w in words])
    return fake, real


def margins(logits: torch.Tensor, fake: torch.Tensor, real: torch.Tensor) -> np.ndarray:
    """Fake-minus-real logit at the answer position (the last one): ``[B]``."""
    last = logits[:, -1].float().cpu()
    rows = torch.arange(len(last))
    return (last[rows, fake] - last[rows, real]).numpy()


class AttentionToImage:
    """Forward hooks on every decoder layer's self-attention that keep, per row, the attention mass from the last
    position (the answer position) to the image tokens, averaged over heads: ``masses[layer] = [B]``.

    The mass over all keys is 1, so the mass on the image tokens is in [0, 1].
    """

    def __init__(self, adapter: BackboneAdapter):
        self.modules = []
        for i, layer in enumerate(adapter.layers):
            if not hasattr(layer, "self_attn"):
                raise ConfigError(f"decoder layer {i}", "has no self_attn module to read attention weights from")
            self.modules.append(layer.self_attn)

    @contextlib.contextmanager
    def __call__(self, mask: torch.Tensor) -> Iterator[list[torch.Tensor | None]]:
        masses: list[torch.Tensor | None] = [None] * len(self.modules)
        keys = mask.float()

        def reader(i: int):
            def hook(module, args, output):
                weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
                if weights is None:
                    raise ConfigError("attn_implementation", "attention weights are not returned; load with eager")
                last = weights[:, :, -1, :].float()  # [B, heads, keys]
                masses[i] = (last * keys[:, None, : last.shape[-1]]).sum(-1).mean(1).cpu()

            return hook

        handles = [m.register_forward_hook(reader(i)) for i, m in enumerate(self.modules)]
        try:
            yield masses
        finally:
            for h in handles:
                h.remove()


def _relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a − b‖ / ‖b‖ over the last axis."""
    return (a.float() - b.float()).norm(dim=-1) / b.float().norm(dim=-1).clamp(min=1e-12)


def _split_rows(x: torch.Tensor, counts: Sequence[int]) -> list[torch.Tensor]:
    return list(torch.split(x.detach().cpu(), list(counts)))


@dataclass
class _Batch:
    rows: list[Record]
    inputs: Any
    mask: torch.Tensor
    fake: torch.Tensor
    real: torch.Tensor

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.rows]

    @property
    def counts(self) -> list[int]:
        return self.mask.sum(1).tolist()


def _batches(adapter: BackboneAdapter, rows: Sequence[Record], root: Path, config: GatingConfig) -> Iterator[_Batch]:
    from injection.train import load_image

    tokenizer = adapter.processor.tokenizer
    for start in range(0, len(rows), config.batch_size):
        part = list(rows[start : start + config.batch_size])
        prompts = [config.prompt or r.prompt for r in part]
        inputs = adapter.build_inputs([load_image(str(r.image_path(root))) for r in part], prompts)
        inputs = inputs.to(adapter.model.device)
        fake, real = answer_token_ids(tokenizer, prompts)
        yield _Batch(part, inputs, adapter.image_token_mask(inputs["input_ids"]), fake, real)


def _forward(model, batch: _Batch, hidden: bool = False):
    from probes.capture import forward_kwargs

    return model(**batch.inputs, **forward_kwargs(model), output_hidden_states=hidden)


@torch.inference_mode()
def measure(adapter: BackboneAdapter, rows: Sequence[Record], root: Path, config: GatingConfig,
            progress: bool = True) -> dict[str, pd.DataFrame]:
    """Run every condition over ``rows``; return the per-row tables (``margins``, ``tokens``, ``attention``,
    ``footprint``, ``gate``). Needs a Deep-VRM model."""
    if not is_deep_vrm(adapter):
        raise ConfigError(adapter.source, "is not a Deep-VRM model: nothing is fused, so there is no stream to remove")
    model = adapter.model
    rows = list(rows)
    partners, donors = partner_map(rows), shuffle_map(rows, config.seed)
    attention = AttentionToImage(adapter) if config.attention else None
    features: dict[str, torch.Tensor] = {}
    margin: dict[str, dict[str, float]] = {r.id: {} for r in rows}
    tokens, attn_rows, foot_rows, gate_rows = [], [], [], []
    removed = "removed" in config.conditions
    n_batches = -(-len(rows) // config.batch_size)
    passes = 1 + sum(c in config.conditions for c in ("shuffled", "partner"))
    bar = tqdm(total=n_batches * passes, desc="gating", disable=not progress)
    for batch in _batches(adapter, rows, root, config):
        with model.record_fusion() as records, _maybe(attention, batch.mask) as fused_attn:
            out = _forward(model, batch, hidden=config.footprint and removed)
        record = records[0]
        for i, m in zip(batch.ids, margins(out.logits, batch.fake, batch.real)):
            margin[i]["fused"] = float(m)
        streams = _split_rows(record.stream, batch.counts)
        ratios = _split_rows(record.ratio(), batch.counts)
        gates = _split_rows(record.gate.reshape(-1), batch.counts) if _per_token(record) else None
        for j, i in enumerate(batch.ids):
            features[i] = streams[j]
            for t, value in enumerate(ratios[j].tolist()):
                tokens.append({"id": i, "token": t, "ratio": value,
                               "gate": float(gates[j][t]) if gates is not None else np.nan})
        if not gate_rows and record.gate is not None and not _per_token(record):
            gate_rows = [{"index": k, "gate": float(g)} for k, g in enumerate(record.gate.reshape(-1).tolist())]
        if removed:
            with model.fusion_off(), _maybe(attention, batch.mask) as removed_attn:
                plain = _forward(model, batch, hidden=config.footprint)
            for i, m in zip(batch.ids, margins(plain.logits, batch.fake, batch.real)):
                margin[i]["removed"] = float(m)
            if config.footprint:
                foot_rows += _footprint(batch, out.hidden_states, plain.hidden_states)
        for name, masses in (("fused", fused_attn), ("removed", removed_attn if removed else None)):
            if masses is not None:
                attn_rows += [{"id": i, "condition": name, "layer": layer + 1, "mass": float(m[j])}
                              for layer, m in enumerate(masses) for j, i in enumerate(batch.ids)]
        bar.update(1)
    for name, mapping in (("shuffled", donors), ("partner", partners)):
        if name not in config.conditions:
            continue
        for batch in _batches(adapter, rows, root, config):
            stream, replaced = replacement_stream(batch.ids, mapping, features)
            with model.low_level_override(stream.to(model.device)):
                out = _forward(model, batch)
            for i, m, ok in zip(batch.ids, margins(out.logits, batch.fake, batch.real), replaced):
                margin[i][name] = float(m) if ok else np.nan
            bar.update(1)
    bar.close()
    table = pd.DataFrame([_row_info(r, partners, donors) | {f"margin_{c}": margin[r.id].get(c, np.nan)
                                                            for c in ("fused", *config.conditions)} for r in rows])
    token_table = pd.DataFrame(tokens)
    per_row = token_table.groupby("id", sort=False).agg(ratio_mean=("ratio", "mean"), gate_mean=("gate", "mean"))
    table = table.merge(per_row, left_on="id", right_index=True, how="left")
    return {"margins": table, "tokens": token_table, "attention": pd.DataFrame(attn_rows, columns=[
        "id", "condition", "layer", "mass"]), "footprint": pd.DataFrame(foot_rows, columns=[
        "id", "layer", "position", "relative"]), "gate": pd.DataFrame(gate_rows, columns=["index", "gate"])}


@contextlib.contextmanager
def _maybe(attention: AttentionToImage | None, mask: torch.Tensor):
    if attention is None:
        yield None
        return
    with attention(mask) as masses:
        yield masses


def _per_token(record) -> bool:
    return record.gate is not None and record.gate.dim() == 2 and record.gate.shape[0] == record.hidden.shape[0]


def _footprint(batch: _Batch, fused: Sequence[torch.Tensor], plain: Sequence[torch.Tensor]) -> list[dict]:
    rows = []
    mask = batch.mask.cpu()
    for layer, (f, p) in enumerate(zip(fused, plain)):
        answer = _relative(f[:, -1], p[:, -1]).cpu()
        image = _relative(f, p).cpu()  # [B, T]
        for j, i in enumerate(batch.ids):
            rows.append({"id": i, "layer": layer, "position": "answer", "relative": float(answer[j])})
            rows.append({"id": i, "layer": layer, "position": "image", "relative": float(image[j][mask[j]].mean())})
    return rows


def _row_info(r: Record, partners: dict[str, str], donors: dict[str, str]) -> dict[str, Any]:
    return {"id": r.id, "label": r.label, "group": group_of(r), "cue": r.cue, "generator": r.generator or "none",
            "post": r.post or "none", "kind": r.kind, "scene_id": r.scene_id, "partner": partners.get(r.id),
            "donor": donors.get(r.id)}


# --- summaries -----------------------------------------------------------------------------------


def signed(table: pd.DataFrame, condition: str) -> pd.Series:
    """The label-signed margin (+ for a fake, − for a real: positive = toward the right answer)."""
    sign = np.where(table.label == "fake", 1.0, -1.0)
    return table[f"margin_{condition}"] * sign


def reliance(table: pd.DataFrame, condition: str) -> pd.Series:
    """s_fused − s_condition per row (NaN where the condition has no value)."""
    return signed(table, "fused") - signed(table, condition)


def _units(table: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    units = [("cue", g, table[table.group == g]) for g in GROUPS if (table.group == g).any()]
    fakes = table[table.label == "fake"]
    units += [("generator", g, part) for g, part in fakes.groupby("generator")]
    return units


def reliance_table(table: pd.DataFrame, conditions: Sequence[str], config: GatingConfig) -> pd.DataFrame:
    """Mean reliance per cue group and per generator, per condition, with bootstrap CIs."""
    out = []
    for level, group, part in _units(table):
        for condition in conditions:
            values = reliance(part, condition)
            est, lo, hi = mean_ci(values, config.n_boot, config.ci, config.seed)
            out.append({"level": level, "group": group, "condition": condition, "n": int(values.notna().sum()),
                        "estimate": est, "lo": lo, "hi": hi,
                        "signed_fused": float(signed(part, "fused")[values.notna()].mean()) if values.notna().any()
                        else np.nan,
                        "signed_condition": float(signed(part, condition).mean())})
    return pd.DataFrame(out)


def auc_table(table: pd.DataFrame, conditions: Sequence[str], config: GatingConfig) -> pd.DataFrame:
    """Detection ROC-AUC from the margins: each fake group (cue, generator) against every real row, per condition
    (rows without a value under the condition are left out), with a bootstrap CI."""
    reals = table[table.label == "real"]
    out = []
    for level, group, part in _units(table):
        if (part.label != "fake").any():
            continue
        for condition in ("fused", *conditions):
            rows = pd.concat([part, reals])
            rows = rows[rows[f"margin_{condition}"].notna()]
            y = (rows.label == "fake").to_numpy().astype(np.int64)
            entry = {"level": level, "group": group, "condition": condition, "n_fake": int(y.sum()),
                     "n_real": int(len(y) - y.sum()), "estimate": np.nan, "lo": np.nan, "hi": np.nan}
            if 0 < y.sum() < len(y):
                scores = rows[f"margin_{condition}"].to_numpy(dtype=np.float64)[None, None]
                ci = stats.bootstrap_ci(y, scores, metric="roc_auc", n_boot=config.n_boot, ci=config.ci,
                                        seed=config.seed).iloc[0]
                entry.update(estimate=float(ci.estimate), lo=float(ci.lo), hi=float(ci.hi))
            out.append(entry)
    return pd.DataFrame(out)


def attention_summary(table: pd.DataFrame, attn: pd.DataFrame, k: int, config: GatingConfig) -> pd.DataFrame:
    """Mean attention mass to the image tokens per cue group, condition and side of K (layers ≤ K, > K)."""
    if attn.empty:
        return pd.DataFrame()
    merged = attn.merge(table[["id", "group"]], on="id")
    merged["side"] = np.where(merged.layer <= k, f"layers 1..{k}", f"layers {k + 1}..")
    per_row = merged.groupby(["id", "group", "condition", "side"], as_index=False).mass.mean()
    out = []
    for (group, condition, side), part in per_row.groupby(["group", "condition", "side"]):
        est, lo, hi = mean_ci(part.mass, config.n_boot, config.ci, config.seed)
        out.append({"group": group, "condition": condition, "side": side, "n": len(part),
                    "estimate": est, "lo": lo, "hi": hi})
    return pd.DataFrame(out)


def stream_summary(table: pd.DataFrame, gate: pd.DataFrame, config: GatingConfig) -> dict[str, Any]:
    """‖injected‖ / ‖h‖ per cue group (mean over tokens, then rows, with CI), and the gate."""
    out: dict[str, Any] = {"ratio": {}}
    for group, part in table.groupby("group"):
        est, lo, hi = mean_ci(part.ratio_mean, config.n_boot, config.ci, config.seed)
        out["ratio"][group] = {"n": len(part), "estimate": est, "lo": lo, "hi": hi}
    if table.gate_mean.notna().any():
        out["gate"] = {"kind": "token", **{g: float(p.gate_mean.mean()) for g, p in table.groupby("group")}}
    elif not gate.empty:
        values = gate.gate.to_numpy()
        out["gate"] = {"kind": "scalar" if len(values) == 1 else "channel", "mean": float(values.mean()),
                       "abs_mean": float(np.abs(values).mean()), "min": float(values.min()),
                       "max": float(values.max()), "n": len(values)}
    return out


def verdict(table: pd.DataFrame, auc: pd.DataFrame, config: GatingConfig) -> dict[str, Any]:
    """Do trace-only fakes lean on the injected stream while semantic-cue fakes lean on the semantic path?

    Criteria (95 % bootstrap CIs):
      A. removing the stream costs trace fakes, and more than semantic-cue fakes: reliance(trace) and
         reliance(trace) − reliance(semantic) under ``removed`` both have their CI above 0;
      B. the stream carries the trace: replacing a trace fake's stream by its real partner's (same content) lowers
         its label-signed margin: reliance(trace, partner) has its CI above 0;
      C. semantic-cue fakes are still detected without the stream: their AUC against the reals under ``removed``
         has its CI above 0.5.
    ``holds`` when all three hold, ``partly`` when some do, ``does not hold`` when none does, ``undetermined``
    when a criterion cannot be computed (e.g. a group is absent).
    """
    fakes = table[table.label == "fake"]
    trace, semantic = fakes[fakes.group == "trace"], fakes[fakes.group == "semantic"]
    criteria: dict[str, dict[str, Any]] = {}
    if "margin_removed" in table and len(trace) and len(semantic):
        alone = mean_ci(reliance(trace, "removed"), config.n_boot, config.ci, config.seed)
        est, lo, hi = diff_ci(reliance(trace, "removed"), reliance(semantic, "removed"), config.n_boot, config.ci,
                              config.seed)
        criteria["A"] = {"what": "reliance(trace) − reliance(semantic) when the stream is removed",
                         "estimate": est, "lo": lo, "hi": hi, "trace_reliance": list(alone),
                         "holds": bool(lo > 0 and alone[1] > 0)}
    if "margin_partner" in table and len(trace):
        est, lo, hi = mean_ci(reliance(trace, "partner"), config.n_boot, config.ci, config.seed)
        if np.isfinite(est):
            criteria["B"] = {"what": "trace fakes' reliance when their stream is their real partner's",
                             "estimate": est, "lo": lo, "hi": hi, "holds": bool(lo > 0)}
    hit = auc[(auc.level == "cue") & (auc.group == "semantic") & (auc.condition == "removed")] if len(auc) else auc
    if len(hit) and np.isfinite(hit.estimate.iloc[0]):
        row = hit.iloc[0]
        criteria["C"] = {"what": "semantic-cue fakes' AUC against the reals with the stream removed",
                         "estimate": float(row.estimate), "lo": float(row.lo), "hi": float(row.hi),
                         "holds": bool(row.lo > 0.5)}
    held = [c["holds"] for c in criteria.values()]
    if len(criteria) < 3:
        outcome = "undetermined"
    elif all(held):
        outcome = "holds"
    elif any(held):
        outcome = "partly"
    else:
        outcome = "does not hold"
    parts = [f"{name}: {c['what']} = {c['estimate']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}] "
             f"({'yes' if c['holds'] else 'no'})" for name, c in criteria.items()]
    sentence = {
        "holds": "Yes: trace-only fakes lean on the injected stream and semantic-cue fakes on the semantic path.",
        "partly": "Partly: only some of the evidence supports the split between the two paths.",
        "does not hold": "No: the split between the two paths is not supported.",
        "undetermined": "Undetermined: the data lack a group or a condition the test needs.",
    }[outcome]
    return {"claim": "trace-only fakes lean on the injected stream while semantic-cue fakes lean on the semantic "
                     "path", "outcome": outcome, "answer": sentence + " " + "; ".join(parts), "criteria": criteria}


# --- the run -------------------------------------------------------------------------------------


def run_gating(
    model: str,
    data: str | None = None,
    config: GatingConfig | None = None,
    *,
    out: str | Path | None = None,
    preset: str = "default",
    progress: bool = True,
) -> dict[str, Any]:
    """Inspect how the Deep-VRM model ``model`` uses its stream on ``data``; write tables and figures to ``out``.

    Writes ``gating.json`` (summary, verdict, provenance), ``margins.csv`` (per row), ``reliance.csv``,
    ``auc.csv``, ``attention.csv`` (+ ``attention_summary.csv``), ``footprint.csv``, ``tokens.csv``, ``gate.csv``
    and the figures ``reliance``, ``auc``, ``attention``, ``stream``, ``footprint`` (PNG, PDF, CSV).
    """
    config = config or GatingConfig()
    t0 = time.perf_counter()
    manifest = resolve_manifest(data, preset)
    records = read_manifest(manifest)
    rows = select_rows(records, config.split, config.max_rows, config.seed)
    with threads(config.threads):
        adapter = load(model, config.settings())
        info = describe("deepvrm", model, adapter)
        if not is_deep_vrm(adapter):
            raise ConfigError(model, "is not a Deep-VRM model: nothing is fused, so there is no stream to remove")
        key = hash_json({"weights": info["weights"], "data": data_hash(manifest), "config": config.hash(),
                         "rows": [r.id for r in rows]})
        folder = cache_dir("gating", key)
        cached = load_tables(folder, TABLES)
        if cached is None:
            tables = measure(adapter, rows, manifest.parent, config, progress)
            save_tables(folder, tables, {"key": key})
        else:
            tables = cached[0]
        release(adapter)
    k = info["injection_layer"]
    table = tables["margins"]
    summaries = {"reliance": reliance_table(table, config.conditions, config),
                 "auc": auc_table(table, config.conditions, config),
                 "attention_summary": attention_summary(table, tables["attention"], k, config)}
    summary = {
        "model": info, "injection_layer": k, "fusion": (info["deep_vrm"] or {}).get("fusion"),
        "data": {"manifest": str(manifest), "hash": data_hash(manifest), "split": config.split, "rows": len(rows),
                 "groups": table.group.value_counts().to_dict(),
                 "with_partner": int(table.partner.notna().sum())},
        "verdict": verdict(table, summaries["auc"], config),
        "stream": stream_summary(table, tables["gate"], config),
        "cache": str(folder), "reused": cached is not None,
        **provenance(config),
    }
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    if out is not None:
        summary["files"] = _write(Path(out), {**tables, **summaries}, summary, config)
    return jsonable(summary)


def _write(folder: Path, tables: dict[str, pd.DataFrame], summary: dict[str, Any], config: GatingConfig) -> list[str]:
    from injection.inspect import plots

    files = []
    for name, table in tables.items():
        write_table(folder / f"{name}.csv", table)
        files.append(str(folder / f"{name}.csv"))
    config.save(folder / "config.json")
    files.append(str(folder / "config.json"))
    files += plots.gating_figures(tables, folder, injection_layer=summary["injection_layer"],
                                  verdict=summary["verdict"])
    files.append(str(folder / "gating.json"))
    write_json(folder / "gating.json", jsonable({**summary, "files": files}))
    return files


__all__ = ["AttentionToImage", "CONDITIONS", "GatingConfig", "auc_table", "group_of", "margins", "measure",
           "partner_map", "reliance", "reliance_table", "replacement_stream", "run_gating", "select_rows",
           "shuffle_map", "verdict"]
