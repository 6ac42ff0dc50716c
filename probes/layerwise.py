"""Layer-wise probing of a captured store: every task, its control, CIs, per-generator views, confounds.

>>> store = ActivationStore.open(report.store)
>>> result = run_layerwise(store, read_manifest(manifest), LayerwiseConfig())
>>> result.curves          # task, layer, metric, estimate, lo, hi  (the emergence curves)
>>> result.selectivity     # task, layer, task, control, estimate, lo, hi
>>> result.save(out_dir)   # CSV + JSON beside the figures

Every number comes from out-of-fold predictions of probes fit by :func:`probes.linear.sweep` (nested
grouped CV, several seeds) and a bootstrap over images (:mod:`probes.stats`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from probes import stats
from probes.cache import ActivationStore
from probes.data.manifest import Record
from probes.errors import BadInputError, ConfigError
from probes.linear import DEFAULT_CS, SweepResult, sweep
from probes.storage import atomic_dir, cache_root, hash_json, read_json, write_json
from probes.tasks import CONFOUND_COLUMNS, HELD_OUT, Task, build_task, confound_features, generator_tasks

METRICS = ("accuracy", "roc_auc", "average_precision")
MIN_GROUPS_PER_CLASS = 4  # outer and inner grouped folds both need each class on both sides


@dataclass
class LayerwiseConfig:
    """What a layer-wise run computes; recorded (and hashed) with its results."""

    tasks: tuple[str, ...] = ("semantic", "scene", "d1", "d2")
    generators: bool = True  # add gen:<family> for every trace family present
    position: str = "last"
    splits: tuple[str, ...] | None = HELD_OUT
    seeds: tuple[int, ...] = (0, 1, 2)
    n_folds: int = 5
    inner_folds: int = 3
    Cs: tuple[float, ...] = DEFAULT_CS
    n_boot: int = 1000
    control_seed: int = 0
    device: str = "cpu"
    threads: int | None = 1  # CPU threads for the fits; small per-layer problems run fastest on one

    def __post_init__(self):
        self.tasks, self.seeds, self.Cs = tuple(self.tasks), tuple(self.seeds), tuple(self.Cs)
        self.splits = None if self.splits is None else tuple(self.splits)
        if len(self.seeds) < 1:
            raise ConfigError("seeds", "need at least one seed")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerwiseConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"layerwise config keys {sorted(unknown)}", "unknown")
        return cls(**d)

    @property
    def hash(self) -> str:
        return hash_json({k: v for k, v in self.to_dict().items() if k not in ("device", "threads")})


@dataclass
class LayerwiseResult:
    """Tidy tables of a run (see the module docstring) and its provenance."""

    curves: pd.DataFrame  # task, layer, metric, estimate, lo, hi, n_boot
    selectivity: pd.DataFrame  # task, layer, task_value, control_value, estimate, lo, hi
    folds: pd.DataFrame  # task, layer, seed, fold, C, accuracy, roc_auc, average_precision, n_train, n_test
    confound: dict[str, Any]
    tasks: dict[str, dict[str, Any]]  # per task: description, n, counts, groups, group_key
    provenance: dict[str, Any] = field(default_factory=dict)

    def save(self, out: str | Path) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("curves", "selectivity", "folds"):
            getattr(self, name).to_csv(out / f"{name}.csv", index=False)
        write_json(out / "layerwise.json", {"confound": self.confound, "tasks": self.tasks,
                                            "provenance": self.provenance})

    @classmethod
    def load(cls, out: str | Path) -> LayerwiseResult:
        out = Path(out)
        meta = read_json(out / "layerwise.json")
        tables = {n: pd.read_csv(out / f"{n}.csv") for n in ("curves", "selectivity", "folds")}
        return cls(**tables, **meta)

    def curve(self, task: str, metric: str = "accuracy") -> pd.DataFrame:
        c = self.curves
        return c[(c.task == task) & (c.metric == metric)].sort_values("layer")


def run_layerwise(
    store: ActivationStore, records: Sequence[Record], config: LayerwiseConfig | None = None, progress: bool = True
) -> LayerwiseResult:
    """Probe every task of ``config`` on ``store`` (captured from ``records``, matched by id)."""
    config = config or LayerwiseConfig()
    with limit_threads(config.threads):
        return _run(store, records, config, progress)


@contextlib.contextmanager
def limit_threads(n: int | None):
    """Torch CPU threads set to ``n`` (None: as they are), and numpy's BLAS limited to the same number:
    their default of every core is many times slower on a shared machine."""
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
            yield
    finally:
        torch.set_num_threads(previous)


def _run(store: ActivationStore, records: Sequence[Record], config: LayerwiseConfig, progress: bool) -> LayerwiseResult:
    ids, X = store.load(config.position)
    where = {i: n for n, i in enumerate(ids)}
    names = list(config.tasks) + (generator_tasks(records, config.splits) if config.generators else [])
    curves, sel, folds, meta = [], [], [], {}
    skipped = {}
    for name in tqdm(names, desc="probing tasks", disable=not progress):
        try:
            task, dropped = build_task(name, records, config.splits).without_thin_classes(MIN_GROUPS_PER_CLASS)
        except BadInputError as err:
            if name in config.tasks:  # asked for by name: the user must hear it
                raise
            skipped[name] = str(err)  # an automatic gen:<family> too thin to probe
            continue
        rows = _store_rows(task, records, where)
        x = np.asarray(X[rows], dtype=np.float32)
        _check_finite(x, [records[i].id for i in task.rows], store.layers, task.name, config.position)
        n_folds = _folds(task, config)
        result = _sweep(x, task, config, n_folds)
        control = _control_sweep(x, task, config, n_folds, result.folds)
        curves.append(_curves(name, result, config))
        sel.append(_selectivity(name, result, control, config))
        folds.append(result.table.assign(task=name))
        meta[name] = {"description": task.description, "n": len(task), "counts": task.counts,
                      "groups": int(len(set(task.groups))), "group_key": task.group_key,
                      "dropped_classes": dropped, "n_folds": n_folds[0]}
        if dropped:
            meta[name]["dropped_reason"] = (f"fewer than {MIN_GROUPS_PER_CLASS} {task.group_key} groups each, so "
                                            "grouped folds cannot test them")
    confound = confound_probe(records, _confound_task(records, config), config)
    if skipped:
        meta["skipped"] = skipped
    return LayerwiseResult(
        curves=pd.concat(curves, ignore_index=True),
        selectivity=pd.concat(sel, ignore_index=True),
        folds=pd.concat(folds, ignore_index=True),
        confound=confound,
        tasks=meta,
        provenance={"store": store.provenance, "store_path": str(store.path), "config": config.to_dict(),
                    "config_hash": config.hash},
    )


def _confound_task(records: Sequence[Record], config: LayerwiseConfig) -> Task:
    """The rows the confound probe is fit on: D2 (content-aligned pairs) where present, else every
    labelled image."""
    try:
        return build_task("d2", records, config.splits)
    except BadInputError:
        return build_task("fake", records, config.splits)


def _store_rows(task: Task, records: Sequence[Record], where: dict[str, int]) -> np.ndarray:
    missing = [records[i].id for i in task.rows if records[i].id not in where]
    if missing:
        raise BadInputError(missing[0], f"not captured in the store ({len(missing)} rows of task {task.name} missing)")
    return np.array([where[records[i].id] for i in task.rows], dtype=np.int64)


def _check_finite(x: np.ndarray, ids: Sequence[str], layers: Sequence[int], task: str, position: str) -> None:
    """NaN or inf in ``x [n, L, D]`` -> a one-line error naming the first bad row id and stored layer."""
    bad = ~np.isfinite(x).reshape(len(x), x.shape[1], -1).all(-1)  # [n, L]
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise BadInputError(f"row {ids[row]!r} layer {layers[col]}",
                            f"non-finite activation (NaN or inf) at position {position!r}, in task {task} "
                            f"({int(bad.any(1).sum())} of {len(x)} rows affected)")


def _folds(task: Task, config: LayerwiseConfig) -> tuple[int, int]:
    """Outer and inner fold counts that every class can fill with whole groups."""
    fewest = min(task.groups_per_class().values())
    outer = max(2, min(config.n_folds, fewest))
    inner = max(2, min(config.inner_folds, fewest - -(-fewest // outer)))
    return outer, inner


def _sweep(X: np.ndarray, task: Task, config: LayerwiseConfig, n_folds: tuple[int, int],
           folds: np.ndarray | None = None) -> SweepResult:
    outer, inner = n_folds
    return sweep(np.asarray(X, dtype=np.float32), task.labels, task.groups, n_folds=outer, seeds=config.seeds,
                 Cs=config.Cs, inner_folds=inner, folds=folds, device=config.device)


def _control_sweep(X: np.ndarray, task: Task, config: LayerwiseConfig, n_folds: tuple[int, int],
                   folds: np.ndarray, tries: int = 20) -> SweepResult:
    """The control task on the task's own folds. On a small task a random draw can leave a fold without
    some class; the draw is then repeated with the next seed (deterministically)."""
    for k in range(tries):
        try:
            return _sweep(X, task.control(config.control_seed + k), config, n_folds, folds=folds)
        except BadInputError:
            if k == tries - 1:
                raise
    raise AssertionError("unreachable")


def _curves(name: str, result: SweepResult, config: LayerwiseConfig) -> pd.DataFrame:
    out = []
    for metric in METRICS:
        ci = stats.bootstrap_ci(result.labels, result.scores, metric=metric, n_boot=config.n_boot,
                                layers=result.layers)
        out.append(ci.assign(task=name, metric=metric))
    return pd.concat(out, ignore_index=True)


def _selectivity(name: str, result: SweepResult, control: SweepResult, config: LayerwiseConfig) -> pd.DataFrame:
    sel = stats.selectivity(result.labels, result.scores, control.labels, control.scores, metric="accuracy",
                            n_boot=config.n_boot, layers=result.layers)
    return sel.assign(task=name)


def confound_probe(records: Sequence[Record], task: Task, config: LayerwiseConfig) -> dict[str, Any]:
    """A probe on file-level features only (size, bytes, format), on ``task``'s rows; must sit at chance.

    ``warning`` is set when its AUC CI lies above 0.5: the label then leaks through the files.
    """
    feats = confound_features(records, task.rows)
    outer, inner = _folds(task, config)
    result = sweep(feats, task.labels, task.groups, n_folds=outer, seeds=config.seeds, Cs=config.Cs, inner_folds=inner)
    auc = stats.bootstrap_ci(result.labels, result.scores, metric="roc_auc", n_boot=config.n_boot).iloc[0]
    acc = stats.bootstrap_ci(result.labels, result.scores, metric="accuracy", n_boot=config.n_boot).iloc[0]
    constant = bool(np.ptp(feats[:, 0, :], axis=0).max() == 0)
    out = {
        "task": task.name,
        "features": "width, height, bytes, format (stored file) and orig_* (original file)",
        "all_features_constant": constant,
        "roc_auc": [float(auc.estimate), float(auc.lo), float(auc.hi)],
        "accuracy": [float(acc.estimate), float(acc.lo), float(acc.hi)],
        "majority_rate": float(np.bincount(task.labels).max() / len(task)),
        "at_chance": bool(auc.lo <= 0.5),
    }
    if not out["at_chance"]:
        out["warning"] = (f"CONFOUND: file size/format/bytes alone predict {task.name} labels (AUC "
                          f"{auc.estimate:.3f} [{auc.lo:.3f}, {auc.hi:.3f}]); re-encode the data identically")
        warnings.warn(out["warning"], stacklevel=2)
    return out


def probe_backbone(
    backbone,
    records: Sequence[Record],
    root: str | Path,
    config: LayerwiseConfig | None = None,
    *,
    batch_size: int = 16,
    on_error: str = "stop",
    progress: bool = True,
) -> LayerwiseResult:
    """Capture what ``config`` needs from ``backbone`` (reusing the store) and probe it (reusing results).

    Only the rows of ``config.splits`` are captured. Results are cached under
    ``<cache>/probes/<store key>-<config hash>/``.
    """
    from probes.capture import capture

    config = config or LayerwiseConfig()
    rows = [r for r in records if config.splits is None or r.split in config.splits]
    report = capture(backbone, rows, root, batch_size=batch_size, on_error=on_error, progress=progress)
    store = ActivationStore.open(report.store)
    folder = cache_root() / "probes" / f"{store.key}-{config.hash}-{labels_hash(records)}"
    if (folder / "layerwise.json").is_file():
        return LayerwiseResult.load(folder)
    result = run_layerwise(store, records, config, progress)
    result.provenance["capture"] = report.to_dict()
    with atomic_dir(folder) as tmp:
        result.save(tmp)
    return result


LABEL_COLUMNS = ("id", "label", "split", "source_id", "scene_id", "object_id", "semantic_class", "scene_class",
                 "generator", "cue", "kind", "post") + CONFOUND_COLUMNS


def labels_hash(records: Sequence[Record]) -> str:
    """Hash of every column a task or the confound probe reads: edited labels or groups mean new results."""
    return hash_json([[getattr(r, c) for c in LABEL_COLUMNS] for r in records])
