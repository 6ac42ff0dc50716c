"""Probe tasks: which images, which labels, which grouping — read from the manifest alone.

A task picks rows of the manifest (hence of the activation store), gives each an integer label, and
names the group key that keeps related images on one side of every split:

- ``semantic``: what object an image shows (composites, 10 object classes), grouped by **object**, since
  the label is the object's class and one object appears in several composites;
- ``scene``: what kind of scene (real photos and composites, 10 scene classes), grouped by source photo;
- ``d1``: semantic-cue fakes vs their plausible twins (the paper's D₁; same photo crop, same object);
- ``d2``: trace-only fakes vs the real images they re-render (the paper's D₂), grouped by source photo so
  a real image and its re-renders share a side;
- ``gen:<family>``: one generator's fakes vs their real partners;
- ``fake``: every labelled image, fake vs real, grouped by source (for data without content-aligned pairs,
  such as GenImage; its source ids are then per image).

On the embedded default the backbone was pretrained on the train split's real images, so by default every
task keeps the held-out splits only: a probe must not tell "seen in pretraining" from "not seen".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from probes.data.manifest import Record
from probes.errors import BadInputError, ConfigError
from probes.stats import control_labels

HELD_OUT = ("val", "test")
SEMANTIC_TASKS = ("semantic", "scene")
ARTIFACT_TASKS = ("d1", "d2")


@dataclass(frozen=True)
class Task:
    """A probe task over the rows of a manifest.

    ``rows`` index the manifest (and the activation store in manifest order); ``labels[i]`` is an index
    into ``classes``; ``groups[i]`` is the group of ``rows[i]``; ``generator[i]`` the fake's family
    ("none" for reals), for per-generator metrics.
    """

    name: str
    description: str
    rows: np.ndarray  # [n] int64
    labels: np.ndarray  # [n] int64
    classes: tuple[str, ...]
    groups: np.ndarray  # [n] str
    group_key: str
    generator: np.ndarray  # [n] str

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def counts(self) -> dict[str, int]:
        return {c: int((self.labels == i).sum()) for i, c in enumerate(self.classes)}

    def groups_per_class(self) -> dict[str, int]:
        return {c: len(set(self.groups[self.labels == i])) for i, c in enumerate(self.classes)}

    def without_thin_classes(self, min_groups: int) -> tuple[Task, list[str]]:
        """Drop classes held by fewer than ``min_groups`` groups (grouped folds cannot test them).

        Raises a one-line :class:`BadInputError` naming the task when fewer than two classes are left
        (a single-class task included): no probe can be fit then.
        """
        keep = [c for c, g in self.groups_per_class().items() if g >= min_groups]
        dropped = [c for c in self.classes if c not in keep]
        if len(keep) < 2:
            raise BadInputError(self.name, f"fewer than two classes have {min_groups} {self.group_key} groups "
                                f"(groups per class: {self.groups_per_class()}); a probe needs two classes")
        if not dropped:
            return self, []
        rows = np.isin(self.labels, [self.classes.index(c) for c in keep])
        labels = np.array([keep.index(self.classes[i]) for i in self.labels[rows]], dtype=np.int64)
        task = Task(self.name, self.description, self.rows[rows], labels, tuple(keep), self.groups[rows],
                    self.group_key, self.generator[rows])
        return task, dropped

    def control(self, seed: int) -> Task:
        """Hewitt & Liang's control task: random labels per image, with the same class balance."""
        labels = control_labels(self.labels, seed=seed)
        return Task(f"control:{self.name}", f"random labels per image (seed {seed}) with the balance of "
                    f"{self.name}", self.rows, labels, self.classes, self.groups, self.group_key, self.generator)


def _real(r: Record) -> bool:
    return r.label == "real" and (r.post or "none") == "none"


def _make(name: str, description: str, records: Sequence[Record], picked: list[int], label_of,
          classes: Sequence[str], group_key: str) -> Task:
    if not picked:
        raise BadInputError(name, "no rows in this manifest for the task")
    labels = np.array([classes.index(label_of(records[i])) for i in picked], dtype=np.int64)
    groups = []
    for i in picked:
        key = getattr(records[i], group_key)
        if key is None:
            raise BadInputError(records[i].id, f"no {group_key} to group task {name!r} by")
        groups.append(str(key))
    generator = np.array([records[i].generator or "none" for i in picked])
    return Task(name, description, np.asarray(picked, dtype=np.int64), labels, tuple(classes),
                np.asarray(groups), group_key, generator)


def _partners(records: Sequence[Record], keep: list[int], fake) -> list[int]:
    """The chosen fakes plus the untouched real images of the same scenes (content-aligned partners)."""
    fakes = [i for i in keep if fake(records[i])]
    scenes = {records[i].scene_id for i in fakes}
    reals = [i for i in keep if _real(records[i]) and records[i].scene_id in scenes]
    return sorted(fakes + reals)


def build_task(name: str, records: Sequence[Record], splits: Sequence[str] | None = HELD_OUT) -> Task:
    """The task ``name`` (see the module docstring) over ``records`` restricted to ``splits``."""
    keep = [i for i, r in enumerate(records) if splits is None or r.split in splits]
    if name == "semantic":
        picked = [i for i in keep if records[i].kind == "composite" and _real(records[i]) and records[i].object_id]
        classes = sorted({records[i].semantic_class for i in picked})
        return _make(name, "object class of the pasted photo cut-out (real composites)", records, picked,
                     lambda r: r.semantic_class, classes, "object_id")
    if name == "scene":
        picked = [i for i in keep if _real(records[i]) and records[i].scene_class]
        classes = sorted({records[i].scene_class for i in picked})
        return _make(name, "scene class of the source photo (real images)", records, picked,
                     lambda r: r.scene_class, classes, "source_id")
    if name == "d1":
        picked = _partners(records, keep, lambda r: r.cue == "semantic")
        return _make(name, "semantic-cue fakes vs their plausible twins (D1)", records, picked,
                     lambda r: r.label, ("real", "fake"), "source_id")
    if name == "d2":
        picked = _partners(records, keep, lambda r: r.cue == "trace" and r.scene_id is not None)
        return _make(name, "generator re-renders vs the real images they re-render (D2)", records, picked,
                     lambda r: r.label, ("real", "fake"), "source_id")
    if name == "fake":
        picked = [i for i in keep if records[i].label in ("real", "fake")]
        return _make(name, "every labelled image: fake vs real (user data sets such as GenImage)", records,
                     picked, lambda r: r.label, ("real", "fake"), "source_id")
    if name.startswith("gen:"):
        family = name.split(":", 1)[1]
        picked = _partners(records, keep, lambda r: r.generator == family and r.scene_id is not None)
        return _make(name, f"{family} re-renders vs their real partners", records, picked,
                     lambda r: r.label, ("real", "fake"), "source_id")
    raise ConfigError(f"task={name}", "unknown; use semantic, scene, d1, d2, fake or gen:<family>")


def generator_tasks(records: Sequence[Record], splits: Sequence[str] | None = HELD_OUT) -> list[str]:
    """``gen:<family>`` for every trace-fake family present with a partner in ``splits``."""
    families = sorted({r.generator for r in records if r.cue == "trace" and r.scene_id is not None
                       and (splits is None or r.split in splits)})
    return [f"gen:{f}" for f in families]


# --- the confound probe ----------------------------------------------------------------------------

CONFOUND_COLUMNS = ("width", "height", "bytes", "format", "orig_width", "orig_height", "orig_bytes", "orig_format")


def confound_features(records: Sequence[Record], rows: np.ndarray) -> np.ndarray:
    """``[n, 1, F]`` file-level features only (size, byte length, format one-hot; stored and original).

    A probe on these must sit at chance; if it does not, the label leaks through the files themselves
    (e.g. GenImage's JPEG reals vs PNG fakes) and every other probe on that data is suspect.
    """
    numeric = [c for c in CONFOUND_COLUMNS if not c.endswith("format")]
    formats = sorted({str(getattr(records[i], c)) for i in rows for c in ("format", "orig_format")})
    feats = []
    for i in rows:
        r = records[i]
        values = [float(getattr(r, c) or 0) for c in numeric]
        values += [float(str(r.format) == f) for f in formats] + [float(str(r.orig_format) == f) for f in formats]
        feats.append(values)
    return np.asarray(feats, dtype=np.float32)[:, None, :]
