"""Grouped splits only: every fold keeps whole groups (blocks of source photos and objects) on one side.

There is deliberately no row-level or token-level split: images made from one photo (its crops, its
fakes, its distractors) would otherwise sit on both sides and a probe would learn the photo, not the
label. ``fold`` is the group column (forensic-mini's block); data without it get one from the source id
with :func:`assign_folds`. Every fold is checked with :func:`check_grouping` before it is returned.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from probes.data.manifest import Record
from probes.errors import BadInputError

GROUP_KEYS = ("source_id", "object_id")


class GroupLeakError(BadInputError):
    """A source photo or object on both sides of a split."""


@dataclass(frozen=True)
class Fold:
    """Row indices (into the records given) of one train/test partition."""

    name: str
    train: np.ndarray
    test: np.ndarray


def assign_folds(records: Sequence[Record], k: int) -> None:
    """Give each record without a ``fold`` one in ``0..k-1``, from a hash of its ``source_id`` (in place)."""
    for r in records:
        if r.fold is None:
            if r.source_id is None:
                raise BadInputError(r.id, "no source_id to group by; set source_id or fold")
            r.fold = int(hashlib.sha256(r.source_id.encode()).hexdigest(), 16) % k


def group_folds(
    records: Sequence[Record], splits: Iterable[str] | None = None, k: int | None = None
) -> list[Fold]:
    """Group k-fold over the ``fold`` column: each fold tests on its groups and trains on the others.

    ``splits`` keeps only records of those splits (e.g. ``("train", "val")`` for model selection);
    ``k=None`` gives one fold per group value, else groups are dealt in sorted order to ``k`` folds.
    """
    idx = _in_splits(records, splits)
    groups = np.array([_fold(records[i]) for i in idx], dtype=np.int64)
    values = sorted(set(groups.tolist()))
    k = len(values) if k is None else k
    if not 2 <= k <= len(values):
        raise BadInputError(
            "k", f"{k} folds need between 2 and {len(values)} groups (there are {len(values)})"
        )
    fold_of = {g: j % k for j, g in enumerate(values)}
    assigned = np.array([fold_of[g] for g in groups.tolist()], dtype=np.int64)
    return [_checked(records, f"fold-{j}", idx[assigned != j], idx[assigned == j]) for j in range(k)]


def logo_folds(
    records: Sequence[Record],
    families: Iterable[str] | None = None,
    train_splits: Iterable[str] = ("train", "val"),
    test_splits: Iterable[str] = ("test",),
) -> list[Fold]:
    """Leave-one-generator-out: per family, train on the reals and the other families' fakes of
    ``train_splits``; test on the held-out family's fakes and the reals of ``test_splits``.

    ``families`` defaults to every generator with a fake row. The splits are disjoint groups, so no
    source photo or object of the test side was seen in training.
    """
    fams = sorted({r.generator for r in records if r.label == "fake"}) if families is None else list(families)
    train_idx, test_idx = _in_splits(records, train_splits), _in_splits(records, test_splits)
    folds = []
    for fam in fams:
        train = [i for i in train_idx if records[i].label == "real" or records[i].generator != fam]
        test = [i for i in test_idx if records[i].label == "real" or records[i].generator == fam]
        if not any(records[i].label == "fake" for i in test):
            raise BadInputError(fam, "no fake of this family in the test splits")
        folds.append(_checked(records, f"logo-{fam}", np.array(train), np.array(test)))
    return folds


def check_grouping(train: Sequence[Record], test: Sequence[Record]) -> None:
    """Raise a one-line :class:`GroupLeakError` if a source_id or object_id is on both sides."""
    for key in GROUP_KEYS:
        shared = _groups(train, key) & _groups(test, key)
        if shared:
            first = sorted(shared)[0]
            raise GroupLeakError(f"{key} {first}", f"in both train and test ({len(shared)} shared {key}s)")


def _groups(records: Sequence[Record], key: str) -> set[str]:
    out = {getattr(r, key) for r in records} - {None}
    if key == "object_id":  # every object of a composite, not only the main one
        out |= {o for r in records for o in r.extra.get("objects", [])}
    return out


def _in_splits(records: Sequence[Record], splits: Iterable[str] | None) -> np.ndarray:
    wanted = None if splits is None else set(splits)
    return np.array([i for i, r in enumerate(records) if wanted is None or r.split in wanted], dtype=np.int64)


def _fold(r: Record) -> int:
    if r.fold is None:
        raise BadInputError(r.id, "no fold (group) value; call assign_folds first")
    return r.fold


def _checked(records: Sequence[Record], name: str, train: np.ndarray, test: np.ndarray) -> Fold:
    check_grouping([records[i] for i in train], [records[i] for i in test])
    return Fold(name, train.astype(np.int64), test.astype(np.int64))
