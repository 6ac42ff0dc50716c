"""Inspection of trained Deep-VRM models (``python analysis.py inspect forgetting|gating|ablate|all``).

- :mod:`~injection.inspect.forgetting`: base vs naive fine-tune vs Deep-VRM on held-out semantic QA, semantic
  probes per layer, probe transfer, debiased CKA per layer (Table 2 shape), and the frozen-prefix check;
- :mod:`~injection.inspect.gating`: how the injected stream is used, per generator and cue (removed, shuffled,
  partner-swapped stream; gate and ‖g⊙v‖/‖h‖; attention to the image tokens), with a verdict;
- :mod:`~injection.inspect.ablate`: depth sweep and variants of stage 2, trained through
  :func:`injection.train.train` (cached by config hash, resumable) and evaluated;
- :mod:`~injection.inspect.cka`: debiased linear CKA with an image bootstrap.

>>> from injection.inspect import ForgettingConfig, run_forgetting
>>> summary = run_forgetting({"base": "mini-vl", "naive": "runs/naive", "deepvrm": "runs/s2"}, out="inspect/")
"""

from injection.inspect.ablate import AblateConfig, RunSpec, early_layers_trainable, plan, run_ablate
from injection.inspect.cka import debiased_cka, drift, layer_cka
from injection.inspect.forgetting import ForgettingConfig, probe_transfer, run_forgetting
from injection.inspect.gating import (
    AttentionToImage,
    GatingConfig,
    measure,
    partner_map,
    replacement_stream,
    run_gating,
    shuffle_map,
    verdict,
)

__all__ = [
    "AblateConfig",
    "AttentionToImage",
    "ForgettingConfig",
    "GatingConfig",
    "RunSpec",
    "debiased_cka",
    "drift",
    "early_layers_trainable",
    "layer_cka",
    "measure",
    "partner_map",
    "plan",
    "probe_transfer",
    "replacement_stream",
    "run_ablate",
    "run_forgetting",
    "run_gating",
    "shuffle_map",
    "verdict",
]
