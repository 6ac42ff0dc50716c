"""Reading Deep-VRM and base checkpoints (safetensors) into a Deep-VRM model.

Two key layouts are read, detected per checkpoint:

- ``legacy`` (transformers 4.x, the official preview code, and what transformers 5.24 still writes for
  Qwen2-VL / Qwen2.5-VL): ``visual.*``, ``visual_low_level.*``, ``model.layers.*``, ``model.embed_tokens.*``,
  ``model.norm.*``, ``lm_head.*``;
- ``current`` (the module names of transformers 5): ``model.visual.*``, ``model.visual_low_level.*``,
  ``model.language_model.*``, ``lm_head.*``.

Fusion parameters (``fusion.*``) have the same name in both. Parts a checkpoint may lack: the low-level
encoder (a base checkpoint: it is then copied from the main encoder, or initialised at random, as the
settings say), the fusion gate (initialised to zero) and a tied ``lm_head``. Anything else missing, any
key the model lacks and any shape mismatch is a one-line :class:`WeightsError` naming the first key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from safetensors import safe_open
from transformers import PreTrainedModel

from probes.errors import BadInputError, WeightsError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_LEGACY_PREFIXES = ("visual.", "visual_low_level.", "model.layers.", "model.embed_tokens.", "model.norm.")


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: one file, or the shards named by its index."""
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    raise BadInputError(folder, f"no {SINGLE_FILE} or {INDEX_FILE} in this folder")


def checkpoint_shapes(files: Iterable[Path]) -> dict[str, tuple[int, ...]]:
    """Key → shape, read from the safetensors headers only."""
    shapes = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            names = f.keys()  # safe_open is not iterable
            for key in names:
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def detect_layout(keys: Iterable[str]) -> str:
    """``legacy`` when any key has a transformers-4 prefix, else ``current``."""
    return "legacy" if any(k.startswith(_LEGACY_PREFIXES) for k in keys) else "current"


def legacy_to_current(key: str) -> str:
    """A transformers-4 key as a transformers-5 module name (other keys unchanged)."""
    if key.startswith("visual"):  # visual.* and visual_low_level.*
        return f"model.{key}"
    if key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual")):
        return f"model.language_model.{key.removeprefix('model.')}"
    return key


def load_checkpoint(model: PreTrainedModel, folder: Path, optional_parts: dict[str, str]) -> dict[str, str]:
    """Load ``folder``'s weights into ``model`` after checking every key and shape first.

    ``optional_parts`` maps a part name to its key prefix (e.g. ``{"low_level": "model.visual_low_level."}``):
    a part the checkpoint lacks entirely is left as it is and reported ``missing`` for the caller to fill; a
    part it has only some keys of is an error. Returns ``{"layout": ..., part: "checkpoint" | "missing"}``.
    """
    files = checkpoint_files(folder)
    shapes = checkpoint_shapes(files)
    layout = detect_layout(shapes)
    rename = legacy_to_current if layout == "legacy" else _same
    names = {rename(key): key for key in shapes}
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name, key in names.items():
        if name not in expected:
            raise WeightsError(key, f"not a weight of {type(model).__name__} ({layout} layout, read as {name})")
        if shapes[key] != expected[name]:
            raise WeightsError(key, f"shape {list(shapes[key])} in the checkpoint but {list(expected[name])} in the model")
    absent = {n for n in expected if n not in names}
    tied = _tied_partners(model)
    missing = [n for n in expected if n in absent and tied.get(n) not in names]
    report = {"layout": layout}
    for part, prefix in optional_parts.items():
        report[part] = _part_status(part, prefix, expected, missing)
    required = [n for n in missing if not n.startswith(tuple(optional_parts.values()))]
    if required:
        raise WeightsError(required[0], f"missing from the checkpoint ({layout} layout; {len(required)} keys missing)")
    for file in files:
        with safe_open(file, framework="pt") as f:
            names = f.keys()
            model.load_state_dict({rename(k): f.get_tensor(k) for k in names}, strict=False)
    model.tie_weights(missing_keys=absent, recompute_mapping=False)  # ties to whichever side was loaded
    return report


def _same(key: str) -> str:
    return key


def _part_status(part: str, prefix: str, expected: dict, missing: list[str]) -> str:
    part_keys = [n for n in expected if n.startswith(prefix)]
    part_missing = [n for n in missing if n.startswith(prefix)]
    if not part_keys:
        return "none"
    if not part_missing:
        return "checkpoint"
    if len(part_missing) == len(part_keys):
        return "missing"
    raise WeightsError(part_missing[0], f"missing from the checkpoint, which has only part of the {part} weights")


def _tied_partners(model: PreTrainedModel) -> dict[str, str]:
    """Each tied parameter name → its partner (``lm_head.weight`` ↔ ``...embed_tokens.weight``)."""
    tied = model.all_tied_weights_keys
    return {**tied, **{source: target for target, source in tied.items()}}
