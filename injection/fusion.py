"""The three ways the low-level stream v is fused into the hidden states h at image-token positions.

Every fusion maps ``(hidden [N, D], stream [N, D])`` (the N image-token rows of the batch, in image-token
order) to ``(fused [N, D], gate)``, where ``gate`` is the g of ``h + g ⊙ v`` (broadcastable to [N, D]) or
``None`` for the fixed fusions. Returning the gate from ``forward`` keeps it readable when PEFT wraps the
module (``modules_to_save``), since the wrapper forwards calls but not attribute reads.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from injection.config import DeepVRMConfig


class AverageFusion(nn.Module):
    """(h + v) / 2: the official Deep-VRM fusion (α = β = 0.5)."""

    def forward(self, hidden: Tensor, stream: Tensor) -> tuple[Tensor, None]:
        return (hidden + stream) / 2, None


class AddFusion(nn.Module):
    """h + v: a plain residual add."""

    def forward(self, hidden: Tensor, stream: Tensor) -> tuple[Tensor, None]:
        return hidden + stream, None


class GatedFusion(nn.Module):
    """h + g ⊙ v with a learnable gate that starts at exactly zero (Flamingo-style), so that a fresh
    model gives the base model's logits bit for bit.

    ``kind`` sets the gate's shape: ``scalar`` → [1], ``channel`` → [D], ``token`` → [N, 1] from an MLP
    on [h, v] (2D → ``gate_hidden`` → 1) whose output layer is zero-initialised.
    """

    def __init__(self, hidden_size: int, kind: str = "scalar", gate_hidden: int = 64):
        super().__init__()
        self.kind = kind
        if kind == "token":
            self.mlp = nn.Sequential(nn.Linear(2 * hidden_size, gate_hidden), nn.GELU(), nn.Linear(gate_hidden, 1))
        else:
            self.gate = nn.Parameter(torch.zeros(1 if kind == "scalar" else hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """g = 0 everywhere. Also called by the loader when a checkpoint has no gate."""
        with torch.no_grad():
            if self.kind == "token":
                self.mlp[0].reset_parameters()
                self.mlp[2].weight.zero_()
                self.mlp[2].bias.zero_()
            else:
                self.gate.zero_()

    def gate_values(self, hidden: Tensor, stream: Tensor) -> Tensor:
        """g: [1], [D] or [N, 1]."""
        if self.kind == "token":
            return self.mlp(torch.cat([hidden, stream], dim=-1))
        return self.gate

    def forward(self, hidden: Tensor, stream: Tensor) -> tuple[Tensor, Tensor]:
        gate = self.gate_values(hidden, stream)
        return hidden + gate * stream, gate

    def extra_repr(self) -> str:
        return f"kind={self.kind}"


def build_fusion(config: DeepVRMConfig, hidden_size: int) -> nn.Module:
    """The fusion module named by ``config.fusion`` (and ``config.gate`` for ``gated``)."""
    if config.fusion == "average":
        return AverageFusion()
    if config.fusion == "add":
        return AddFusion()
    return GatedFusion(hidden_size, config.gate, config.gate_hidden)
