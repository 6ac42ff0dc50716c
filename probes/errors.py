"""User-facing errors: one line each, naming the item at fault.

Every error a user can cause (a bad image, a malformed row, a missing path, an out-of-range layer,
mismatched weights, a cache of another provenance) is a :class:`LensError`. The CLI prints
``str(err)`` alone, without a traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

OnError = Literal["skip", "stop"]


class LensError(Exception):
    """Base class: its message is one line that names the item."""

    def __init__(self, item: object, reason: str):
        self.item = str(item)
        self.reason = " ".join(str(reason).split())  # one line, whatever the cause said
        super().__init__(f"{self.item}: {self.reason}")


class BadInputError(LensError, ValueError):
    """An image, a row or a path that cannot be used."""


class ConfigError(LensError, ValueError):
    """An option out of range or unknown (a layer index, a fusion name, a backbone family)."""


class ProvenanceError(LensError):
    """Cached artifacts that were made with other weights, data or settings than those asked for."""


class WeightsError(LensError):
    """A checkpoint whose keys or shapes do not match the model."""


class UnavailableError(LensError):
    """Something a backbone or a package cannot provide here, with the reason why."""


@dataclass
class ErrorLog:
    """Applies an ``--on-error skip|stop`` policy and keeps what was skipped for the run summary."""

    policy: OnError = "stop"
    skipped: list[dict[str, str]] = field(default_factory=list)

    def handle(self, err: LensError) -> None:
        """Re-raise under ``stop``; record under ``skip``."""
        if self.policy == "stop":
            raise err
        self.skipped.append({"item": err.item, "reason": err.reason})

    def summary(self) -> dict:
        return {"on_error": self.policy, "skipped": len(self.skipped), "skipped_items": self.skipped}

    def __str__(self) -> str:
        return json.dumps(self.summary())
