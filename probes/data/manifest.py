"""The manifest: ms-swift rows, as Deep-VRM's own data, plus the columns the analyses need.

One row per image (JSON array or JSONL)::

    {"id": "fm-00042",
     "messages": [{"role": "user", "content": "Is this image real or fake? Please just answer 'real' or 'fake'. <image>"},
                  {"role": "assistant", "content": "fake"}],
     "images": ["images/fm-00042.png"],
     "label": "fake", "source_id": "photo/cv_baboon", "scene_id": "scene-0042", "object_id": null,
     "semantic_class": "animal", "scene_class": "animal", "generator": "cyclegan", "cue": "trace",
     "split": "test", "fold": 8, "kind": "photo", "post": "none", ...}

Image paths are relative to the manifest's folder unless absolute. ``source_id`` is the grouping key
for every split (the source photo); ``scene_id`` ties an image to its content-aligned partners (the
real crop behind a fake, the fakes made from a real crop). Unknown keys are kept in ``extra`` and
written back unchanged.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from probes.errors import BadInputError, ErrorLog
from probes.storage import hash_bytes, write_text

IMAGE_TAG = "<image>"
LABELS = ("real", "fake")
CUES = ("semantic", "trace", "none")
SPLITS = ("train", "val", "test")
KINDS = ("photo", "composite")  # how a real image (and so its fakes) was made
POSTS = ("none", "jpeg_double", "resize_roundtrip")  # post-processing of a real distractor
DEFAULT_PROMPT = "Is this image real or fake? Please just answer 'real' or 'fake'. <image>"
OBJECT_PROMPT = "What is in this image? <image>"
SCENE_PROMPT = "What kind of scene is this? <image>"


@dataclass
class Record:
    """One manifest row. ``label`` is ``None`` when unknown (an unlabelled eval set)."""

    id: str
    messages: list[dict[str, str]]
    images: list[str]
    label: str | None = None
    source_id: str | None = None
    scene_id: str | None = None
    object_id: str | None = None
    semantic_class: str | None = None
    scene_class: str | None = None
    generator: str | None = None
    cue: str | None = None
    split: str | None = None
    fold: int | None = None
    d1_kind: str | None = None
    kind: str | None = None
    post: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    orig_width: int | None = None
    orig_height: int | None = None
    orig_format: str | None = None
    orig_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # --- views --------------------------------------------------------------------------------
    @property
    def prompt(self) -> str:
        """The user turn, with its ``<image>`` tag."""
        return next(m["content"] for m in self.messages if m["role"] == "user")

    @property
    def answer(self) -> str | None:
        """The assistant turn, if the row has one."""
        return next((m["content"] for m in self.messages if m["role"] == "assistant"), None)

    @property
    def is_fake(self) -> bool | None:
        return None if self.label is None else self.label == "fake"

    def image_path(self, root: str | Path) -> Path:
        p = Path(self.images[0])
        return p if p.is_absolute() else Path(root) / p

    # --- (de)serialisation --------------------------------------------------------------------
    def to_row(self) -> dict[str, Any]:
        row = {k: v for k, v in asdict(self).items() if k != "extra"}
        row.update(self.extra)
        return row

    @classmethod
    def from_row(cls, row: Any, where: str) -> Record:
        """Validate one row; ``where`` (``file:line``) names it in the error."""
        if not isinstance(row, dict):
            raise BadInputError(where, f"a row must be a JSON object, got {type(row).__name__}")
        messages, images = row.get("messages"), row.get("images")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise BadInputError(where, "'messages' must be a list of {role, content} objects")
        if not any(m["role"] == "user" for m in messages):
            raise BadInputError(where, "no user message")
        if not isinstance(images, list) or not images or not all(isinstance(i, str) and i for i in images):
            raise BadInputError(where, "no image: 'images' must be a non-empty list of paths")
        user = next(m["content"] for m in messages if m["role"] == "user")
        if user.count(IMAGE_TAG) != len(images):
            raise BadInputError(where, f"{user.count(IMAGE_TAG)} {IMAGE_TAG} tags for {len(images)} images")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: row[k] for k in known if k in row}
        kwargs.setdefault("id", where)
        if kwargs.get("label") is not None and kwargs["label"] not in LABELS:
            raise BadInputError(where, f"label {kwargs['label']!r} is not one of {LABELS}")
        if kwargs.get("cue") is not None and kwargs["cue"] not in CUES:
            raise BadInputError(where, f"cue {kwargs['cue']!r} is not one of {CUES}")
        for name, allowed in (("split", SPLITS), ("kind", KINDS), ("post", POSTS)):
            if kwargs.get(name) is not None and kwargs[name] not in allowed:
                raise BadInputError(where, f"{name} {kwargs[name]!r} is not one of {allowed}")
        extra = {k: v for k, v in row.items() if k not in known}
        return cls(**kwargs, extra=extra)


def swift_messages(prompt: str, answer: str | None) -> list[dict[str, str]]:
    """An ms-swift conversation: the user prompt (``<image>`` after the text), then the answer."""
    msgs = [{"role": "user", "content": prompt}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def read_manifest(path: str | Path, errors: ErrorLog | None = None) -> list[Record]:
    """Read a JSON array or JSONL file of rows.

    A malformed row raises a one-line error naming ``file:line``; with ``errors`` under the ``skip``
    policy it is recorded there and left out instead.
    """
    errors = errors or ErrorLog("stop")
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, "no such manifest file")
    records: list[Record] = []
    seen: set[str] = set()
    for where, row in _raw_rows(path):
        try:
            if isinstance(row, BadInputError):
                raise row
            rec = Record.from_row(row, where)
            if rec.id in seen:
                raise BadInputError(where, f"duplicate id {rec.id!r}")
        except BadInputError as err:
            errors.handle(err)
            continue
        seen.add(rec.id)
        records.append(rec)
    return records


def _raw_rows(path: Path) -> Iterable[tuple[str, Any]]:
    """``(where, row)`` pairs; a row that does not parse comes as a :class:`BadInputError`."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInputError(f"{path}:{e.lineno}", f"malformed JSON ({e.msg})") from None
        yield from ((f"{path}[{i}]", r) for i, r in enumerate(rows))
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:{lineno}", BadInputError(f"{path}:{lineno}", f"malformed JSON row ({e.msg})")


def dumps_manifest(records: Sequence[Record]) -> str:
    """JSONL, one row per line, in the given order, with sorted keys: equal data give equal bytes."""
    return "".join(json.dumps(r.to_row(), sort_keys=True, ensure_ascii=False) + "\n" for r in records)


def write_manifest(path: str | Path, records: Sequence[Record]) -> str:
    """Write atomically; return the manifest hash (sha256 of the bytes written)."""
    text = dumps_manifest(records)
    write_text(path, text)
    return hash_bytes(text.encode("utf-8"))


def manifest_hash(path: str | Path) -> str:
    return hash_bytes(Path(path).read_bytes())


SUMMARY_COLUMNS = (
    *("label", "generator", "cue", "split", "kind", "post"),
    *("d1_kind", "semantic_class", "scene_class"),
)


def summarize(records: Sequence[Record]) -> dict[str, Any]:
    """Row counts per value of each column, and the original file formats per label (JSON-able).

    The last table is the confound check: real JPEGs against fake PNGs (as in GenImage) show up there.
    """
    out: dict[str, Any] = {"rows": len(records)}
    for col in SUMMARY_COLUMNS:
        out[col] = _count(str(getattr(r, col)) for r in records)
    by_label: dict[str, list[str]] = {}
    for r in records:
        by_label.setdefault(str(r.label), []).append(str(r.orig_format))
    out["orig_format_by_label"] = {label: _count(fmts) for label, fmts in sorted(by_label.items())}
    return out


def _count(values: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))
