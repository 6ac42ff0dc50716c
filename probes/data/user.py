"""Loaders for users' own data, with the same de-biasing as forensic-mini.

Every image is opened safely and normalised (:mod:`.images`: RGB, center square crop, Lanczos to
``size``, PNG level 0) into ``<out>/images/<sha256 of the original file>.png``, so a real JPEG and a fake
PNG end up indistinguishable by size, mode, format and byte length. The original file's width, height,
format and byte length stay in the ``orig_*`` columns, so a confound probe can still find a data set's
format bias (GenImage: real JPEG, fake PNG).

Normalised images are written atomically and reused by content hash, so an interrupted load resumes;
the manifest is written once, atomically, at the end. Bad items follow ``on_error``: ``stop`` raises
the one-line error, ``skip`` leaves the item out and lists it in the summary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probes.data.answers import parse_answer
from probes.data.images import ImageInfo, file_info, load_normalised, write_png
from probes.data.manifest import (
    DEFAULT_PROMPT,
    Record,
    read_manifest,
    summarize,
    swift_messages,
    write_manifest,
)
from probes.errors import BadInputError, ErrorLog, OnError
from probes.storage import cache_root, hash_file, hash_json

GENIMAGE_LABELS = {"ai": "fake", "nature": "real"}
GENIMAGE_SPLITS = ("train", "val")
Grouping = Callable[[Path], str]  # image path -> source_id (the grouping key of every split)


@dataclass
class UserDataset:
    """A loaded, normalised data set: its records, where its manifest is, and what was skipped."""

    name: str
    folder: Path
    records: list[Record]
    errors: ErrorLog

    @property
    def manifest_path(self) -> Path:
        return self.folder / "manifest.jsonl"

    def summary(self) -> dict[str, Any]:
        """JSON-able: counts per column, original formats per label, and the skipped items."""
        return {
            "name": self.name,
            "manifest": str(self.manifest_path),
            **summarize(self.records),
            **self.errors.summary(),
        }


def load_deepvrm_json(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    size: int = 128,
    on_error: OnError | ErrorLog = "stop",
    out: str | Path | None = None,
    group: Grouping | None = None,
) -> UserDataset:
    """Load Deep-VRM / ms-swift rows (a JSON array or JSONL), e.g. ``DATA/Test/eval_data.json``.

    Image paths are relative to ``image_root`` (default: the JSON file's folder). The label comes from a
    ``label`` column if present, else from the assistant answer (:func:`~.answers.parse_answer`, which
    reads real/fake, natural/AI-generated and yes/no against the question); rows without an answer get
    no label (an evaluation set). Extra keys (e.g. ``channel``) are kept. ``source_id`` defaults to the
    image's file stem (Deep-VRM gives a real image and its reconstruction the same file name).
    """
    path = Path(path)
    errors = on_error if isinstance(on_error, ErrorLog) else ErrorLog(on_error)
    base = Path(image_root) if image_root is not None else path.parent
    loader = _Normaliser(_out_folder(out, "deepvrm", path, size), size, errors)
    records = []
    for n, row in enumerate(read_manifest(path, errors)):
        try:
            records.append(_deepvrm_record(row, base, loader, group, n))
        except BadInputError as err:
            errors.handle(err)
    return loader.finish(path.stem, records)


def _deepvrm_record(row: Record, base: Path, loader: _Normaliser, group: Grouping | None, n: int) -> Record:
    if len(row.images) != 1:
        raise BadInputError(row.id, f"{len(row.images)} images in one row; one image per row is supported")
    src = Path(row.images[0])
    src = src if src.is_absolute() else base / src
    label = row.label
    if label is None and row.answer is not None:
        label = parse_answer(row.prompt, row.answer)
        if label is None:
            raise BadInputError(row.id, f"cannot read real/fake from the answer {row.answer!r}")
    fields = {k: v for k, v in row.to_row().items() if k not in ("id", "images", "label")}
    fields |= {"id": f"row-{n:06d}", "orig_id": row.id, "label": label}
    fields["source_id"] = row.source_id or (group(src) if group else src.stem)
    return loader.record(src, fields)


def load_genimage(
    root: str | Path,
    *,
    size: int = 128,
    on_error: OnError | ErrorLog = "stop",
    out: str | Path | None = None,
    group: Grouping | None = None,
    generators: Iterable[str] | None = None,
) -> UserDataset:
    """Load GenImage-style folders ``{generator}/{train,val}/{ai,nature}/*``.

    ``ai`` is fake (``generator`` = the folder name), ``nature`` real (``generator`` "none", the folder in
    the ``subset`` column); ``split`` is train or val. ``source_id`` is the file stem unless ``group``
    maps an image path to a grouping key. ``generators`` keeps only those folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise BadInputError(root, "no such folder")
    errors = on_error if isinstance(on_error, ErrorLog) else ErrorLog(on_error)
    files = list(_genimage_files(root, None if generators is None else set(generators)))
    if not files:
        raise BadInputError(root, "no {generator}/{train,val}/{ai,nature}/ image folders here")
    loader = _Normaliser(_out_folder(out, "genimage", root, size), size, errors)
    records = []
    for n, (subset, split, label, src) in enumerate(files):
        fields = {
            "id": f"row-{n:06d}",
            "messages": swift_messages(DEFAULT_PROMPT, label),
            "label": label,
            "generator": subset if label == "fake" else "none",
            "split": split,
            "source_id": group(src) if group else src.stem,
            "subset": subset,
        }
        try:
            records.append(loader.record(src, fields))
        except BadInputError as err:
            errors.handle(err)
    return loader.finish(root.name, records)


def _genimage_files(root: Path, keep: set[str] | None) -> Iterable[tuple[str, str, str, Path]]:
    """``(generator folder, split, label, file)`` in sorted order; hidden files left out."""
    for gen in sorted(p for p in root.iterdir() if p.is_dir()):
        if keep is not None and gen.name not in keep:
            continue
        for split in GENIMAGE_SPLITS:
            for folder, label in GENIMAGE_LABELS.items():
                d = gen / split / folder
                if d.is_dir():
                    for f in sorted(d.rglob("*")):
                        if f.is_file() and not f.name.startswith("."):
                            yield gen.name, split, label, f


def _out_folder(out: str | Path | None, loader: str, source: Path, size: int) -> Path:
    if out is not None:
        return Path(out)
    key = hash_json({"loader": loader, "source": str(source.resolve()), "size": size})
    return cache_root() / "data" / "user" / f"{source.stem or loader}-{key}"


class _Normaliser:
    """Writes each original's normalised PNG once (keyed by the original's sha256) and builds rows."""

    def __init__(self, folder: Path, size: int, errors: ErrorLog):
        self.folder, self.size, self.errors = folder, size, errors

    def record(self, src: Path, fields: dict[str, Any]) -> Record:
        orig, out, rel = self._normalised(src)
        described = {"width": out.width, "height": out.height, "format": out.format, "bytes": out.bytes}
        row = {**fields, **described, "sha256": out.sha256, "images": [rel]}
        row |= {"orig_width": orig.width, "orig_height": orig.height, "orig_format": orig.format}
        row |= {"orig_bytes": orig.bytes, "orig_path": str(src)}
        return Record.from_row(row, str(src))

    def _normalised(self, src: Path) -> tuple[ImageInfo, ImageInfo, str]:
        orig = file_info(src)
        rel = f"images/{orig.sha256[:2]}/{orig.sha256}.png"
        target = self.folder / rel
        if not target.is_file():  # else an earlier (perhaps interrupted) load made it from the same bytes
            write_png(target, load_normalised(src, self.size)[0])
        out = ImageInfo(self.size, self.size, "PNG", target.stat().st_size, hash_file(target))
        return orig, out, rel

    def finish(self, name: str, records: list[Record]) -> UserDataset:
        write_manifest(self.folder / "manifest.jsonl", records)
        return UserDataset(name, self.folder, records, self.errors)
