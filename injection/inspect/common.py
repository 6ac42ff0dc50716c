"""What the inspection commands share: config dataclasses with provenance hashes, model loading and description,
data resolution, result caching, and small bootstrap helpers for means.

Configs follow tuned-lens: a dataclass with ``to_dict`` / ``from_dict`` / ``save`` / ``load`` and ``hash()``, the
provenance hash of every setting that changes a number (device, threads, batch size and progress bars do not).
"""

from __future__ import annotations

import gc
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from probes.backbones.base import BackboneAdapter, LoadSettings
from probes.errors import BadInputError, ConfigError
from probes.layerwise import limit_threads
from probes.storage import (
    atomic_dir,
    cache_root,
    hash_json,
    library_versions,
    read_json,
    write_json,
    write_text,
)

RUN_ONLY = ("device", "batch_size", "threads", "progress")  # settings that change no result


@dataclass
class InspectConfig:
    """Base of the per-command configs (fields live in the subclasses)."""

    _tuple_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        for name in self._tuple_fields:
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                setattr(self, name, tuple(value))
        if hasattr(self, "ci") and not 0 < self.ci < 1:
            raise ConfigError(f"ci={self.ci}", "must be in (0, 1)")
        if hasattr(self, "n_boot") and self.n_boot < 1:
            raise ConfigError(f"n_boot={self.n_boot}", "must be at least 1")
        if hasattr(self, "batch_size") and self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}", "must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{cls.__name__} keys {unknown}", f"unknown; known: {sorted(known)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path):
        if not Path(path).is_file():
            raise BadInputError(path, "no such config file")
        return cls.from_dict(read_json(path))

    def hash(self) -> str:
        """Provenance hash of the settings that change results."""
        return hash_json({k: v for k, v in self.to_dict().items() if k not in RUN_ONLY})

    def settings(self) -> LoadSettings:
        return LoadSettings(self.dtype, self.attn, self.device)


# --- models --------------------------------------------------------------------------------------


def load(source: str, settings: LoadSettings) -> BackboneAdapter:
    """The adapter of a built-in backbone, a model folder, or a trained (base, naive, Deep-VRM) run folder."""
    from injection.train import load_model

    adapter = load_model(source, settings)
    adapter.model.eval()
    return adapter


def release(adapter: BackboneAdapter | None) -> None:
    """Drop a model's memory before the next one loads."""
    del adapter
    gc.collect()


def run_record(source: str) -> dict[str, Any] | None:
    """The ``train.json`` of a run folder, or None."""
    path = Path(source) / "train.json"
    return read_json(path) if path.is_file() else None


def start_of(source: str) -> str | None:
    """Where a training run started (its ``config.model``): the reference its frozen layers must equal."""
    record = run_record(source)
    return None if record is None else record["config"]["model"]


def same_source(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    pa, pb = Path(a), Path(b)
    if pa.is_dir() and pb.is_dir():
        return pa.resolve() == pb.resolve()
    return a == b


def injection_layer(adapter: BackboneAdapter) -> int | None:
    """K of a Deep-VRM model, None for any other model."""
    return getattr(adapter.model, "injection_layer", None) if is_deep_vrm(adapter) else None


def is_deep_vrm(adapter: BackboneAdapter) -> bool:
    from injection.modeling import DeepVRMForConditionalGeneration

    return isinstance(adapter.model, DeepVRMForConditionalGeneration)


def describe(role: str, source: str, adapter: BackboneAdapter) -> dict[str, Any]:
    """A model's provenance for result files."""
    record = run_record(source)
    return {
        "role": role,
        "source": source,
        "weights": adapter.weights_fingerprint(),
        "family": adapter.family,
        "num_layers": adapter.num_layers,
        "hidden_size": adapter.hidden_size,
        "deep_vrm": getattr(adapter.model.config, "deep_vrm", None),
        "injection_layer": injection_layer(adapter),
        "run": None if record is None else {"stage": record["config"]["stage"], "config_hash": record["config_hash"],
                                            "start": record["config"]["model"], "steps": record.get("steps")},
    }


# --- data ----------------------------------------------------------------------------------------


def resolve_manifest(data: str | None, preset: str = "default") -> Path:
    """The manifest of ``data`` (a folder with ``manifest.jsonl`` or the file), or the embedded set of ``preset``."""
    from injection.train import resolve_data

    return resolve_data(data, preset)


def data_hash(manifest: Path) -> str:
    from injection.train import data_hash as _hash

    return _hash([manifest])


# --- caching -------------------------------------------------------------------------------------


def cache_dir(kind: str, key: str) -> Path:
    """``<cache>/inspect/<kind>/<key>``: results that a later call with the same provenance reuses."""
    return cache_root() / "inspect" / kind / key


def load_tables(folder: Path, names: Sequence[str]) -> tuple[dict[str, pd.DataFrame], dict[str, Any]] | None:
    """Tables and metadata saved by :func:`save_tables`, or None when the folder is not complete."""
    meta = folder / "meta.json"
    if not meta.is_file() or not all((folder / f"{n}.csv").is_file() for n in names):
        return None
    tables = {}
    for n in names:
        try:
            tables[n] = pd.read_csv(folder / f"{n}.csv")
        except pd.errors.EmptyDataError:
            tables[n] = pd.DataFrame()
    return tables, read_json(meta)


def save_tables(folder: Path, tables: dict[str, pd.DataFrame], meta: dict[str, Any]) -> None:
    """Write tables (CSV) and metadata (JSON) into ``folder`` in one atomic move."""
    with atomic_dir(folder) as tmp:
        for name, table in tables.items():
            table.to_csv(tmp / f"{name}.csv", index=False)
        write_json(tmp / "meta.json", meta)


def write_table(path: Path, table: pd.DataFrame) -> None:
    write_text(path, table.to_csv(index=False))


def provenance(config: InspectConfig, **extra) -> dict[str, Any]:
    return {"config": config.to_dict(), "config_hash": config.hash(), "versions": library_versions(), **extra}


threads = limit_threads  # torch threads and numpy's BLAS together (probes.layerwise)


# --- bootstrap of means --------------------------------------------------------------------------


def resample_weights(n: int, n_boot: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Multiplicities ``[n_boot, n]`` of each item in each draw: images, or whole groups with ``groups``
    (the same draws as :mod:`probes.stats`)."""
    from probes.stats import _resample

    return _resample(np.zeros(n, dtype=np.int64), groups, n_boot, np.random.default_rng(seed))


def mean_ci(values: Sequence[float], n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap CI over items (NaN items left out); NaNs when there is none."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return (float("nan"),) * 3
    w = resample_weights(len(x), n_boot, seed)
    draws = (w @ x) / w.sum(1)
    lo, hi = np.quantile(draws, [(1 - ci) / 2, (1 + ci) / 2])
    return float(x.mean()), float(lo), float(hi)


def diff_ci(a: Sequence[float], b: Sequence[float], n_boot: int = 1000, ci: float = 0.95,
            seed: int = 0) -> tuple[float, float, float]:
    """mean(a) − mean(b) of two independent groups, each resampled in every draw."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) == 0 or len(b) == 0:
        return (float("nan"),) * 3
    wa = resample_weights(len(a), n_boot, seed)
    wb = resample_weights(len(b), n_boot, seed + 1)
    draws = (wa @ a) / wa.sum(1) - (wb @ b) / wb.sum(1)
    lo, hi = np.quantile(draws, [(1 - ci) / 2, (1 + ci) / 2])
    return float(a.mean() - b.mean()), float(lo), float(hi)


def jsonable(obj: Any) -> Any:
    """NaN → None, numpy scalars → Python, recursively (for result JSON files)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if obj is pd.NA or obj is pd.NaT:
        return None
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def records_json(table: pd.DataFrame) -> list[dict[str, Any]]:
    return jsonable(json.loads(table.to_json(orient="records")))
