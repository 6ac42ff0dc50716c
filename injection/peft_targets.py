"""LoRA targets per training stage, and the trainable-parameter count of a stage (paper.md §1, §5).

- Stage 1 ("semantic alignment"): LoRA r = 128, α = 256 on every linear layer of every decoder layer;
  vision encoders, embeddings and ``lm_head`` frozen.
- Stage 2 ("artifact-aware refinement"): LoRA r = 64, α = 128 on every linear layer of the low-level
  encoder (its blocks and its merger) and of the decoder layers with 0-based index ≥ K; the main encoder,
  layers < K, embeddings and ``lm_head`` frozen. A gated fusion's gate is trained in full
  (``modules_to_save``).

Convolutions of the low-level encoder are not LoRA targets by default (the official tuner took linear
layers only; for Qwen2.5-VL-7B and K = 16 stage 2 then has exactly 115,023,872 trainable parameters, the
paper's 115.02M). For a CNN tower (mini-VL) ``conv="pointwise"`` adds its 1×1 convolutions (LoRA cannot
follow the separate SAME padding of its k>1 ones) and ``conv="all"`` every convolution;
``low_level="full"`` trains the low-level encoder in full instead of with LoRA.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from injection.modeling import FUSION_NAME, DeepVRMForConditionalGeneration
from probes.backbones import adapter_class, build_from_config
from probes.backbones.base import BackboneAdapter, LoadSettings
from probes.errors import ConfigError

STAGE_LORA = {1: {"r": 128, "alpha": 256}, 2: {"r": 64, "alpha": 128}}
LORA_DROPOUT = 0.05  # ms-swift's default, which the official scripts keep
LOW_LEVEL_MODES = ("lora", "full")
CONV_MODES = ("none", "pointwise", "all")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def llm_linear_names(model: PreTrainedModel, first_layer: int = 0) -> list[str]:
    """Full names of the linear layers in decoder layers ``first_layer`` (0-based) and after."""
    adapter = _adapter(model)
    names = []
    for i, layer in enumerate(adapter.layers):
        if i >= first_layer:
            names += [f"{adapter.layers_path}.{i}.{n}" for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    return names


def low_level_target_names(model: DeepVRMForConditionalGeneration, conv: str = "none") -> list[str]:
    """Full names of the low-level encoder's linear layers, and of its convolutions as ``conv`` says."""
    root = model.low_level_path
    return [f"{root}.{n}" for n, m in model.low_level_encoder.named_modules() if _is_target(m, conv)]


def _is_target(module: nn.Module, conv: str) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if not isinstance(module, _CONVS) or conv == "none":
        return False
    return conv == "all" or all(k == 1 for k in module.kernel_size)


def lora_config(
    model: PreTrainedModel,
    stage: int,
    *,
    r: int | None = None,
    alpha: int | None = None,
    dropout: float = LORA_DROPOUT,
    low_level: str = "lora",
    conv: str = "none",
) -> LoraConfig:
    """The PEFT config of ``stage`` (1 or 2) for ``model``, with explicit target module names.

    Stage 2 needs a Deep-VRM model and takes K from it. ``low_level``: ``lora`` or ``full``; ``conv``:
    ``none``, ``pointwise`` or ``all`` (convolutions of the low-level encoder as LoRA targets).
    """
    if stage not in STAGE_LORA:
        raise ConfigError(f"stage={stage}", f"use one of {sorted(STAGE_LORA)}")
    if low_level not in LOW_LEVEL_MODES:
        raise ConfigError(f"low_level={low_level!r}", f"use one of {list(LOW_LEVEL_MODES)}")
    if conv not in CONV_MODES:
        raise ConfigError(f"conv={conv!r}", f"use one of {list(CONV_MODES)}")
    defaults = STAGE_LORA[stage]
    targets, to_save = _stage_targets(model, stage, low_level, conv)
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=r or defaults["r"],
        lora_alpha=alpha or defaults["alpha"],
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=to_save or None,
    )


def apply_stage(model: PreTrainedModel, stage: int, **options) -> PeftModel:
    """``model`` wrapped for training ``stage``: only the LoRA weights (and ``modules_to_save``) train."""
    return get_peft_model(model, lora_config(model, stage, **options))


def parameter_counts(
    config: str | Path | dict, stage: int = 2, injection_layer: int = 16, **options
) -> dict:
    """Trainable and total parameters of a stage for the Deep-VRM model of a ``config.json``, built on the
    ``meta`` device (no memory, a few seconds even for 7B). JSON-able.

    ``options`` go to :func:`lora_config` (``r``, ``alpha``, ``low_level``, ``conv``).
    """
    backbone = build_from_config(config, device="meta")
    with torch.device("meta"):
        model = DeepVRMForConditionalGeneration.from_backbone(backbone.model, injection_layer=injection_layer)
        base_total = _count(model.parameters())
        peft_config = lora_config(model, stage, **options)
        peft_model = get_peft_model(model, peft_config)
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    total = _count(peft_model.parameters())
    by_part: dict[str, int] = {}
    for name, param in trainable:
        part = _part(model, name)
        by_part[part] = by_part.get(part, 0) + param.numel()
    n_trainable = _count(p for _, p in trainable)
    return {
        "config": "in-memory dict" if isinstance(config, dict) else str(config),
        "model_type": model.config.model_type,
        "num_layers": model.backbone_adapter.num_layers,
        "injection_layer": injection_layer,
        "stage": stage,
        "lora": {
            "r": peft_config.r,
            "alpha": peft_config.lora_alpha,
            "dropout": peft_config.lora_dropout,
            "target_modules": len(peft_config.target_modules),
            "modules_to_save": sorted(peft_config.modules_to_save or []),
        },
        "trainable": n_trainable,
        "total": total,
        "base_total": base_total,
        "trainable_percent": round(100 * n_trainable / total, 4),
        "trainable_by_part": dict(sorted(by_part.items())),
    }


def _stage_targets(model: PreTrainedModel, stage: int, low_level: str, conv: str) -> tuple[list[str], list[str]]:
    if stage == 1:
        return llm_linear_names(model), []
    if not isinstance(model, DeepVRMForConditionalGeneration):
        raise ConfigError("stage=2", f"needs a Deep-VRM model (with a low-level encoder), not {type(model).__name__}")
    targets = llm_linear_names(model, first_layer=model.injection_layer)
    to_save = [FUSION_NAME] if list(model.fusion.parameters()) else []
    if low_level == "lora":
        targets = low_level_target_names(model, conv) + targets
    else:
        to_save.append(model.low_level_path)
    return targets, to_save


def _adapter(model: PreTrainedModel) -> BackboneAdapter:
    if isinstance(model, DeepVRMForConditionalGeneration):
        return model.backbone_adapter
    return adapter_class(model.config.model_type)(model, None, source="peft-targets", settings=LoadSettings())


def _part(model: DeepVRMForConditionalGeneration, name: str) -> str:
    """A trainable parameter's part: ``language_model``, ``low_level.<child>`` (blocks, merger, ...) or
    the top-level module (``fusion``)."""
    name = re.sub(r"\.modules_to_save\.[^.]+", "", name.removeprefix("base_model.model."))
    if name.startswith(model.backbone_adapter.layers_path + "."):
        return "language_model"
    if name.startswith(model.low_level_path + "."):
        return "low_level." + name.removeprefix(model.low_level_path + ".").split(".")[0]
    return name.split(".")[0]


def _count(params) -> int:
    return sum(p.numel() for p in params)
