"""What forensic-mini will contain, decided before any pixel is made.

The plan is a pure function of the config and the available photo and stamp ids: every random choice
comes from a numpy generator seeded with ``(seed, stream, index)``, so an item's parameters do not depend
on any other item, on the order of work, or on a resumed build.

Grouping. Every photo and every stamp goes to one of ``n_blocks`` blocks, stratified by class; an image
only combines a photo and stamps of one block, so blocks are disjoint in source photo AND in object.
Blocks map to splits in order: the first 60 % train, the next 20 % val, the rest test.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from probes.data.sources import Item

if TYPE_CHECKING:
    from probes.data.forensic_mini import ForensicMiniConfig

D1_KINDS = ("upside_down", "recolour", "clones", "scale")
SPLITS = ("train", "val", "test")
# Streams of the seeded generators: one per kind of choice.
_BLOCKS, _PHOTOS, _COMPOSITES, _TWINS, _POOL, _PARTNERS = range(6)


@dataclass(frozen=True)
class Crop:
    """A square crop of a source photo: side = ``frac`` x the short side; ``u, v`` place it in [0, 1]."""

    source: str
    frac: float
    u: float
    v: float


@dataclass(frozen=True)
class Placement:
    """A stamp on the canvas: long side = ``scale`` x canvas side, centred at ``(cx, cy)`` (fractions)."""

    stamp: str
    scale: float
    cx: float
    cy: float
    flip: bool


@dataclass(frozen=True)
class Cue:
    """The one change that makes a plausible composite implausible (applied to its main object)."""

    kind: str
    hue: float | None = None  # recolour: hue turn in degrees; None inverts the colours
    grid: tuple[int, int] | None = None  # clones: rows, columns
    scale: float | None = None  # scale: the object's absurd new size


@dataclass(frozen=True)
class Scene:
    """One image made from a photo crop: a plain crop, a composite, or a composite's implausible twin."""

    key: str
    kind: str  # photo | composite
    block: int
    scene_id: str
    crop: Crop
    objects: tuple[Placement, ...] = ()
    cue: Cue | None = None


@dataclass
class Plan:
    photos: list[Scene]
    composites: list[Scene]
    twins: list[Scene]
    pool: list[Scene]  # semantic pre-training composites, train blocks only
    partners: dict[str, list[str]] = field(default_factory=dict)  # family or post -> keys of the real images


def block_splits(n_blocks: int) -> list[str]:
    """The split of each block: about 60 % train, 20 % val, the rest test (at least one block each)."""
    n_val = max(1, round(0.2 * n_blocks))
    n_train = min(round(0.6 * n_blocks), n_blocks - n_val - 1)
    return ["train"] * n_train + ["val"] * n_val + ["test"] * (n_blocks - n_train - n_val)


def split_shares(n_blocks: int) -> dict[str, float]:
    """Each split's share of the blocks (0.6, 0.2, 0.2 for 10 blocks)."""
    counts = Counter(block_splits(n_blocks))
    return {s: counts[s] / n_blocks for s in SPLITS}


def assign_blocks(items: Sequence[Item], n_blocks: int, seed: int) -> dict[str, int]:
    """Deal items to blocks, class by class, so every block gets a mix of classes.

    Within a class, each item goes to the split furthest below its share (so a class of three reaches
    train, val and test), then to that split's block with the fewest items of the class, then the fewest
    items overall. Ties go to the lower index: the result is deterministic.
    """
    splits, shares = block_splits(n_blocks), split_shares(n_blocks)
    rng = np.random.default_rng([seed, _BLOCKS])
    by_class: dict[str, list[str]] = {}
    for item in sorted(items, key=lambda i: i.id):
        by_class.setdefault(item.cls, []).append(item.id)
    sizes = [0] * n_blocks
    out: dict[str, int] = {}
    for cls in sorted(by_class, key=lambda c: (-len(by_class[c]), c)):
        per_split: Counter[str] = Counter()
        per_block: Counter[int] = Counter()
        for idx in rng.permutation(len(by_class[cls])):
            split = min(SPLITS, key=lambda s: (per_split[s] / shares[s], SPLITS.index(s)))
            block = min(
                (b for b in range(n_blocks) if splits[b] == split), key=lambda b: (per_block[b], sizes[b], b)
            )
            out[by_class[cls][idx]] = block
            per_split[split] += 1
            per_block[block] += 1
            sizes[block] += 1
    return out


def make_plan(config: ForensicMiniConfig, photos: Sequence[Item], stamps: Sequence[Item]) -> Plan:
    """The full plan for a :class:`~probes.data.forensic_mini.ForensicMiniConfig`."""
    seed, n_blocks = config.seed, config.n_blocks
    blocks = {**assign_blocks(photos, n_blocks, seed), **assign_blocks(stamps, n_blocks, seed + 1)}
    pools = _Pools(photos, stamps, blocks, n_blocks, seed)
    plan_photos = [_photo(pools, i, seed) for i in range(config.n_photos)]
    composites = [
        _composite(pools, f"composite-{i:05d}", i % n_blocks, i // n_blocks, (seed, _COMPOSITES, i))
        for i in range(config.n_composites)
    ]
    twins = _twins(composites, config.n_implausible, seed)
    train_blocks = [b for b, s in enumerate(block_splits(n_blocks)) if s == "train"]
    # The pool's turn runs over all its items, not per block, so it pairs photos and stamps otherwise.
    pool = [
        _composite(pools, f"pool-{i:05d}", train_blocks[i % len(train_blocks)], i, (seed, _POOL, i))
        for i in range(config.n_semantic_pool)
    ]
    plan = Plan(plan_photos, composites, twins, pool)
    plan.partners = _partners(plan, config, seed)
    return plan


class _Pools:
    """Each block's photos and stamps, in a seeded order that items cycle through."""

    def __init__(
        self, photos: Sequence[Item], stamps: Sequence[Item], blocks: dict[str, int], n: int, seed: int
    ):
        rng = np.random.default_rng([seed, _PHOTOS])
        self.photo_order = [photos[i].id for i in rng.permutation(len(photos))]
        self.block_photos = [[p for p in self.photo_order if blocks[p] == b] for b in range(n)]
        order = [stamps[i].id for i in rng.permutation(len(stamps))]
        self.block_stamps = [[s for s in order if blocks[s] == b] for b in range(n)]
        self.blocks = blocks


def _crop(rng: np.random.Generator, source: str) -> Crop:
    frac = float(rng.choice([1.0, 0.6, 0.35]))
    return Crop(source, frac, float(rng.random()), float(rng.random()))


def _photo(pools: _Pools, i: int, seed: int) -> Scene:
    source = pools.photo_order[i % len(pools.photo_order)]
    crop = _crop(np.random.default_rng([seed, _PHOTOS, i]), source)
    return Scene(f"photo-{i:05d}", "photo", pools.blocks[source], f"scene-photo-{i:05d}", crop)


# Object counts and their long-side scales: several objects stand side by side, each smaller.
_N_OBJECTS = (1, 2, 3)
_N_OBJECTS_P = (0.7, 0.2, 0.1)
_SCALES = {1: (0.4, 0.8), 2: (0.35, 0.55), 3: (0.28, 0.42)}


def _composite(pools: _Pools, key: str, block: int, turn: int, stream: tuple[int, ...]) -> Scene:
    """A background crop of the block with 1-3 distinct stamps of the block, upright, at natural scales.

    ``turn`` cycles through the block's photos and (main) stamps, so each is used about equally.
    """
    rng = np.random.default_rng(list(stream))
    photos, stamps = pools.block_photos[block], pools.block_stamps[block]
    crop = _crop(rng, photos[turn % len(photos)])
    n = min(int(rng.choice(_N_OBJECTS, p=_N_OBJECTS_P)), len(stamps))
    main = turn % len(stamps)
    others = [int(j) for j in rng.permutation(len(stamps)) if j != main][: n - 1]
    slots = rng.permutation(n)
    objects = tuple(
        Placement(
            stamps[j],
            float(rng.uniform(*_SCALES[n])),
            float((slot + 0.5 + rng.uniform(-0.08, 0.08)) / n),
            float(rng.uniform(0.45, 0.65)),
            bool(rng.random() < 0.5),
        )
        for j, slot in zip([main, *others], slots)
    )
    return Scene(key, "composite", block, f"scene-{key}", crop, objects)


def _twins(composites: list[Scene], n: int, seed: int) -> list[Scene]:
    """Implausible twins of ``n`` composites: same crop, same stamps, one semantic cue on the main object."""
    rng = np.random.default_rng([seed, _TWINS])
    parents = sorted(int(i) for i in rng.permutation(len(composites))[:n])
    twins = []
    for j, i in enumerate(parents):
        parent = composites[i]
        cue = _cue(D1_KINDS[j % len(D1_KINDS)], np.random.default_rng([seed, _TWINS, j]))
        key = f"implausible-{j:05d}"
        twins.append(Scene(key, "composite", parent.block, parent.scene_id, parent.crop, parent.objects, cue))
    return twins


def _cue(kind: str, rng: np.random.Generator) -> Cue:
    if kind == "recolour":  # an unnatural hue turn, or (half the time) inverted colours
        return Cue(kind, hue=float(rng.uniform(90, 270)) if rng.random() < 0.5 else None)
    if kind == "clones":
        return Cue(kind, grid=((2, 2), (2, 3), (3, 3), (3, 4))[int(rng.integers(4))])
    if kind == "scale":  # absurdly tiny, or giant and overflowing the frame
        tiny = rng.random() < 0.5
        return Cue(kind, scale=float(rng.uniform(0.08, 0.14) if tiny else rng.uniform(1.1, 1.5)))
    return Cue(kind)


def _partners(plan: Plan, config: ForensicMiniConfig, seed: int) -> dict[str, list[str]]:
    """The real image each trace fake or distractor is made from.

    Each family (and distractor kind) takes its partners split by split in the blocks' proportions
    (60/20/20: even 6 fakes reach val and test), alternating photo crops and composites. Partners are drawn
    without reuse while the reals last (composites without an implausible twin first, so fakes of
    different kinds seldom share a scene), then the queues start over.
    """
    rng = np.random.default_rng([seed, _PARTNERS])
    splits, shares = block_splits(config.n_blocks), split_shares(config.n_blocks)
    twinned = {t.scene_id for t in plan.twins}
    queues: dict[tuple[str, str], deque[str]] = {
        (s, k): deque() for s in SPLITS for k in ("photo", "composite")
    }
    for scenes in (plan.photos, plan.composites):
        order = sorted(rng.permutation(len(scenes)), key=lambda i: scenes[i].scene_id in twinned)
        for i in order:
            queues[(splits[scenes[i].block], scenes[i].kind)].append(scenes[i].key)
    wanted = {f: n for f, n in config.families.items() if f != "dcgan_faces"} | dict(config.distractors)
    return {
        name: [
            _take(queues, split, ("photo", "composite")[k % 2])
            for k, split in enumerate(_split_sequence(n, shares))
        ]
        for name, n in wanted.items()
    }


def interleaved_blocks(n_blocks: int) -> list[int]:
    """All blocks, ordered so that any run of them spans the splits in proportion (0, 6, 1, 8, 2, ...)."""
    free = {s: [b for b, bs in enumerate(block_splits(n_blocks)) if bs == s] for s in SPLITS}
    return [free[s].pop(0) for s in _split_sequence(n_blocks, split_shares(n_blocks))]


def _split_sequence(n: int, shares: dict[str, float]) -> list[str]:
    """``n`` split names in proportion to ``shares``, interleaved (train, val, train, test, ...)."""
    counts: Counter[str] = Counter()
    out = []
    for k in range(1, n + 1):
        split = max(SPLITS, key=lambda s: shares[s] * k - counts[s])
        counts[split] += 1
        out.append(split)
    return out


def _take(queues: dict[tuple[str, str], deque[str]], split: str, kind: str) -> str:
    """The next real of that split and kind (else of the other kind, else any); it goes to the back."""
    other = "composite" if kind == "photo" else "photo"
    candidates = [(split, kind), (split, other), *queues]
    queue = next(queues[c] for c in candidates if queues[c])
    queue.append(queue.popleft())
    return queue[-1]
