"""The injection site: one forward hook on decoder layer K that fuses the low-level stream, and the
switches that inspection tooling uses to change it at inference.

The model arms the site at the start of every forward pass: with the image-token mask and the stream
when that pass has image tokens and pixel values (the prefill), disarmed otherwise (decode steps with a
KV cache, text-only passes). An armed hook replaces the output rows of ``layers[K - 1]`` at the mask by
``fusion(h, v)``; every other position, layer and pass is untouched.

Switches (context managers, nestable; each restores the previous state on exit)::

    with model.fusion_off(): ...                          # no fusion: the base model's path
    with model.low_level_override(torch.zeros_like): ...   # v -> f(v): ablate, scale, project out, ...
    with model.low_level_override(other_v): ...           # v replaced by given rows (another image's stream)
    with model.record_fusion() as records: ...            # one FusionRecord per fused pass

With nnsight, ``layers[K - 1].output`` is h before the fusion (nnsight reads the module's own output) and
``layers[K].input`` is the fused state; ``output_hidden_states[K]`` is the fused state too (this hook runs
before transformers' recording hooks), as in the official code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import Tensor, nn

from probes.errors import BadInputError

# Tensor shape aliases, as in probes.backbones.base.
TokenMask = Tensor  # [batch, seq] bool
ImageTokens = Tensor  # [n_image_tokens, hidden], image-token order
StreamEdit = Tensor | Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class FusionRecord:
    """What one fused pass did at the image tokens. Rows are in image-token order; tensors are detached.

    Attributes:
        mask: [batch, seq] bool, the image-token positions.
        hidden: [N, D] h, the output of layer K before the fusion.
        stream: [N, D] v, the low-level stream after any override.
        fused: [N, D] the rows that enter layer K + 1.
        gate: g of a gated fusion ([1], [D] or [N, 1]); None for ``average`` and ``add``.
    """

    mask: TokenMask
    hidden: ImageTokens
    stream: ImageTokens
    fused: ImageTokens
    gate: Tensor | None

    @property
    def injected(self) -> ImageTokens:
        """[N, D] what the fusion added to h: g ⊙ v (gated), v (add), (v − h) / 2 (average)."""
        return self.fused - self.hidden

    def ratio(self) -> Tensor:
        """[N] ‖injected‖ / ‖h‖ per image token (‖g ⊙ v‖ / ‖h‖ for a gated fusion)."""
        return self.injected.norm(dim=-1) / self.hidden.norm(dim=-1)


class InjectionSite:
    """The hook on ``layer`` (decoder layer K, 1-based) and its state. Owned by the Deep-VRM model.

    ``fusion`` is a getter, not a module, so that the hook calls whatever module the model holds now
    (PEFT may replace it by a wrapper).
    """

    def __init__(self, layer: nn.Module, injection_layer: int, fusion: Callable[[], nn.Module]):
        self.layer = layer
        self.injection_layer = injection_layer
        self._fusion = fusion
        self._pending: tuple[TokenMask, ImageTokens] | None = None
        self._enabled = True
        self._edit: StreamEdit | None = None
        self._records: list[FusionRecord] | None = None
        layer.register_forward_hook(self._hook, prepend=True)  # before hooks that read the output (hidden_states)

    # --- arming, by the model's forward --------------------------------------------------------
    def arm(self, mask: TokenMask, compute_stream: Callable[[], ImageTokens]) -> None:
        """Fuse in the next pass of the layer at ``mask``. The stream is computed here, once per forward,
        unless the fusion is off or an override replaces it."""
        self._pending = None
        if not self._enabled:
            return
        edit = self._edit
        stream = edit if isinstance(edit, Tensor) else compute_stream()
        if callable(edit):
            stream = edit(stream)
        n_tokens = int(mask.sum())
        if stream.shape[0] != n_tokens:
            raise BadInputError("low-level stream", f"{stream.shape[0]} rows for {n_tokens} image tokens")
        self._pending = (mask, stream)

    def disarm(self) -> None:
        self._pending = None

    @property
    def armed(self) -> bool:
        return self._pending is not None

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if self._pending is None:
            return None
        mask, stream = self._pending
        hidden = output[mask]
        fused, gate = self._fusion()(hidden, stream.to(hidden.dtype))
        if self._records is not None:
            self._records.append(_record(mask, hidden, stream, fused, gate))
        # out of place: the layer's output may be needed by autograd as it is
        return output.index_put((mask,), fused)

    # --- switches, for inspection --------------------------------------------------------------
    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        """No fusion inside the block (the low-level encoder does not run either)."""
        previous, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = previous

    @contextlib.contextmanager
    def override(self, edit: StreamEdit) -> Iterator[None]:
        """Replace the stream inside the block: a Tensor [N, D] (rows for the image tokens of the batch,
        in image-token order) replaces v; a callable maps v to f(v)."""
        previous, self._edit = self._edit, edit
        try:
            yield
        finally:
            self._edit = previous

    @contextlib.contextmanager
    def record(self) -> Iterator[list[FusionRecord]]:
        """Collect a :class:`FusionRecord` per fused pass inside the block (decode steps add none)."""
        previous, self._records = self._records, []
        try:
            yield self._records
        finally:
            self._records = previous


def _record(mask: TokenMask, hidden: Tensor, stream: Tensor, fused: Tensor, gate: Tensor | None) -> FusionRecord:
    return FusionRecord(
        mask=mask.detach(),
        hidden=hidden.detach(),
        stream=stream.detach(),
        fused=fused.detach(),
        gate=None if gate is None else gate.detach(),
    )
