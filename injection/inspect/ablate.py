"""Ablations of Deep-VRM's stage 2: injection depth K, low-level encoder init, fusion, early layers frozen or not.

Every run is stage 2 of :func:`injection.train.train` from a base :class:`~injection.train.TrainConfig` (the
stage-2 config of the Deep-VRM run, starting from the stage-1 folder) with one change:

- ``depth``: ``injection_layer = K`` for each K of ``depths``;
- ``init``: the low-level encoder a copy of the main one (the base) or ``random`` (the codebase's own
  ``low_level_init="random"``; the random weights are drawn once from ``start_seed`` and saved as a Deep-VRM
  start checkpoint under ``<cache>/inspect/starts/``, so that a resumed run keeps them);
- ``fusion``: ``average`` (official), ``add``, ``gated`` (scalar gate, trained in full);
- ``early``: layers < K frozen (official) or ``trainable``: LoRA on every decoder layer. TrainConfig has no field
  for this, so the run patches :func:`injection.peft_targets.llm_linear_names` while it builds its LoRA
  (:func:`early_layers_trainable`) and says so in ``notes``, which enters its config hash.

Runs are cached by config hash (``<cache>/runs/deepvrm-2-<hash>``) and resumable (``train`` does both); the run
equal to the base config is the base's own folder. Each run is then evaluated with :func:`injection.evaluate.evaluate`
on a seeded, stratified subset of the test split (detection and held-out semantic QA; the subset keeps a full
inspect run short) and its evaluation is cached in the run folder. Training cost is reported apart.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from injection.config import FUSIONS
from injection.inspect.common import (
    InspectConfig,
    cache_dir,
    data_hash,
    jsonable,
    load,
    mean_ci,
    provenance,
    release,
    resolve_manifest,
    run_record,
    threads,
    write_table,
)
from injection.train import TrainConfig, default_injection_layer, is_deep_vrm_checkpoint, run_folder, train
from probes import stats
from probes.data.manifest import Record, read_manifest, write_manifest
from probes.errors import BadInputError, ConfigError
from probes.storage import atomic_dir, hash_json, read_json, write_json

VARIANT_GROUPS = ("init", "fusion", "early")
EARLY_NOTE = "inspect-ablate: early layers trainable (LoRA on every decoder layer, not only layers >= K)"


@dataclass
class AblateConfig(InspectConfig):
    """What ``inspect ablate`` trains and measures; recorded and hashed with its results.

    Args:
        depths: injection depths K of the depth sweep (empty: no sweep).
        variants: ablation groups at the base K: ``init``, ``fusion``, ``early``.
        train: train runs that are not finished (``False``: evaluate the finished ones, list the rest).
        eval_split: the split evaluated; ``eval_forensic`` / ``eval_semantic``: a seeded stratified sample of that
            many forensic / semantic-QA rows (``None``: all).
        max_new_tokens: greedy answer length of the evaluation.
        start_seed: seed of the random low-level encoder (``init: random``).
    """

    depths: tuple[int, ...] = ()
    variants: tuple[str, ...] = VARIANT_GROUPS
    train: bool = True
    eval_split: str = "test"
    eval_forensic: int | None = 400
    eval_semantic: int | None = 300
    max_new_tokens: int = 2
    start_seed: int = 0
    n_boot: int = 1000
    ci: float = 0.95
    seed: int = 0
    dtype: str = "float32"
    attn: str = "sdpa"
    device: str = "cpu"
    batch_size: int = 16
    threads: int | None = None

    _tuple_fields = ("depths", "variants")

    def __post_init__(self):
        super().__post_init__()
        unknown = [v for v in self.variants if v not in VARIANT_GROUPS]
        if unknown:
            raise ConfigError(f"variants={list(self.variants)}", f"use any of {list(VARIANT_GROUPS)}")
        if any(not isinstance(k, int) or k < 1 for k in self.depths):
            raise ConfigError(f"depths={list(self.depths)}", "must be positive integers (K, 1-based)")

    def hash(self) -> str:
        return hash_json({k: v for k, v in self.to_dict().items() if k not in ("device", "batch_size", "threads", "train")})


@dataclass
class RunSpec:
    """One ablation run: its name, its group and value, and how it differs from the base config."""

    name: str
    group: str
    value: str | int
    overrides: dict[str, Any] = field(default_factory=dict)
    start: dict[str, Any] | None = None  # Deep-VRM settings of a materialised start checkpoint
    early_trainable: bool = False
    baseline: bool = False


# --- planning --------------------------------------------------------------------------------------


def base_settings(base: TrainConfig) -> tuple[int, str]:
    """The K and fusion a base stage-2 config trains with (its own, its start's, or the defaults)."""
    k, fusion = base.injection_layer, base.fusion
    folder = Path(base.model)
    if is_deep_vrm_checkpoint(folder):
        saved = json.loads((folder / "config.json").read_text())["deep_vrm"]
        k, fusion = k or saved.get("injection_layer"), fusion or saved.get("fusion")
    if k is None:
        k = default_injection_layer(_num_layers(base))
    return k, fusion or "average"


def _num_layers(base: TrainConfig) -> int:
    folder = Path(base.model)
    if (folder / "config.json").is_file():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(folder).get_text_config().num_hidden_layers
    from probes.backbones import load_backbone

    return load_backbone(base.model).num_layers


def plan(base: TrainConfig, config: AblateConfig) -> list[RunSpec]:
    """The runs of the depth sweep and of the variant groups (the base run appears once per group)."""
    if base.stage != "2":
        raise ConfigError(f"stage={base.stage}", "ablations train stage 2: pass the Deep-VRM run's stage-2 config")
    k, fusion = base_settings(base)
    specs = []
    for depth in config.depths:
        same = depth == k
        overrides = {} if same and base.injection_layer in (None, k) else {"injection_layer": depth}
        specs.append(RunSpec(f"K={depth}", "depth", depth, overrides, baseline=same))
    if "init" in config.variants:
        specs += [RunSpec("init=copy", "init", "copy", baseline=True),
                  RunSpec("init=random", "init", "random", start={"low_level_init": "random"})]
    if "fusion" in config.variants:
        for name in FUSIONS:
            specs.append(RunSpec(f"fusion={name}", "fusion", name, {} if name == fusion else {"fusion": name},
                                 baseline=name == fusion))
    if "early" in config.variants:
        specs += [RunSpec("early=frozen", "early", "frozen", baseline=True),
                  RunSpec("early=trainable", "early", "trainable", early_trainable=True)]
    return specs


def train_config(base: TrainConfig, spec: RunSpec, config: AblateConfig) -> TrainConfig:
    """The TrainConfig of ``spec``: the base with its overrides, its start checkpoint, its note."""
    values = {**base.to_dict(), **spec.overrides, "out": None}
    if spec.start is not None:
        k, fusion = base_settings(base)
        values["model"] = str(materialize_start(base.model, spec.start, injection_layer=k, fusion=fusion,
                                                seed=config.start_seed, dtype=base.dtype))
    if spec.early_trainable:
        values["notes"] = f"{values['notes']} | {EARLY_NOTE}" if values["notes"] else EARLY_NOTE
    run = TrainConfig.from_dict(values)
    if run.hash() == base.hash():
        run.out = base.out  # the base run itself, wherever it was written
    return run


def materialize_start(model: str, settings: dict[str, Any], *, injection_layer: int, fusion: str, seed: int,
                      dtype: str = "float32") -> Path:
    """A Deep-VRM start checkpoint made from the stage-1 model ``model`` with ``settings`` (e.g. a random
    low-level encoder), drawn from ``seed`` once and saved under ``<cache>/inspect/starts/<hash>``."""
    from injection.modeling import DeepVRMForConditionalGeneration
    from probes.backbones.base import LoadSettings

    record = run_record(model)
    identity = record["config_hash"] if record else str(Path(model).resolve()) if Path(model).is_dir() else model
    key = hash_json({"model": identity, "settings": settings, "injection_layer": injection_layer, "fusion": fusion,
                     "seed": seed, "dtype": dtype})
    folder = cache_dir("starts", key)
    if (folder / "config.json").is_file():
        return folder
    if is_deep_vrm_checkpoint(Path(model)):
        raise ConfigError(model, "is already a Deep-VRM checkpoint; an init ablation starts from the stage-1 model")
    adapter = load(model, LoadSettings(dtype))
    torch.manual_seed(seed)
    deep = DeepVRMForConditionalGeneration.from_backbone(adapter.model, injection_layer=injection_layer,
                                                         fusion=fusion, **settings)
    with atomic_dir(folder) as tmp:
        deep.save_pretrained(tmp)
        adapter.processor.save_pretrained(tmp)
        write_json(tmp / "start.json", {"from": model, "identity": identity, "settings": settings,
                                        "injection_layer": injection_layer, "fusion": fusion, "seed": seed})
    release(adapter)
    return folder


@contextlib.contextmanager
def early_layers_trainable() -> Iterator[None]:
    """Inside the block, stage 2's LoRA covers every decoder layer (0-based index ≥ 0), not only those ≥ K."""
    from injection import peft_targets

    original = peft_targets.llm_linear_names

    def every_layer(model, first_layer: int = 0):
        return original(model, 0)

    peft_targets.llm_linear_names = every_layer
    try:
        yield
    finally:
        peft_targets.llm_linear_names = original


def train_run(run: TrainConfig, spec: RunSpec, progress: bool = True) -> dict[str, Any]:
    """Train (or resume, or reuse) one run."""
    with early_layers_trainable() if spec.early_trainable else contextlib.nullcontext():
        return train(run, progress=progress)


# --- evaluation --------------------------------------------------------------------------------------


def eval_subset(manifest: Path, split: str, n_forensic: int | None, n_semantic: int | None, seed: int) -> Path:
    """A data folder with a seeded sample of ``split``: ``n_forensic`` labelled rows stratified by (label, cue,
    generator) and ``n_semantic`` semantic-QA rows stratified by question (image paths made absolute). The
    original folder when both are ``None``."""
    if n_forensic is None and n_semantic is None:
        return manifest.parent
    root = manifest.parent
    records = [r for r in read_manifest(manifest) if r.split in (None, split) and r.label]
    semantic_file = root / "semantic.jsonl"
    semantic = [r for r in read_manifest(semantic_file) if r.split == split] if semantic_file.is_file() else []
    key = hash_json({"data": data_hash(manifest), "split": split, "forensic": n_forensic, "semantic": n_semantic,
                     "seed": seed})
    folder = cache_dir("eval-data", f"{root.name}-{key}")
    if (folder / "manifest.jsonl").is_file():
        return folder
    rng = np.random.default_rng(seed)
    picked = _stratified(records, n_forensic, lambda r: (r.label, r.cue, r.generator), rng)
    questions = _stratified(semantic, n_semantic, lambda r: r.extra.get("question"), rng)
    with atomic_dir(folder) as tmp:
        write_manifest(tmp / "manifest.jsonl", [_absolute(r, root) for r in picked])
        if questions:
            write_manifest(tmp / "semantic.jsonl", [_absolute(r, root) for r in questions])
        write_json(tmp / "subset.json", {"from": str(manifest), "split": split, "forensic": len(picked),
                                         "semantic": len(questions), "seed": seed})
    return folder


def _stratified(rows: Sequence[Record], n: int | None, key, rng: np.random.Generator) -> list[Record]:
    """``n`` rows, each stratum's share rounded by largest remainder, in the original order."""
    if n is None or n >= len(rows):
        return list(rows)
    strata: dict[Any, list[int]] = {}
    for i, r in enumerate(rows):
        strata.setdefault(key(r), []).append(i)
    names = sorted(strata, key=str)
    share = np.array([len(strata[s]) for s in names]) * n / len(rows)
    counts = np.floor(share).astype(int)
    for i in np.argsort(-(share - counts))[: n - counts.sum()]:
        counts[i] += 1
    keep = [int(j) for s, c in zip(names, counts) for j in rng.choice(strata[s], c, replace=False)]
    return [rows[i] for i in sorted(keep)]


def _absolute(r: Record, root: Path) -> Record:
    from dataclasses import replace

    return replace(r, images=[str(r.image_path(root))])


def evaluate_model(source: str, data_dir: Path, config: AblateConfig, progress: bool = True) -> dict[str, Any]:
    """Detection and semantic-QA metrics (with bootstrap CIs) of ``source`` on ``data_dir``; the evaluation is
    cached in the run folder (``inspect-eval-<hash>``), or under the cache keyed by the weights."""
    from injection.evaluate import evaluate

    key = hash_json({"data": data_hash(data_dir / "manifest.jsonl"), "split": config.eval_split,
                     "max_new_tokens": config.max_new_tokens, "dtype": config.dtype})
    if run_record(source) is not None:
        out = Path(source) / f"inspect-eval-{key}"
    else:
        adapter = load(source, config.settings())
        out = cache_dir("eval", f"{hash_json({'source': source, 'weights': adapter.weights_fingerprint()})}-{key}")
        release(adapter)
    t0 = time.perf_counter()
    reused = (out / "eval.json").is_file()
    summary = read_json(out / "eval.json") if reused else evaluate(
        source, [str(data_dir)], out=out, settings=config.settings(), split=config.eval_split,
        batch_size=config.batch_size, max_new_tokens=config.max_new_tokens, progress=progress)
    return {**eval_metrics(summary, out, data_dir.name, config), "eval_dir": str(out), "eval_reused": reused,
            "eval_s": round(time.perf_counter() - t0, 2)}


def eval_metrics(summary: dict[str, Any], out: Path, name: str, config: AblateConfig) -> dict[str, Any]:
    result = summary["datasets"][name]
    rows = pd.read_json(out / f"{name}_test_result.jsonl", lines=True)
    metrics: dict[str, Any] = {"n": result["n"], "accuracy": result["accuracy"], "auc": result["auc"],
                               "auc_lo": np.nan, "auc_hi": np.nan}
    y = (rows.label == "fake").to_numpy().astype(np.int64)
    if 0 < y.sum() < len(y):
        ci = stats.bootstrap_ci(y, rows.margin.to_numpy(dtype=np.float64)[None, None], metric="roc_auc",
                                n_boot=config.n_boot, ci=config.ci, seed=config.seed).iloc[0]
        metrics.update(auc_lo=float(ci.lo), auc_hi=float(ci.hi))
    for cue in ("trace", "semantic"):
        metrics[f"auc_{cue}"] = (result.get("by_cue", {}).get(cue) or {}).get("auc")
    metrics.update(semantic_acc=np.nan, semantic_lo=np.nan, semantic_hi=np.nan, closed_set_acc=np.nan)
    semantic_file = out / f"{name}_semantic_result.jsonl"
    if semantic_file.is_file():
        qa = pd.read_json(semantic_file, lines=True)
        est, lo, hi = mean_ci(qa.correct.astype(float), config.n_boot, config.ci, config.seed)
        metrics.update(semantic_acc=est, semantic_lo=lo, semantic_hi=hi,
                       closed_set_acc=float(pd.to_numeric(qa.closed_set_correct, errors="coerce").mean()))
    return metrics


# --- the run -------------------------------------------------------------------------------------


def run_ablate(
    base: TrainConfig,
    data: str | None = None,
    config: AblateConfig | None = None,
    *,
    references: dict[str, str] | None = None,
    recommended: int | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or reuse) every run of :func:`plan`, evaluate each (and the ``references``, e.g. base and naive),
    write ``ablate.json``, ``ablate.csv`` and the ``depth`` / ``variants`` figures to ``out``; return the summary.

    ``recommended``: the recommend-depth K, marked on the depth figure.
    """
    config = config or AblateConfig()
    t0 = time.perf_counter()
    specs = plan(base, config)
    if not specs:
        raise ConfigError("ablate", "nothing to run: pass depths and/or variants")
    manifest = resolve_manifest(data if data is not None else _train_data(base), base.preset)
    data_dir = eval_subset(manifest, config.eval_split, config.eval_forensic, config.eval_semantic, config.seed)
    runs: dict[str, dict[str, Any]] = {}  # config hash -> what happened
    rows = []
    train_s = 0.0
    with threads(config.threads):
        for spec in specs:
            run = train_config(base, spec, config)
            h = run.hash()
            if h not in runs:
                folder = run_folder(run)
                done = (folder / "train.json").is_file()
                status = "reused" if done else "missing"
                if not done and config.train:
                    started = time.perf_counter()
                    train_run(run, spec, progress)
                    train_s += time.perf_counter() - started
                    status = "trained"
                runs[h] = {"folder": str(folder), "status": status, "config": run.to_dict()}
                if status != "missing":
                    runs[h].update(_run_cost(folder))
                    runs[h].update(evaluate_model(str(folder), data_dir, config, progress))
            rows.append({"name": spec.name, "group": spec.group, "value": str(spec.value), "baseline": spec.baseline,
                         "config_hash": h, **{k: v for k, v in runs[h].items() if k != "config"}})
        for name, source in (references or {}).items():
            if source:
                rows.append({"name": name, "group": "reference", "value": name, "baseline": False,
                             "config_hash": None, "folder": source, "status": "reference",
                             **evaluate_model(source, data_dir, config, progress)})
    table = pd.DataFrame(rows)
    for column in ("steps", "injection_layer", "trainable_decoder"):
        if column in table:
            table[column] = table[column].astype("Int64")
    if "semantic_acc" in table:
        base_acc = table.loc[(table.group == "reference") & (table.name == "base"), "semantic_acc"]
        if len(base_acc) and base_acc.iloc[0]:
            table["semantic_retention"] = table.semantic_acc / float(base_acc.iloc[0])
    summary = {
        "base_config": base.to_dict(), "base_config_hash": base.hash(), "injection_layer": base_settings(base)[0],
        "recommended": recommended, "eval_data": str(data_dir),
        "runs": jsonable(table.to_dict(orient="records")),
        "sweep_cost": sweep_cost(runs, train_s),
        "eval_s": round(sum(r.get("eval_s", 0.0) for r in runs.values()), 2),
        **provenance(config, data_hash=data_hash(manifest)),
    }
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    if out is not None:
        summary["files"] = _write(Path(out), table, summary, config, recommended)
    return jsonable(summary)


def _train_data(base: TrainConfig) -> str | None:
    if isinstance(base.data, list | tuple):
        return base.data[0] if base.data else None
    return base.data


def _run_cost(folder: Path) -> dict[str, Any]:
    record = read_json(folder / "train.json")
    times = record.get("times_s", {})
    return {"steps": record.get("steps"), "train_s": times.get("train"), "run_s": round(sum(times.values()), 2),
            "samples_per_s": record.get("samples_per_s"),
            "trainable_decoder": (record.get("trainable", {}).get("by_part", {}) or {}).get("decoder_layers"),
            "injection_layer": (record.get("deep_vrm") or {}).get("injection_layer"),
            "fusion": (record.get("deep_vrm") or {}).get("fusion")}


def sweep_cost(runs: dict[str, dict[str, Any]], train_s: float) -> dict[str, Any]:
    """Training cost, apart from the inspection: what the runs took when they were trained, and this call."""
    done = [r for r in runs.values() if r["status"] != "missing"]
    return {"runs": len(runs), "trained_now": sum(r["status"] == "trained" for r in runs.values()),
            "reused": sum(r["status"] == "reused" for r in runs.values()),
            "missing": [r["folder"] for r in runs.values() if r["status"] == "missing"],
            "train_s_total": round(sum(r.get("run_s") or 0.0 for r in done), 2),
            "train_s_this_call": round(train_s, 2)}


def _write(folder: Path, table: pd.DataFrame, summary: dict[str, Any], config: AblateConfig,
           recommended: int | None) -> list[str]:
    from injection.inspect import plots

    write_table(folder / "ablate.csv", table)
    config.save(folder / "config.json")
    files = [str(folder / "ablate.csv"), str(folder / "config.json")]
    done = table[table.auc.notna()] if "auc" in table else table.iloc[0:0]
    if (done.group == "depth").any():
        files += plots.depth_figure(done, folder / "depth", recommended=recommended)
    if done.group.isin(VARIANT_GROUPS).any():
        files += plots.variants_figure(done, folder / "variants")
    files.append(str(folder / "ablate.json"))
    write_json(folder / "ablate.json", jsonable({**summary, "files": files}))
    return files


def load_base_config(path: str | Path) -> TrainConfig:
    """A TrainConfig from a JSON file, or from a run folder's ``train.json`` (its ``config``; ``out`` kept)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "train.json").is_file():
            raise BadInputError(path, "no train.json in this folder (pass a finished stage-2 run or a config file)")
        record = read_json(path / "train.json")
        config = TrainConfig.from_dict(record["config"])
        if config.hash() != record.get("config_hash"):
            raise BadInputError(path, "train.json's config does not give its config_hash (edited?)")
        config.out = str(path)  # the folder itself, wherever its config said it would go
        return config
    return TrainConfig.load(path)


def recommended_layer(path: str | Path | None) -> int | None:
    """K of a ``recommendation.json`` (from ``recommend-depth``), or of an int given as text."""
    if path is None:
        return None
    if str(path).isdigit():
        return int(path)
    path = Path(path)
    if path.is_dir():
        path = path / "recommendation.json"
    if not path.is_file():
        raise BadInputError(path, "no recommendation.json here (pass recommend-depth's file or K)")
    return int(read_json(path)["layer"])


__all__ = ["AblateConfig", "RunSpec", "early_layers_trainable", "eval_subset", "load_base_config",
           "materialize_start", "plan", "recommended_layer", "run_ablate", "sweep_cost", "train_config"]
