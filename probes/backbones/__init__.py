"""Backbone adapters and the registry that loads a model by name, folder or hub id.

>>> from probes.backbones import load_backbone
>>> bb = load_backbone("tiny-qwen2.5-vl")                      # random, for code-path tests
>>> bb = load_backbone("/models/Qwen2.5-VL-7B-Instruct", dtype="bfloat16", device="cuda")
>>> bb.num_layers, bb.image_token_id, bb.sites()
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from probes.backbones.base import BackboneAdapter, LoadSettings
from probes.backbones.qwen2_5_vl import Qwen2_5_VLAdapter
from probes.backbones.qwen2_vl import Qwen2VLAdapter
from probes.errors import BadInputError, ConfigError

_ADAPTERS: dict[str, type[BackboneAdapter]] = {}  # config.model_type -> adapter class
_BUILTINS: dict[str, Callable[..., BackboneAdapter]] = {}  # short name -> factory(settings, **options)


def register(cls: type[BackboneAdapter]) -> type[BackboneAdapter]:
    """Class decorator: make ``cls`` the adapter for each of its ``model_types``."""
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls
    return cls


def register_builtin(name: str, factory: Callable[..., BackboneAdapter]) -> None:
    """A named backbone that needs no path (the embedded default, tiny test models)."""
    _BUILTINS[name] = factory


def adapter_class(model_type: str) -> type[BackboneAdapter]:
    if model_type not in _ADAPTERS:
        raise ConfigError(f"model_type={model_type}", f"no adapter registered; known: {sorted(_ADAPTERS)}")
    return _ADAPTERS[model_type]


def known_backbones() -> dict[str, list[str]]:
    return {"builtin": sorted(_BUILTINS), "model_types": sorted(_ADAPTERS)}


def load_backbone(
    model: str,
    *,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    device: str = "cpu",
    trust_remote_code: bool = False,
    **options,
) -> BackboneAdapter:
    """Load a backbone by built-in name, local folder or hub id (hub ids resolve from the local HF cache).

    ``options`` go to the family's loader (e.g. ``image_pixels`` for Qwen, ``num_layers`` for tiny models).
    """
    settings = LoadSettings(dtype, attn_implementation, device, trust_remote_code)
    if model in _BUILTINS:
        return _BUILTINS[model](settings, **options)
    return adapter_class(_model_type(model, trust_remote_code)).from_pretrained(model, settings, **options)


def build_from_config(
    config: str | Path | dict, *, device: str = "meta", dtype: str = "bfloat16", attn_implementation: str = "sdpa"
) -> BackboneAdapter:
    """Build a backbone from a ``config.json`` (path or dict) alone; on ``meta`` no memory is used.

    For counting parameters, checking paths and injection points of real 3B/7B architectures.
    """
    from transformers import AutoConfig

    if not isinstance(config, dict):
        path = Path(config)
        if not path.is_file():
            raise BadInputError(path, "no such config file")
        config = json.loads(path.read_text())
    fields = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "transformers_version")}
    cfg = AutoConfig.for_model(**fields)
    settings = LoadSettings(dtype, attn_implementation, device)
    return adapter_class(cfg.model_type).from_config(cfg, settings)


def wrap(model, processor, *, source: str = "in-memory", settings: LoadSettings | None = None) -> BackboneAdapter:
    """An adapter around a model already in memory."""
    cls = adapter_class(model.config.model_type)
    settings = settings or LoadSettings(dtype=str(model.dtype).removeprefix("torch."),
                                        attn_implementation=model.config._attn_implementation or "sdpa",
                                        device=str(model.device))
    return cls(model, processor, source=source, settings=settings)


def _model_type(model: str, trust_remote_code: bool) -> str:
    path = Path(model)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise BadInputError(path, "no config.json in this folder")
        return json.loads(config.read_text())["model_type"]
    if path.suffix or "/" not in model or model.startswith((".", "/")):
        raise BadInputError(model, f"no such folder, and not a built-in backbone ({sorted(_BUILTINS)})")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code).model_type
    except OSError as e:
        raise BadInputError(model, f"cannot load its config offline ({e.__class__.__name__}); pass a local folder") from None


def _tiny(family: str):
    def factory(settings: LoadSettings, **options) -> BackboneAdapter:
        from probes.backbones.tiny import build_tiny

        return build_tiny(family, settings=settings, **options)

    return factory


register(Qwen2_5_VLAdapter)
register(Qwen2VLAdapter)
register_builtin("tiny-qwen2.5-vl", _tiny("qwen2_5_vl"))
register_builtin("tiny-qwen2-vl", _tiny("qwen2_vl"))

__all__ = [
    "BackboneAdapter",
    "LoadSettings",
    "Qwen2VLAdapter",
    "Qwen2_5_VLAdapter",
    "adapter_class",
    "build_from_config",
    "known_backbones",
    "load_backbone",
    "register",
    "register_builtin",
    "wrap",
]

# mini-VL, the embedded default: its adapter and the built-in "mini-vl" (trained checkpoint from the cache).
from probes.backbones.mini_vl import MiniVLAdapter, load_mini_vl  # noqa: E402

register(MiniVLAdapter)
register_builtin("mini-vl", load_mini_vl)
