"""Deep-VRM settings: where the low-level stream is fused, how, and how its encoder starts.

They are stored in the backbone's own ``config.json`` under the key ``"deep_vrm"``, so a Deep-VRM save
is still a valid Qwen2.5-VL (or Qwen2-VL, mini-VL) config. A config without that key (a base checkpoint,
or one saved by the official preview code) gets the defaults, which are the official settings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from probes.errors import ConfigError

CONFIG_KEY = "deep_vrm"
FUSIONS = ("average", "add", "gated")
GATES = ("scalar", "channel", "token")
LOW_LEVEL_INITS = ("copy", "random")


@dataclass(frozen=True)
class DeepVRMConfig:
    """How the low-level visual stream enters the decoder.

    Args:
        injection_layer: decoder layers (1-based count) that run before the fusion: the stream is fused into
            the output of layer ``injection_layer`` and enters layer ``injection_layer + 1``. Valid range
            1..num_layers-1; the official model uses 16 of 28.
        fusion: ``average`` = (h + v) / 2 (official), ``add`` = h + v, ``gated`` = h + g ⊙ v with a
            zero-initialised learnable gate g (g = 0 gives the base model exactly).
        gate: shape of the gate for ``gated``: ``scalar`` (one number), ``channel`` (one per hidden channel)
            or ``token`` (one per image token, from a small MLP on [h, v] whose output layer starts at zero).
        gate_hidden: width of the ``token`` gate's MLP.
        low_level_init: where the low-level encoder starts when a checkpoint has none: ``copy`` of the main
            vision encoder (the paper's method; fixes the preview code, which left it random) or ``random``
            (ablation).
    """

    injection_layer: int = 16
    fusion: str = "average"
    gate: str = "scalar"
    gate_hidden: int = 64
    low_level_init: str = "copy"

    def __post_init__(self):
        _check_choice("fusion", self.fusion, FUSIONS)
        _check_choice("gate", self.gate, GATES)
        _check_choice("low_level_init", self.low_level_init, LOW_LEVEL_INITS)
        if not isinstance(self.injection_layer, int) or isinstance(self.injection_layer, bool):
            raise ConfigError(f"injection_layer={self.injection_layer!r}", "must be an integer")
        if not isinstance(self.gate_hidden, int) or self.gate_hidden < 1:
            raise ConfigError(f"gate_hidden={self.gate_hidden!r}", "must be a positive integer")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> DeepVRMConfig:
        values = dict(values or {})
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"{CONFIG_KEY}.{unknown[0]}", f"unknown Deep-VRM setting; known: {[f.name for f in fields(cls)]}")
        return cls(**values)

    @classmethod
    def from_backbone_config(cls, config, **overrides) -> DeepVRMConfig:
        """The settings stored in a backbone config (defaults where absent), with ``overrides`` applied."""
        return cls.from_dict({**(getattr(config, CONFIG_KEY, None) or {}), **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r}", f"unknown {name}; use one of {list(choices)}")
