"""The activation store: captured hidden states on disk, one folder per provenance, resumable.

Layout of ``<cache>/activations/<key>/``::

    provenance.json                 what made the numbers; ``key`` hashes its KEY_FIELDS
    rows.json                       the planned row ids, in manifest order (the order of every view)
    index-rank00.json               rank 0's committed shards (name, row ids, files) and skipped rows
    image_mean/rank00-00000.npy     [rows, layers, hidden]
    last/rank00-00000.npy           [rows, layers, hidden]
    image_tokens/rank00-00000.npy   [rows, layers, n_image_tokens, hidden]
    merged-001/index.json, merged-001/<position>.npy    every row in manifest order, after merge()

Shards are ``.npy``: one dense fp16/fp32 array each, which ``np.load(mmap_mode="r")`` maps without
reading and slices by row or layer without copying, and which any numpy reads. safetensors maps too,
but a slice comes out through its own API as a copy, and its string metadata adds nothing here: the
row ids live in the index, whose atomic rewrite is what makes a shard visible.

Crash safety: a shard's files are written under temporary names and renamed into place, *then* the
rank's index is rewritten atomically to name them. A kill leaves either a committed shard or a file no
index names (invisible, and overwritten by the next run under the same name). Each rank writes only its
own index, so ranks never race on a file. ``merge()`` builds a new ``merged-NNN`` folder atomically that
lists the shards it replaces; readers use the newest one and ignore what it replaces.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from probes.errors import BadInputError, ConfigError, ProvenanceError
from probes.storage import atomic_dir, atomic_path, cache_root, hash_json, read_json, write_json

FORMAT = 1
POSITIONS = ("image_mean", "last", "image_tokens")
STORE_DTYPES = ("float16", "float32")
# The provenance fields that change the stored numbers or the rows; the store key hashes exactly these.
KEY_FIELDS = ("format", "backbone", "prompt", "positions", "layers", "store_dtype", "rows")
_INDEX_GLOB = "index-rank*.json"


def activations_root() -> Path:
    return cache_root() / "activations"


def store_key(provenance: dict[str, Any]) -> str:
    provenance = {"format": FORMAT, **provenance}
    return hash_json({k: provenance.get(k) for k in KEY_FIELDS})


class ActivationStore:
    """A folder of captured activations with one provenance. Build with :meth:`create` or :meth:`open`.

    Views are in manifest order (``rows.json``), whatever order ranks and shards were written in.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.provenance: dict[str, Any] = read_json(self.path / "provenance.json")
        self.row_ids: list[str] = read_json(self.path / "rows.json")["ids"]

    # --- opening ---------------------------------------------------------------------------------
    @classmethod
    def create(
        cls, provenance: dict[str, Any], row_ids: Sequence[str], path: str | Path | None = None
    ) -> ActivationStore:
        """The store for ``provenance`` (under ``<cache>/activations/<key>`` unless ``path``).

        An existing store is reopened for resuming, after checking that it has the same provenance.
        """
        provenance = {**provenance, "format": FORMAT}
        _validate(provenance, row_ids)
        provenance["key"] = store_key(provenance)
        path = Path(path) if path is not None else activations_root() / provenance["key"]
        if (path / "provenance.json").is_file():
            return cls.open(path, expect=provenance)
        # rows.json first: provenance.json is what marks a folder as a store. Ranks that create the
        # same store at once write identical bytes, each file in one rename.
        write_json(path / "rows.json", {"ids": list(row_ids)})
        write_json(path / "provenance.json", provenance)
        return cls(path)

    @classmethod
    def open(cls, path: str | Path, expect: dict[str, Any] | None = None) -> ActivationStore:
        """Open an existing store; with ``expect``, refuse it unless its KEY_FIELDS are equal."""
        path = Path(path)
        if not (path / "provenance.json").is_file():
            raise BadInputError(path, "not an activation store (no provenance.json)")
        store = cls(path)
        if expect is not None:
            store.check(expect)
        return store

    def check(self, expect: dict[str, Any]) -> None:
        """Raise a one-line :class:`ProvenanceError` naming the first key field that differs."""
        expect = {"format": FORMAT, **expect}
        for name in KEY_FIELDS:
            diff = _difference(self.provenance.get(name), expect.get(name), name)
            if diff:
                field, cached, asked = diff
                raise ProvenanceError(
                    self.path,
                    f"{field} differs (cached {_short(cached)}, asked {_short(asked)}); "
                    "use another store folder or the default one for these settings",
                )

    # --- what is in it ---------------------------------------------------------------------------
    @property
    def key(self) -> str:
        return self.provenance["key"]

    @property
    def positions(self) -> list[str]:
        return self.provenance["positions"]

    @property
    def layers(self) -> list[int]:
        """Stored layer indices: 0 = input of the first decoder layer, i = output of decoder layer i."""
        return self.provenance["layers"]

    @property
    def ids(self) -> list[str]:
        """Captured row ids, in manifest order."""
        return self._ordered(self._visible())

    @property
    def missing(self) -> list[str]:
        done = set(self.ids)
        return [i for i in self.row_ids if i not in done]

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def skipped(self) -> list[dict[str, str]]:
        """Rows a capture skipped (bad input) that are still missing, with the reason."""
        missing = set(self.missing)
        reasons: dict[str, str] = {}
        for index in self._rank_indexes():
            reasons.update(index["skipped"])
        return [{"id": i, "reason": reasons[i]} for i in self.row_ids if i in missing and i in reasons]

    def shard_names(self) -> list[str]:
        return [e["name"] for e in self._visible()]

    def row_shape(self, position: str) -> tuple[int, ...] | None:
        """Shape of one row of ``position`` (``(layers, hidden)`` or ``(layers, tokens, hidden)``)."""
        entries = self._visible()
        if not entries:
            return None
        return tuple(self._map(entries[0], position).shape[1:])

    def summary(self) -> dict[str, Any]:
        """A JSON-able account of the store, for reports."""
        return {
            "path": str(self.path),
            "key": self.key,
            "rows_planned": len(self.row_ids),
            "rows_captured": len(self.ids),
            "complete": self.complete,
            "skipped": self.skipped,
            "shards": self.shard_names(),
            "positions": {p: self.row_shape(p) for p in self.positions},
            "layers": self.layers,
            "store_dtype": self.provenance["store_dtype"],
        }

    # --- reading ---------------------------------------------------------------------------------
    def load(self, position: str, layers: Sequence[int] | None = None) -> tuple[list[str], np.ndarray]:
        """``(ids, array)`` of ``position`` for every captured row, in manifest order.

        ``array`` is ``[N, len(layers), hidden]`` (``[N, len(layers), tokens, hidden]`` for
        ``image_tokens``); ``layers`` are stored layer indices (default: all). When one file holds every
        row in order (after :meth:`merge`) the array is a read-only memory map (a view for a contiguous
        layer range); otherwise it is assembled shard by shard into one array: never more RAM than the
        result plus one shard's slice.
        """
        if position not in self.positions:
            raise ConfigError(f"position={position}", f"not in this store; it holds {self.positions}")
        columns = self._columns(layers)
        entries = self._visible()
        ids = self._ordered(entries)
        if not entries:
            raise BadInputError(self.path, "no rows captured yet")
        if len(entries) == 1 and entries[0]["ids"] == ids:
            return ids, _select(self._map(entries[0], position), columns)
        first = self._map(entries[0], position)
        out = np.empty((len(ids), len(columns or self.layers), *first.shape[2:]), dtype=first.dtype)
        self._fill(out, ids, entries, position, columns)
        return ids, out

    def _columns(self, layers: Sequence[int] | None) -> list[int] | None:
        if layers is None:
            return None
        unknown = [k for k in layers if k not in self.layers]
        if unknown:
            raise ConfigError(f"layers={list(layers)}", f"{unknown} not stored; this store holds {self.layers}")
        return [self.layers.index(k) for k in layers]

    def _fill(self, out: np.ndarray, ids: list[str], entries: list[dict], position: str, columns) -> None:
        """Copy each entry's rows into ``out`` at their manifest-order rows, one memory map at a time."""
        row_of = {row_id: i for i, row_id in enumerate(ids)}
        for entry in entries:
            rows = np.fromiter((row_of[i] for i in entry["ids"]), dtype=np.int64, count=len(entry["ids"]))
            out[rows] = _select(self._map(entry, position), columns)

    def _map(self, entry: dict, position: str) -> np.ndarray:
        return np.load(self.path / entry["files"][position], mmap_mode="r")

    # --- writing ---------------------------------------------------------------------------------
    def writer(self, rank: int = 0) -> ShardWriter:
        return ShardWriter(self, rank)

    def merge(self) -> bool:
        """Rewrite every visible row into one file per position, in manifest order; drop the old shards.

        Run it when no rank is writing (after a barrier). Returns False when there was nothing to merge.
        """
        entries = self._visible()
        latest = self._latest_merged()
        if not entries or (len(entries) == 1 and latest is not None and entries[0]["name"] == latest.name):
            return False
        ids = self._ordered(entries)
        number = int(latest.name.split("-")[1]) + 1 if latest is not None else 1
        name = f"merged-{number:03d}"
        replaces = sorted({e["name"] for e in entries} | set(self._replaced()))
        with atomic_dir(self.path / name) as tmp:
            for position in self.positions:
                first = self._map(entries[0], position)
                out = np.lib.format.open_memmap(
                    tmp / f"{position}.npy", mode="w+", dtype=first.dtype, shape=(len(ids), *first.shape[1:])
                )
                self._fill(out, ids, entries, position, None)
                out.flush()
                del out
            files = {p: f"{name}/{p}.npy" for p in self.positions}
            write_json(tmp / "index.json", {"name": name, "ids": ids, "files": files, "replaces": replaces})
        self._delete_replaced()
        return True

    def _delete_replaced(self) -> None:
        """Remove files that the newest merged folder replaces (left behind only by a kill mid-merge)."""
        replaced = set(self._replaced())
        for folder in self.path.glob("merged-*"):
            if folder.name in replaced:
                shutil.rmtree(folder, ignore_errors=True)
        for index in self._rank_indexes():
            for entry in index["shards"]:
                if entry["name"] in replaced:
                    for rel in entry["files"].values():
                        (self.path / rel).unlink(missing_ok=True)
        for position in self.positions:
            folder = self.path / position
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()

    # --- the visible shards ----------------------------------------------------------------------
    def _rank_indexes(self) -> list[dict]:
        return [read_json(p) for p in sorted(self.path.glob(_INDEX_GLOB))]

    def _latest_merged(self) -> Path | None:
        done = sorted(p.parent for p in self.path.glob("merged-*/index.json"))
        return done[-1] if done else None

    def _replaced(self) -> list[str]:
        latest = self._latest_merged()
        return read_json(latest / "index.json")["replaces"] if latest is not None else []

    def _visible(self) -> list[dict]:
        """Committed entries (the newest merged folder, then rank shards it does not replace)."""
        latest = self._latest_merged()
        entries = [read_json(latest / "index.json")] if latest is not None else []
        replaced = set(self._replaced())
        for index in self._rank_indexes():
            entries += [e for e in index["shards"] if e["name"] not in replaced]
        seen: dict[str, str] = {}
        planned = set(self.row_ids)
        for entry in entries:
            for row_id in entry["ids"]:
                if row_id in seen:
                    raise ProvenanceError(
                        self.path,
                        f"row {row_id!r} is in both {seen[row_id]} and {entry['name']}: two captures wrote the "
                        "same rows; delete one of the shards",
                    )
                if row_id not in planned:
                    raise ProvenanceError(self.path, f"row {row_id!r} in {entry['name']} is not in rows.json")
                seen[row_id] = entry["name"]
        return entries

    def _ordered(self, entries: list[dict]) -> list[str]:
        done = {row_id for e in entries for row_id in e["ids"]}
        return [i for i in self.row_ids if i in done]


class ShardWriter:
    """Commits one rank's shards: files first, then the rank's index (the commit) in one rename."""

    def __init__(self, store: ActivationStore, rank: int = 0):
        self.store = store
        self.rank = rank
        self.index_path = store.path / f"index-rank{rank:02d}.json"
        self.index = (
            read_json(self.index_path) if self.index_path.is_file() else {"rank": rank, "shards": [], "skipped": {}}
        )

    def commit(self, ids: Sequence[str], arrays: dict[str, np.ndarray], skipped: dict[str, str]) -> str | None:
        """Write a shard of ``ids`` (``arrays`` maps each position to ``[len(ids), ...]``) and record
        ``skipped`` rows (id -> reason). Returns the shard name, or None when only skips were recorded.
        """
        name = None
        if ids:
            if set(arrays) != set(self.store.positions):
                raise ConfigError(f"positions={sorted(arrays)}", f"the store holds {self.store.positions}")
            if any(len(a) != len(ids) for a in arrays.values()):
                raise ConfigError(f"shard of {len(ids)} rows", "every position needs one array row per id")
            # The sequence number counts committed shards, so an uncommitted file left by a kill is
            # overwritten by the next shard of this rank rather than shadowing it.
            name = f"rank{self.rank:02d}-{len(self.index['shards']):05d}"
            files = {}
            for position, array in arrays.items():
                rel = f"{position}/{name}.npy"
                with atomic_path(self.store.path / rel) as tmp, open(tmp, "wb") as fh:
                    np.save(fh, np.ascontiguousarray(array))
                files[position] = rel
            self.index["shards"].append({"name": name, "ids": list(ids), "files": files})
        done = set(ids)
        kept = {k: v for k, v in self.index["skipped"].items() if k not in done}
        if name or {**kept, **skipped} != self.index["skipped"]:
            self.index["skipped"] = {**kept, **skipped}
            write_json(self.index_path, self.index)
        return name


def _validate(provenance: dict[str, Any], row_ids: Sequence[str]) -> None:
    positions = provenance.get("positions") or []
    unknown = [p for p in positions if p not in POSITIONS]
    if not positions or unknown:
        raise ConfigError(f"positions={positions}", f"choose from {POSITIONS}")
    if provenance.get("store_dtype") not in STORE_DTYPES:
        raise ConfigError(f"store_dtype={provenance.get('store_dtype')}", f"choose from {STORE_DTYPES}")
    seen: set[str] = set()
    for row_id in row_ids:
        if row_id in seen:
            raise BadInputError(f"row {row_id!r}", "duplicate id: every row of a store needs its own id")
        seen.add(row_id)


def _select(array: np.ndarray, columns: list[int] | None) -> np.ndarray:
    """Layer columns of ``array``: a view for a contiguous run, a copy of just those columns otherwise."""
    if columns is None:
        return array
    if columns == list(range(columns[0], columns[-1] + 1)):
        return array[:, columns[0] : columns[-1] + 1]
    return array[:, columns]


def _difference(cached: Any, asked: Any, field: str) -> tuple[str, Any, Any] | None:
    """The dotted name and values of the first leaf where ``cached`` and ``asked`` differ."""
    if isinstance(cached, dict) and isinstance(asked, dict):
        for k in sorted(set(cached) | set(asked)):
            diff = _difference(cached.get(k), asked.get(k), f"{field}.{k}")
            if diff:
                return diff
        return None
    return None if cached == asked else (field, cached, asked)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


__all__ = [
    "FORMAT",
    "KEY_FIELDS",
    "POSITIONS",
    "STORE_DTYPES",
    "ActivationStore",
    "ShardWriter",
    "activations_root",
    "store_key",
]
