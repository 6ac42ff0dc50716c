"""Semantic forgetting: base vs naive fine-tune vs Deep-VRM (the paper's Table 2, on our stand-ins).

For each model (``base``, ``naive``, ``deepvrm``; plus Deep-VRM's own starting point, the stage-1 model, when it
is not the base) this measures:

- **held-out semantic QA** (the data folder's ``semantic.jsonl``, object and scene questions): accuracy of the
  generated answer and of the closed-set choice among the class words, as ``injection.evaluate`` scores them;
  our stand-in for BLINK / RealWorldVQA / MME;
- **semantic-probe accuracy per layer**: logistic probes (nested grouped CV, :func:`probes.linear.sweep`) on each
  model's own activations, for the probe tasks of :mod:`probes.tasks` (``semantic``: object class);
- **probe transfer**: the probes fit on the *base* model's activations (each outer fold's training rows, the C
  its nested CV chose) scored on each tuned model's activations of the held-out fold's images: how much of the
  base's semantic code each tuned model still uses;
- **debiased linear CKA per layer** on the image tokens, each tuned model against the base (and Deep-VRM against
  its start), with a bootstrap CI over images (:mod:`injection.inspect.cka`), and the raw drift
  ‖h_tuned − h_ref‖ / ‖h_ref‖.

Layer indices are those of :mod:`probes.capture`: 0 = input of decoder layer 1, i = output of layer i. For a
Deep-VRM model, index K is the output of layer K *before* the fusion (what nnsight reads from ``layers[K-1]``),
so indices 0..K depend only on frozen weights: they must equal its start's exactly. ``frozen_check`` tests this
on a few images captured with the bare prompt ``<image>`` (no word whose embedding row training may have moved),
and reports the drift with the analysis prompt too: training the answer-token embedding rows (``answer_tokens``,
on for mini-VL) moves layers < K where that prompt holds one of those words (``image`` is one); it names them.

Activations come from the activation store (:func:`probes.capture.capture`, reused when present); QA answers and
the final tables are cached under ``<cache>/inspect/`` by the weights' fingerprints, the data and the config.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from injection.inspect import cka as cka_mod
from injection.inspect.common import (
    InspectConfig,
    cache_dir,
    data_hash,
    describe,
    jsonable,
    load,
    load_tables,
    mean_ci,
    provenance,
    release,
    resolve_manifest,
    same_source,
    save_tables,
    start_of,
    threads,
    write_table,
)
from probes import stats
from probes.cache import ActivationStore
from probes.data.manifest import OBJECT_PROMPT, Record, read_manifest
from probes.errors import BadInputError, ConfigError
from probes.linear import DEFAULT_CS, LayerProbe, SweepResult, sweep
from probes.storage import hash_file, hash_json, read_json, write_json, write_text
from probes.tasks import build_task

ROLES = ("base", "naive", "deepvrm", "deepvrm_start")
NEUTRAL_PROMPT = "<image>"  # the frozen-prefix check's prompt: template tokens and the image only
FROZEN_ROWS = 16
ROLE_LABELS = {
    "base": "Backbone (base)",
    "naive": "Full fine-tuning of the LLM on D2 (naive)",
    "deepvrm": "Deep-VRM (ours)",
    "deepvrm_start": "Deep-VRM start (stage 1)",
}
TABLES = ("qa", "probes", "cka")


@dataclass
class ForgettingConfig(InspectConfig):
    """What ``inspect forgetting`` computes; recorded and hashed with its results.

    Args:
        tasks: probe tasks (:mod:`probes.tasks`): ``semantic`` (object class), ``scene``.
        splits: manifest splits whose images are probed and compared (held-out by default).
        positions: probe positions: ``image_mean`` (mean of the image tokens), ``last`` (the answer position).
        prompt: the question every image is captured with (default: the object question); ``None``: each
            row's own (the forensic prompt).
        cka_images: images for CKA (a seeded sample of the probed ones); ``None``: all of them.
        cka_groups: a manifest column for a cluster bootstrap of CKA (e.g. ``source_id``); ``None``: images.
        qa_split, qa_max_rows, qa_max_new_tokens: the semantic QA rows (``semantic.jsonl``) and answer length.
        seeds, n_folds, inner_folds, Cs: the probes' nested grouped CV (:func:`probes.linear.sweep`).
        n_boot, ci, seed: bootstrap draws, coverage and seed (CIs of accuracies, probes and CKA).
        store_dtype: dtype of the captured activations (float32 keeps exact zero drift visible).
    """

    tasks: tuple[str, ...] = ("semantic",)
    splits: tuple[str, ...] = ("val", "test")
    positions: tuple[str, ...] = ("image_mean", "last")
    prompt: str | None = OBJECT_PROMPT
    cka_images: int | None = 400
    cka_groups: str | None = None
    qa_split: str = "test"
    qa_max_rows: int | None = None
    qa_max_new_tokens: int = 4
    seeds: tuple[int, ...] = (0,)
    n_folds: int = 5
    inner_folds: int = 3
    Cs: tuple[float, ...] = DEFAULT_CS
    n_boot: int = 1000
    ci: float = 0.95
    seed: int = 0
    store_dtype: str = "float32"
    dtype: str = "float32"
    attn: str = "sdpa"
    device: str = "cpu"
    batch_size: int = 16
    threads: int | None = None

    _tuple_fields = ("tasks", "splits", "positions", "seeds", "Cs")

    def __post_init__(self):
        super().__post_init__()
        unknown = [p for p in self.positions if p not in ("image_mean", "last")]
        if unknown or not self.positions:
            raise ConfigError(f"positions={list(self.positions)}", "use image_mean and/or last")
        if self.cka_images is not None and self.cka_images < 4:
            raise ConfigError(f"cka_images={self.cka_images}", "need at least 4 images")


# --- the run -------------------------------------------------------------------------------------


def run_forgetting(
    models: dict[str, str | None],
    data: str | None = None,
    config: ForgettingConfig | None = None,
    *,
    out: str | Path | None = None,
    preset: str = "default",
    progress: bool = True,
) -> dict[str, Any]:
    """Compare ``models`` (role → source: ``base`` and at least one of ``naive``, ``deepvrm``) on ``data``.

    Writes to ``out`` (when given): ``forgetting.json`` (summary, provenance), ``table2.csv`` / ``table2.md``,
    ``qa.csv``, ``probes.csv``, ``cka.csv`` and ``forgetting.png`` / ``.pdf`` (with its numbers as CSV).
    Returns the summary.
    """
    config = config or ForgettingConfig()
    t0 = time.perf_counter()
    roles = _roles(models)
    manifest = resolve_manifest(data, preset)
    records = read_manifest(manifest)
    tasks = {name: _task(name, records, config) for name in config.tasks}
    rows = sorted({int(i) for t in tasks.values() for i in t.rows})
    if not rows:
        raise BadInputError(manifest, f"no rows for the tasks {list(config.tasks)} in splits {list(config.splits)}")
    subset = [records[i] for i in rows]
    with threads(config.threads):
        reference = frozen_reference(roles)
        checked = {"deepvrm", reference} if reference else set()
        captured = {role: _model_pass(role, source, subset, manifest.parent, config, progress, role in checked)
                    for role, source in roles.items()}
        infos = {role: c["info"] for role, c in captured.items()}
        key = hash_json({"config": config.hash(), "data": data_hash(manifest),
                         "models": {r: i["weights"] for r, i in infos.items()},
                         "stores": {r: c["store"] for r, c in captured.items()}})
        folder = cache_dir("forgetting", key)
        cached = load_tables(folder, TABLES)
        if cached is None:
            tables = {"qa": pd.concat([c["qa"] for c in captured.values()], ignore_index=True),
                      "probes": _probe_tables(tasks, rows, records, captured, config, progress),
                      "cka": _cka_table(rows, records, captured, infos, config, progress)}
            save_tables(folder, tables, {"key": key})
        else:
            tables = cached[0]
    k = next((i["injection_layer"] for i in infos.values() if i["injection_layer"]), None)
    summary = {
        "models": infos,
        "injection_layer": k,
        "data": {"manifest": str(manifest), "hash": data_hash(manifest), "rows": len(rows),
                 "tasks": {n: {"n": len(t), "classes": list(t.classes), "counts": t.counts} for n, t in tasks.items()}},
        "frozen_check": frozen_check(tables["cka"], infos, captured, reference),
        "table2": [],
        "cache": str(folder),
        "reused": cached is not None,
        **provenance(config),
    }
    table2 = table_two(tables, infos, manifest)
    summary["table2"] = jsonable(table2.to_dict(orient="records"))
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    if out is not None:
        summary["files"] = write_outputs(Path(out), tables, table2, summary, config)
    return jsonable(summary)


def _roles(models: dict[str, str | None]) -> dict[str, str]:
    roles = {r: str(s) for r, s in models.items() if s}
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ConfigError(f"roles {unknown}", f"use {list(ROLES[:3])}")
    if "base" not in roles or len(roles) < 2:
        raise ConfigError("models", "need --base and at least one of --naive, --deepvrm")
    if "deepvrm" in roles and "deepvrm_start" not in roles:
        start = start_of(roles["deepvrm"])
        if start is not None and not same_source(start, roles["base"]):
            roles["deepvrm_start"] = start
    return roles


def frozen_reference(roles: dict[str, str]) -> str | None:
    """The role Deep-VRM's layers ≤ K must equal: its start (stage 1), or the base when it started there."""
    if "deepvrm" not in roles:
        return None
    if "deepvrm_start" in roles:
        return "deepvrm_start"
    return "base" if same_source(start_of(roles["deepvrm"]), roles["base"]) else None


def _task(name: str, records: Sequence[Record], config: ForgettingConfig):
    from probes.layerwise import MIN_GROUPS_PER_CLASS

    task, _ = build_task(name, records, config.splits).without_thin_classes(MIN_GROUPS_PER_CLASS)
    return task


# --- one model: capture, QA, prompt embeddings ----------------------------------------------------


def _model_pass(role: str, source: str, subset: list[Record], root: Path, config: ForgettingConfig,
                progress: bool, frozen: bool = False) -> dict[str, Any]:
    """Load one model; capture its activations (reused when stored) and answer the QA rows (cached); with
    ``frozen``, also capture a few images with the neutral prompt for the frozen-prefix check."""
    from probes.capture import capture

    adapter = load(source, config.settings())
    info = describe(role, source, adapter)
    report = capture(adapter, subset, root, positions=config.positions, per_token=True, prompt=config.prompt,
                     batch_size=config.batch_size, store_dtype=config.store_dtype, progress=progress)
    out = {"info": info, "store": report.store, "qa": qa_table(semantic_qa(adapter, root, config, progress), role,
                                                                config),
           "embeddings": prompt_embeddings(adapter, subset[0], root, config.prompt)}
    if frozen:
        out["neutral_store"] = capture(adapter, subset[:FROZEN_ROWS], root, positions=["image_mean"], per_token=True,
                                       prompt=NEUTRAL_PROMPT, batch_size=config.batch_size, store_dtype="float32",
                                       progress=False).store
    release(adapter)
    return out


def semantic_qa(adapter, root: Path, config: ForgettingConfig, progress: bool = True) -> pd.DataFrame:
    """One row per held-out semantic question: the generated answer, whether it is right, the closed-set
    choice (:func:`injection.evaluate.semantic_rows`). Cached by weights, data and settings."""
    from injection.evaluate import read_eval_set, semantic_rows

    semantic_file = root / "semantic.jsonl"
    if not semantic_file.is_file():
        return pd.DataFrame(columns=["id", "question", "correct", "closed_set_correct"])
    key = hash_json({"weights": adapter.weights_fingerprint(), "semantic": hash_file(semantic_file),
                     "split": config.qa_split, "max_rows": config.qa_max_rows, "seed": config.seed,
                     "max_new_tokens": config.qa_max_new_tokens, "dtype": config.dtype})
    folder = cache_dir("semantic-qa", key)
    cached = load_tables(folder, ["rows"])
    if cached is not None:
        return cached[0]["rows"]
    data = read_eval_set(root, split=config.qa_split)
    if config.qa_max_rows is not None and config.qa_max_rows < len(data.semantic):
        keep = np.sort(np.random.default_rng(config.seed).choice(len(data.semantic), config.qa_max_rows, replace=False))
        data.semantic = [data.semantic[i] for i in keep]
    rows = pd.DataFrame(semantic_rows(adapter, data, config.batch_size, config.qa_max_new_tokens, progress))
    save_tables(folder, {"rows": rows}, {"key": key, "n": len(rows)})
    return rows


def qa_table(rows: pd.DataFrame, role: str, config: ForgettingConfig) -> pd.DataFrame:
    """Accuracy (generated answer) and closed-set accuracy with bootstrap CIs, per question and overall."""
    out = []
    groups = [("all", rows)] + [(q, part) for q, part in rows.groupby("question")] if len(rows) else []
    for question, part in groups:
        for metric, column in (("accuracy", "correct"), ("closed_set_accuracy", "closed_set_correct")):
            values = pd.to_numeric(part[column], errors="coerce").astype(float)
            est, lo, hi = mean_ci(values, config.n_boot, config.ci, config.seed)
            out.append({"role": role, "question": question, "metric": metric, "n": int(values.notna().sum()),
                        "estimate": est, "lo": lo, "hi": hi})
    return pd.DataFrame(out, columns=["role", "question", "metric", "n", "estimate", "lo", "hi"])


def prompt_embeddings(adapter, record: Record, root: Path, prompt: str | None) -> dict[str, list[float]]:
    """The input-embedding rows of the tokens the capture prompt puts around the image (for ``frozen_check``)."""
    from injection.train import load_image

    inputs = adapter.build_inputs([load_image(str(record.image_path(root)))], [prompt or record.prompt])
    ids = inputs["input_ids"][0]
    ids = sorted(set(ids[~adapter.image_token_mask(ids)].tolist()))
    weight = adapter.model.get_input_embeddings().weight.detach()
    tokens = adapter.processor.tokenizer.convert_ids_to_tokens(ids)
    return {f"{t}#{i}": weight[i].float().cpu().numpy() for t, i in zip(tokens, ids)}


# --- probes --------------------------------------------------------------------------------------


def _store_rows(store_path: str, ids: list[str], position: str) -> np.ndarray:
    store = ActivationStore.open(store_path)
    stored, X = store.load(position)
    where = {row_id: i for i, row_id in enumerate(stored)}
    missing = [i for i in ids if i not in where]
    if missing:
        raise BadInputError(missing[0], f"not in the activation store {store_path} ({len(missing)} rows missing)")
    index = np.array([where[i] for i in ids], dtype=np.int64)
    return np.asarray(X[index], dtype=np.float32)


def _probe_tables(tasks, rows, records, captured, config, progress) -> pd.DataFrame:
    ids_of = [records[i].id for i in rows]
    out = []
    jobs = [(name, position) for name in tasks for position in config.positions]
    for name, position in tqdm(jobs, desc="forgetting probes", disable=not progress):
        task = tasks[name]
        ids = [records[i].id for i in task.rows]
        assert set(ids) <= set(ids_of)
        X = {role: _store_rows(c["store"], ids, position) for role, c in captured.items()}
        own, transfer = probe_transfer(X, task.labels, task.groups, config)
        layers = list(range(next(iter(X.values())).shape[1]))
        for role in X:
            for kind, scores in (("own", own[role].scores), ("transfer", transfer[role])):
                ci = stats.bootstrap_ci(own["base"].labels, scores, metric="accuracy", n_boot=config.n_boot,
                                        ci=config.ci, seed=config.seed, layers=layers)
                out.append(ci.assign(role=role, kind=kind, task=name, position=position))
    return pd.concat(out, ignore_index=True)


def probe_transfer(X: dict[str, np.ndarray], y: np.ndarray, groups: np.ndarray, config) -> tuple[
        dict[str, SweepResult], dict[str, np.ndarray]]:
    """Own probes of every model, and the base model's probes scored on every model.

    ``X``: role → activations ``[n, L, D]`` of the same rows (``base`` required). Every model's own sweep uses the
    base's outer folds (paired comparison). The transferred probe of (layer, seed, fold) is a
    :class:`~probes.linear.LayerProbe` with the C the base's nested CV chose, refit on the base's activations
    of the fold's training rows; it scores the held-out rows of each model. Returns the sweeps and the
    out-of-fold transfer scores ``[S, L, n]`` (binary) or ``[S, L, n, K]`` per role (``base``: its own refit).
    """
    from probes.layerwise import _folds

    outer, inner = _folds(_FoldSpec(y, groups), config)
    options = dict(n_folds=outer, seeds=config.seeds, Cs=config.Cs, inner_folds=inner)
    base = sweep(X["base"], y, groups, **options)
    own = {"base": base}
    for role, x in X.items():
        if role != "base":
            own[role] = sweep(x, y, groups, folds=base.folds, **options)
    transfer = {role: np.full(base.scores.shape, np.nan) for role in X}
    binary = base.scores.ndim == 3
    for row in base.table.itertuples():
        s = list(base.seeds).index(row.seed)
        layer = base.layers.index(row.layer)
        test = base.folds[s] == row.fold
        probe = LayerProbe(C=row.C, dtype="float64").fit(X["base"][~test, layer], y[~test])
        for role, x in X.items():
            p = probe.predict_proba(x[test, layer])
            transfer[role][s, layer, test] = p[:, 1] if binary else p
    return own, transfer


@dataclass
class _FoldSpec:
    """What ``probes.layerwise._folds`` reads of a task."""

    labels: np.ndarray
    groups: np.ndarray

    def groups_per_class(self) -> dict[int, int]:
        return {int(c): len(set(self.groups[self.labels == c])) for c in np.unique(self.labels)}


# --- CKA and drift -------------------------------------------------------------------------------


def comparisons(infos: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """(reference, model) pairs: every tuned model against the base; Deep-VRM against its start too."""
    pairs = [("base", role) for role in ("naive", "deepvrm", "deepvrm_start") if role in infos]
    if "deepvrm_start" in infos:
        pairs.append(("deepvrm_start", "deepvrm"))
    return pairs


def _cka_table(rows, records, captured, infos, config, progress) -> pd.DataFrame:
    ids = [records[i].id for i in rows]
    if config.cka_images is not None and config.cka_images < len(ids):
        keep = np.sort(np.random.default_rng(config.seed).choice(len(ids), config.cka_images, replace=False))
        ids = [ids[i] for i in keep]
    groups = None
    if config.cka_groups:
        by_id = {r.id: r for r in records}
        groups = np.array([str(getattr(by_id[i], config.cka_groups, None) or by_id[i].extra.get(config.cka_groups))
                           for i in ids])
    tokens = {role: _store_rows(c["store"], ids, "image_tokens") for role, c in captured.items()}
    pairs = comparisons(infos)
    n_layers = next(iter(tokens.values())).shape[1]
    bar = tqdm(total=len(pairs) * n_layers, desc="forgetting CKA", disable=not progress)
    out = []
    for ref in dict.fromkeys(r for r, _ in pairs):
        models = {role: tokens[role] for r, role in pairs if r == ref}
        table = cka_mod.layer_cka(tokens[ref], models, n_boot=config.n_boot, ci=config.ci, seed=config.seed,
                                  groups=groups, progress=bar)
        for role in models:
            moved = cka_mod.drift(tokens[ref], tokens[role])
            part = table[table.model == role].drop(columns="model")
            out.append(part.merge(moved, on="layer").assign(reference=ref, model=role, pair=f"{ref}→{role}",
                                                             n_images=len(ids)))
    bar.close()
    return pd.concat(out, ignore_index=True)


def frozen_check(cka: pd.DataFrame, infos: dict[str, dict[str, Any]], captured: dict[str, Any],
                 reference: str | None) -> dict[str, Any]:
    """Deep-VRM's layers ≤ K (indices 0..K, K before the fusion) against its start: zero drift expected.

    ``zero_drift`` and ``max_abs_drift`` come from the neutral-prompt capture (exact: the layers' weights);
    ``with_capture_prompt`` is the drift with the analysis prompt, and why it is not zero when it is not.
    """
    if "deepvrm" not in infos or not infos["deepvrm"]["injection_layer"]:
        return {"applicable": False, "why": "no Deep-VRM model"}
    if reference is None:
        return {"applicable": False, "why": "Deep-VRM's start is unknown (no train.json)"}
    k = infos["deepvrm"]["injection_layer"]
    ids = ActivationStore.open(captured["deepvrm"]["neutral_store"]).ids
    neutral = cka_mod.drift(*(_store_rows(captured[r]["neutral_store"], ids, "image_tokens")
                              for r in (reference, "deepvrm")))
    neutral = neutral[neutral.layer <= k]
    part = cka[(cka.reference == reference) & (cka.model == "deepvrm") & (cka.layer <= k)].sort_values("layer")
    out = {"applicable": True, "reference": reference, "injection_layer": k, "layers": f"0..{k}",
           "zero_drift": bool((neutral.max_abs == 0).all()), "max_abs_drift": float(neutral.max_abs.max()),
           "neutral_prompt": NEUTRAL_PROMPT, "images": len(ids)}
    prompt = {"max_abs_drift": float(part.max_abs.max()), "max_relative_drift": float(part.relative.max()),
              "min_cka": float(part.estimate.min())}
    if prompt["max_abs_drift"]:
        a, b = captured[reference]["embeddings"], captured["deepvrm"]["embeddings"]
        changed = sorted(t for t in a if t in b and not np.array_equal(a[t], b[t]))
        prompt["first_layer_with_drift"] = int(part[part.max_abs > 0].layer.iloc[0])
        prompt["changed_prompt_embeddings"] = changed
        prompt["why"] = (f"training changed the input-embedding rows of prompt tokens {changed} (answer_tokens)"
                         if changed else "layers below K changed: they were not frozen")
    out["with_capture_prompt"] = prompt
    if not out["zero_drift"]:
        out["first_layer_with_drift"] = int(neutral[neutral.max_abs > 0].layer.iloc[0])
    return out


# --- table 2 ---------------------------------------------------------------------------------------


def table_two(tables: dict[str, pd.DataFrame], infos: dict[str, dict[str, Any]], manifest: Path) -> pd.DataFrame:
    """One row per model, as the paper's Table 2 (config × benchmarks), with representation columns added:
    held-out semantic QA (object, scene, closed set), the final layer's own and transferred probe accuracy,
    CKA to the base at the final layer and its minimum over layers, and detection (test accuracy, AUC) from an
    ``eval.json`` of the same weights found beside the models (:func:`eval_files`)."""
    qa, probes, cka = tables["qa"], tables["probes"], tables["cka"]
    evals = eval_files([i["source"] for i in infos.values()])
    rows = []
    for role, info in infos.items():
        row: dict[str, Any] = {"role": role, "config": ROLE_LABELS[role]}
        for question in ("object", "scene", "all"):
            hit = qa[(qa.role == role) & (qa.question == question) & (qa.metric == "accuracy")]
            row[f"qa_{question}"] = float(hit.estimate.iloc[0]) if len(hit) else float("nan")
        hit = qa[(qa.role == role) & (qa.question == "all") & (qa.metric == "closed_set_accuracy")]
        row["qa_closed_set"] = float(hit.estimate.iloc[0]) if len(hit) else float("nan")
        for kind in ("own", "transfer"):
            part = probes[(probes.role == role) & (probes.kind == kind)]
            for (task, position), p in part.groupby(["task", "position"]):
                row[f"probe_{kind}_{task}_{position}"] = float(p.sort_values("layer").estimate.iloc[-1])
        part = cka[(cka.reference == "base") & (cka.model == role)].sort_values("layer")
        row["cka_final"] = float(part.estimate.iloc[-1]) if len(part) else (1.0 if role == "base" else float("nan"))
        row["cka_min"] = float(part.estimate.min()) if len(part) else (1.0 if role == "base" else float("nan"))
        row.update(_detection(info["weights"], manifest, evals))
        rows.append(row)
    return pd.DataFrame(rows)


def eval_files(sources: Sequence[str]) -> list[Path]:
    """``eval.json`` files left beside the models: ``<model>/eval/`` (``eval``'s default) and
    ``<model>/../eval/*/`` (a recipe's evaluation folder)."""
    found: list[Path] = []
    for source in sources:
        folder = Path(source)
        if folder.is_dir():
            found += [folder / "eval" / "eval.json", *sorted(folder.parent.glob("eval/*/eval.json"))]
    return [f for f in dict.fromkeys(found) if f.is_file()]


def _detection(weights: str, manifest: Path, evals: Sequence[Path]) -> dict[str, float]:
    """Test-split accuracy and AUC on this data set from a cached ``eval.json`` of the same weights."""
    for path in evals:
        summary = read_json(path)
        result = summary.get("datasets", {}).get(manifest.parent.name)
        if summary.get("weights") == weights and result and summary.get("settings", {}).get("split") == "test":
            return {"detection_accuracy": result.get("accuracy"), "detection_auc": result.get("auc")}
    return {}


def markdown_table(table: pd.DataFrame) -> str:
    """Table 2 as Markdown (3 decimals)."""
    columns = [c for c in table.columns if c != "role"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in table.iterrows():
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in (row[c] for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, tables: dict[str, pd.DataFrame], table2: pd.DataFrame, summary: dict[str, Any],
                  config: ForgettingConfig) -> list[str]:
    from injection.inspect.plots import forgetting_figure

    folder = out
    files = []
    for name, table in tables.items():
        write_table(folder / f"{name}.csv", table)
        files.append(str(folder / f"{name}.csv"))
    write_table(folder / "table2.csv", table2)
    write_text(folder / "table2.md", markdown_table(table2))
    config.save(folder / "config.json")
    files += [str(folder / "table2.csv"), str(folder / "table2.md"), str(folder / "config.json")]
    files += forgetting_figure(tables, folder / "forgetting", injection_layer=summary["injection_layer"],
                               frozen=summary["frozen_check"])
    files.append(str(folder / "forgetting.json"))
    write_json(folder / "forgetting.json", jsonable({**summary, "files": files}))
    return files


__all__ = ["ForgettingConfig", "comparisons", "frozen_check", "probe_transfer", "qa_table", "run_forgetting",
           "semantic_qa", "table_two"]
