"""Deep-VRM's two training stages and the naive baseline, with PEFT and accelerate (paper.md §1, §5).

- Stage ``1`` ("semantic alignment"): LoRA r = 128, α = 256 on every linear layer of the decoder of the
  *base* model; vision tower and merger frozen. Data: semantic QA + D₁ (semantic-cue fakes and their
  plausible twins). The LoRA is merged into the saved weights.
- Stage ``2`` ("artifact-aware refinement"): a Deep-VRM model made from the stage-1 checkpoint (its
  low-level encoder a copy of the main one); LoRA r = 64, α = 128 on the low-level encoder and decoder
  layers ≥ K (:mod:`injection.peft_targets`). Data: every train row (D₂, D₁, distractors, the other reals)
  + semantic QA, as the official stage-2 list. Merged and saved as a Deep-VRM checkpoint.
- ``naive``: the base model's decoder layers fine-tuned in full on D₂ (trace fakes and their reals), no
  residual path: the comparison of the semantic-forgetting experiment (paper.md §2, Table 2).

Forensic rows are asked with a prompt drawn per row and epoch from ``FORENSIC_PROMPTS``, answered with that
prompt's word for the label (real/fake, yes/no, natural/AI-generated); the loss is on the answer tokens.
Optimiser: AdamW (0.9, 0.95), weight decay 1e-3 (not on biases and norms), lr 1e-4, merger lr 1e-6, cosine
schedule with 5 % warm-up, 2 epochs: the paper's recipe, the defaults of :class:`TrainConfig`. Overrides for
small backbones (recorded in ``train.json``): a separate ``low_level_lr``, trainable answer-token embedding
rows (``answer_tokens``), the official prompt only (``prompt_variants=False``), a semantic-row cap.

The same code runs in one process or under ``accelerate launch`` (DDP; gloo on CPU). The data order and the
prompt draws are functions of the seed and the epoch; an atomic checkpoint (trainable weights, optimiser,
scheduler, step, per-process RNG state) every ``checkpoint_every`` steps lets a killed run resume and end
with the weights of an uninterrupted one.

>>> result = train(TrainConfig(stage="1", model="mini-vl"))            # -> <cache>/runs/deepvrm-1-<hash>/
>>> result = train(TrainConfig(stage="2", model=result["out"]))
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from peft import PeftModel, TrainableTokensConfig, get_peft_model
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from injection.config import FUSIONS
from injection.modeling import LOW_LEVEL_SUFFIX, DeepVRMForConditionalGeneration
from injection.peft_targets import CONV_MODES, LORA_DROPOUT, LOW_LEVEL_MODES, lora_config
from probes.backbones import adapter_class, load_backbone, wrap
from probes.backbones.base import DTYPES, BackboneAdapter, LoadSettings
from probes.backbones.processing import FORENSIC_PROMPTS
from probes.data.images import open_image, to_rgb
from probes.data.manifest import Record, manifest_hash, read_manifest
from probes.errors import BadInputError, ConfigError
from probes.storage import cache_root, hash_file, hash_json, library_versions, read_json, write_json

STAGES = ("1", "2", "naive")
PAPER_DEPTH = (16, 28)  # the official K = 16 of Qwen2.5-VL-7B's 28 decoder layers
SEMANTIC_FILE = "semantic.jsonl"
CHECKPOINT = "checkpoint"
RECORD = "train.json"
# The answer words of each prompt variant: (word for a real image, word for a fake one).
PROMPT_ANSWERS: dict[str, tuple[str, str]] = {
    FORENSIC_PROMPTS[0]: ("real", "fake"),
    FORENSIC_PROMPTS[1]: ("real", "fake"),
    FORENSIC_PROMPTS[2]: ("real", "fake"),
    FORENSIC_PROMPTS[3]: ("yes", "no"),  # "Is this a real image?"
    FORENSIC_PROMPTS[4]: ("no", "yes"),  # "Is this a AI-generated image?"
    FORENSIC_PROMPTS[5]: ("natural", "AI-generated"),
    FORENSIC_PROMPTS[6]: ("natural image", "ai-generated"),
    FORENSIC_PROMPTS[7]: ("no", "yes"),  # "... are there clear signs of AI generation?"
}
_RUN_ONLY = ("device", "checkpoint_every", "out")  # settings that do not change the trained weights


# --- configuration -------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """One training run. The defaults are the paper's recipe (paper.md §5) except where noted.

    Args:
        stage: ``1``, ``2`` or ``naive`` (see the module docstring).
        model: where training starts: a built-in backbone (``mini-vl``, ``tiny-qwen2.5-vl``...), a model folder,
            or (stage 2) the stage-1 output folder.
        data: a manifest file or a folder with ``manifest.jsonl`` (and ``semantic.jsonl`` for the semantic
            QA rows), or a list of them (their rows are pooled); ``None``: the embedded forensic-mini set of
            ``preset``.
        injection_layer: K (stage 2). ``None``: the model's own when it is a Deep-VRM checkpoint, else the
            paper's relative depth, round(16 / 28 · layers).
        fusion: ``average`` (official), ``add`` or ``gated``; ``None``: the checkpoint's, else ``average``.
        low_level: ``lora`` (official) or ``full`` fine-tuning of the low-level encoder copy (stage 2).
        conv: the low-level encoder's convolutions as LoRA targets: ``none`` (official), ``pointwise``, ``all``.
        lora_r, lora_alpha: ``None``: the stage's (128/256 for stage 1, 64/128 for stage 2).
        epochs, max_steps: passes over the data; ``max_steps`` (optimizer steps) cuts the run short.
        batch_size: rows per process and micro-step; ``grad_accum`` micro-steps per optimizer step.
        lr, merger_lr, low_level_lr: learning rates: ``merger_lr`` for the (low-level) merger's parameters,
            ``low_level_lr`` for the rest of the low-level encoder (``None``: ``lr``; the paper uses 1e-4 for both).
        max_semantic: at most this many semantic QA rows (a seeded sample; ``None``: all of them).
        prompt_variants: ask forensic rows with a random prompt variant (else each row's own prompt/answer).
        image_pixels: Qwen backbones: a fixed pixel budget (262144 in the paper).
        gradient_checkpointing: trade compute for memory (large models).
        answer_tokens: also train the embedding rows (tied ``lm_head`` rows) of the answer words' tokens
            (PEFT ``trainable_token_indices``), in every stage. Off in the paper (embeddings frozen); needed where
            a backbone never learned to emit those words (mini-VL's untrained output rows collapse together).
    """

    stage: str
    model: str = "mini-vl"
    data: str | list[str] | None = None
    preset: str = "default"
    injection_layer: int | None = None
    fusion: str | None = None
    low_level: str = "lora"
    conv: str = "none"
    lora_r: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float = LORA_DROPOUT
    epochs: int = 2
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    merger_lr: float = 1e-6
    low_level_lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-3
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    max_semantic: int | None = None
    prompt_variants: bool = True
    seed: int = 0
    dtype: str = "float32"
    attn: str = "sdpa"
    image_pixels: int | None = None
    gradient_checkpointing: bool = False
    answer_tokens: bool = False
    device: str = "cpu"
    checkpoint_every: int = 50
    out: str | None = None
    notes: str = ""

    def __post_init__(self):
        self.stage = str(self.stage)
        self.betas = tuple(self.betas)
        if self.stage not in STAGES:
            raise ConfigError(f"stage={self.stage}", f"unknown stage; use one of {list(STAGES)}")
        if self.fusion is not None:
            _check_choice("fusion", self.fusion, FUSIONS)
        _check_choice("low_level", self.low_level, LOW_LEVEL_MODES)
        _check_choice("conv", self.conv, CONV_MODES)
        _check_choice("dtype", self.dtype, tuple(DTYPES))
        for name in ("epochs", "batch_size", "grad_accum", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}", "must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps={self.max_steps}", "must be at least 1")
        if not 0 < self.lr < 1 or not 0 <= self.merger_lr < 1 or not 0 <= (self.low_level_lr or 0) < 1:
            raise ConfigError(f"lr={self.lr}, merger_lr={self.merger_lr}, low_level_lr={self.low_level_lr}",
                              "learning rates must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"train config keys {unknown}", f"unknown; known: {sorted(known)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        if not Path(path).is_file():
            raise BadInputError(path, "no such train config file")
        return cls.from_dict(read_json(path))

    def hash(self) -> str:
        """Provenance hash of the settings that change the weights (not device, checkpointing, out)."""
        return hash_json({k: v for k, v in self.to_dict().items() if k not in _RUN_ONLY})


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r}", f"use one of {list(choices)}")


def default_injection_layer(num_layers: int) -> int:
    """K at the paper's relative depth (16 of 28), within 1..num_layers-1."""
    return max(1, min(num_layers - 1, round(PAPER_DEPTH[0] * num_layers / PAPER_DEPTH[1])))


# --- models --------------------------------------------------------------------------------------


def is_deep_vrm_checkpoint(source: str | Path) -> bool:
    config = Path(source) / "config.json"
    return config.is_file() and "deep_vrm" in json.loads(config.read_text())


def load_model(
    source: str,
    settings: LoadSettings | None = None,
    *,
    deep_vrm: bool = False,
    image_pixels: int | None = None,
    injection_layer: int | None = None,
    fusion: str | None = None,
) -> BackboneAdapter:
    """An adapter around the model of ``source`` (built-in name or folder) and its processor.

    A Deep-VRM checkpoint loads as a Deep-VRM model; any other source loads as its backbone, or, with
    ``deep_vrm``, as a Deep-VRM model made from it (low-level encoder copied from the main one; K by
    default at the paper's relative depth). ``injection_layer`` and ``fusion`` override a checkpoint's.
    """
    settings = settings or LoadSettings()
    options = {"image_pixels": image_pixels} if image_pixels else {}
    overrides = {k: v for k, v in (("injection_layer", injection_layer), ("fusion", fusion)) if v is not None}
    folder = Path(source)
    trained = is_deep_vrm_checkpoint(folder)
    if trained or (deep_vrm and (folder / "config.json").is_file()):
        if not trained:
            overrides.setdefault("injection_layer", default_injection_layer(_num_layers(folder)))
        model = DeepVRMForConditionalGeneration.from_pretrained(
            folder, dtype=settings.dtype, attn_implementation=settings.attn_implementation, device=settings.device,
            **overrides,
        )
        cls = adapter_class(model.config.model_type)
        return cls(model, cls.load_processor(str(folder), settings, **options), source=str(folder), settings=settings)
    backbone = load_backbone(source, dtype=settings.dtype, attn_implementation=settings.attn_implementation,
                             device=settings.device, **options)
    if not deep_vrm:
        return backbone
    overrides.setdefault("injection_layer", default_injection_layer(backbone.num_layers))
    model = DeepVRMForConditionalGeneration.from_backbone(backbone.model, **overrides)
    return wrap(model, backbone.processor, source=f"{backbone.source}+deep-vrm", settings=settings)


def _num_layers(folder: Path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder).get_text_config().num_hidden_layers


def prepare_model(config: TrainConfig, settings: LoadSettings) -> tuple[BackboneAdapter, torch.nn.Module, str]:
    """The adapter of the starting model, the module to train (a PEFT model, or the model itself for
    ``naive``) and the starting weights' fingerprint."""
    adapter = load_model(config.model, settings, deep_vrm=config.stage == "2", image_pixels=config.image_pixels,
                         injection_layer=config.injection_layer, fusion=config.fusion)
    fingerprint = adapter.weights_fingerprint()
    model = adapter.model
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.requires_grad_(False)
    tokens = answer_token_ids(adapter.processor.tokenizer) if config.answer_tokens else []
    if config.stage == "naive":
        if tokens:
            model = get_peft_model(model, TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=tokens))
        adapter.layers.requires_grad_(True)
        return adapter, model, fingerprint
    options = {"r": config.lora_r, "alpha": config.lora_alpha, "dropout": config.lora_dropout}
    if config.stage == "2":
        options |= {"low_level": config.low_level, "conv": config.conv}
    peft_config = lora_config(model, int(config.stage), **options)
    if tokens:
        peft_config = dataclasses.replace(peft_config, trainable_token_indices=tokens)
    return adapter, get_peft_model(model, peft_config), fingerprint


def answer_token_ids(tokenizer) -> list[int]:
    """The ids of every token of every answer word of :data:`PROMPT_ANSWERS`."""
    words = {word for pair in PROMPT_ANSWERS.values() for word in pair}
    return sorted({i for word in words for i in tokenizer(word, add_special_tokens=False)["input_ids"]})


def trainable_parts(model: torch.nn.Module, adapter: BackboneAdapter) -> dict[str, int]:
    """Trainable parameters per part: decoder layers, low-level encoder, fusion, other."""
    parts: dict[str, int] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            part = _part_of(name.removeprefix("base_model.model."), adapter)
            parts[part] = parts.get(part, 0) + param.numel()
    return dict(sorted(parts.items()))


def _part_of(name: str, adapter: BackboneAdapter) -> str:
    if "trainable_tokens" in name:
        return "answer_tokens"
    if name.startswith(adapter.layers_path + "."):
        return "decoder_layers"
    if name.startswith(adapter.vision_path + "_low_level."):
        return "low_level.merger" if ".merger." in name else "low_level.encoder"
    return name.split(".")[0]


# --- data ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One training row: an image, the question, and the answer (for forensic rows: the label)."""

    id: str
    image: str
    prompt: str
    answer: str
    part: str  # semantic, d1, d2, distractor, other
    label: str | None = None  # real/fake for forensic rows: the prompt may be re-drawn per epoch


def resolve_manifests(data: str | Sequence[str] | None, preset: str = "default") -> list[Path]:
    """The manifest files of ``data`` (one or several files or folders), or the embedded forensic-mini's."""
    if data is None or isinstance(data, str):
        return [resolve_data(data, preset)]
    return [resolve_data(d, preset) for d in data]


def resolve_data(data: str | None, preset: str = "default") -> Path:
    """The manifest file of ``data`` (a file or a folder), or the embedded forensic-mini's."""
    if data is None:
        from probes.data import ForensicMiniConfig, build_forensic_mini

        return build_forensic_mini(ForensicMiniConfig.preset(preset)).manifest_path
    path = Path(data)
    if path.is_dir():
        path = path / "manifest.jsonl"
    if not path.is_file():
        raise BadInputError(data, "no manifest here (pass a manifest file or a folder with manifest.jsonl)")
    return path


def forensic_parts(records: Sequence[Record]) -> dict[str, list[Record]]:
    """The labelled train rows, each in one part: ``d2`` (trace fakes and the reals of their scenes),
    ``d1`` (semantic-cue fakes and their plausible twins), ``distractor`` (post-processed reals), ``other``.

    Rows without a split count as train rows.
    """
    train = [r for r in records if r.split in (None, "train") and r.label is not None]
    reals_by_scene: dict[str, list[Record]] = {}
    for r in train:
        if r.label == "real" and r.scene_id:
            reals_by_scene.setdefault(r.scene_id, []).append(r)
    parts: dict[str, list[Record]] = {"d2": [], "d1": [], "distractor": [], "other": []}
    taken: set[str] = set()
    for part, cue in (("d2", "trace"), ("d1", "semantic")):
        for fake in (r for r in train if r.label == "fake" and r.cue == cue):
            for r in (fake, *reals_by_scene.get(fake.scene_id or "", [])):
                if r.id not in taken:
                    taken.add(r.id)
                    parts[part].append(r)
    for r in train:
        if r.id not in taken:
            parts["distractor" if r.post not in (None, "none") else "other"].append(r)
    return parts


def training_examples(config: TrainConfig, manifests: Sequence[Path]) -> list[Example]:
    """The rows of ``config.stage`` from every manifest; a one-line error when there are none."""
    examples = [e for manifest in manifests for e in stage_examples(config, manifest)]
    if not examples:
        raise BadInputError(", ".join(map(str, manifests)), f"no training rows for stage {config.stage} (no rows "
                                                            f"of its parts, and no {SEMANTIC_FILE} train rows)")
    return examples


def stage_examples(config: TrainConfig, manifest: Path) -> list[Example]:
    """The training rows of ``config.stage`` in one manifest (and its folder's ``semantic.jsonl``), in a fixed
    order (shuffled per epoch by :func:`epoch_rows`).

    A manifest without ``cue`` values (users' data, the official JSON files) gives every labelled train row
    to every stage: pass each stage the files of its official list.
    """
    records = read_manifest(manifest)
    parts = forensic_parts(records)
    wanted = {"1": ("d1",), "2": ("d2", "d1", "distractor", "other"), "naive": ("d2",)}[config.stage]
    if not any(r.cue for r in records):  # data without cues (e.g. the official files): the user picks them per stage
        wanted = tuple(parts)
    examples = [_forensic_example(r, part, manifest.parent) for part in wanted for r in parts[part]]
    if config.stage != "naive":
        examples += semantic_examples(manifest.parent, config.max_semantic, config.seed)
    return examples


def _forensic_example(r: Record, part: str, root: Path) -> Example:
    return Example(r.id, str(r.image_path(root)), r.prompt, r.answer or r.label, part, r.label)


def semantic_examples(root: Path, limit: int | None = None, seed: int = 0) -> list[Example]:
    """The train rows of ``root/semantic.jsonl`` (none when absent), at most ``limit`` (a seeded sample)."""
    path = root / SEMANTIC_FILE
    if not path.is_file():
        return []
    rows = [r for r in read_manifest(path) if r.split in (None, "train") and r.answer]
    if limit is not None and limit < len(rows):
        keep = np.sort(np.random.default_rng([seed, 1]).choice(len(rows), limit, replace=False))
        rows = [rows[i] for i in keep]
    return [Example(r.id, str(r.image_path(root)), r.prompt, r.answer, "semantic") for r in rows]


def epoch_rows(examples: Sequence[Example], seed: int, epoch: int, variants: bool) -> list[tuple[str, str, str]]:
    """(image, prompt, answer) of every example in the epoch's order; forensic rows get a prompt variant
    drawn for the epoch (when ``variants``) and its answer word for their label."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(examples))
    prompts = list(PROMPT_ANSWERS)
    draws = rng.integers(len(prompts), size=len(examples))
    rows = []
    for i in order:
        ex = examples[i]
        if variants and ex.label is not None:
            prompt = prompts[draws[i]]
            rows.append((ex.image, prompt, PROMPT_ANSWERS[prompt][ex.label == "fake"]))
        else:
            rows.append((ex.image, ex.prompt, ex.answer))
    return rows


def load_image(path: str):
    img, _ = open_image(path)
    return to_rgb(img, path)


class Collate:
    """Rows → model inputs with ``labels`` on the answer tokens (the adapter's ``build_inputs``)."""

    def __init__(self, adapter: BackboneAdapter):
        self.adapter = adapter

    def __call__(self, rows: Sequence[tuple[str, str, str]]):
        images, prompts, answers = zip(*rows)
        return self.adapter.build_inputs([load_image(p) for p in images], list(prompts), list(answers))


def data_hash(manifests: Sequence[Path]) -> str:
    """A hash of the manifests and their folders' ``semantic.jsonl`` files."""
    hashes = []
    for manifest in manifests:
        semantic = manifest.parent / SEMANTIC_FILE
        hashes.append({"manifest": manifest_hash(manifest), "semantic": hash_file(semantic) if semantic.is_file() else None})
    return hash_json(hashes)


# --- optimisation --------------------------------------------------------------------------------


def param_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: merger parameters at ``merger_lr``, the rest of the low-level encoder at ``low_level_lr``
    (default ``lr``), everything else at ``lr``; no weight decay on biases and norms (1-D)."""
    rates = {"merger": config.merger_lr, "low_level": config.low_level_lr or config.lr, "other": config.lr}
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            part = "merger" if ".merger." in name else "low_level" if LOW_LEVEL_SUFFIX + "." in name else "other"
            groups.setdefault((part, param.ndim < 2), []).append(param)
    return [
        {"params": params, "lr": rates[part], "weight_decay": 0.0 if flat else config.weight_decay}
        for (part, flat), params in sorted(groups.items())
    ]


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


# --- the run -------------------------------------------------------------------------------------


@dataclass
class RunState:
    """What a checkpoint holds besides weights and optimiser: the step and the loss history."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)


class Trainer:
    """One stage's training loop under accelerate. Use :func:`train`."""

    def __init__(self, config: TrainConfig, out: Path, accelerator: Accelerator):
        self.config = config
        self.out = out
        self.acc = accelerator
        self.times: dict[str, float] = {}
        t0 = time.perf_counter()
        # LoRA's initial weights and dropout draw from torch's global generator, which each process seeds at
        # random: seed it from the config, so that one config gives one set of weights.
        torch.manual_seed(config.seed)
        settings = LoadSettings(config.dtype, config.attn, str(accelerator.device))
        self.adapter, model, fingerprint = prepare_model(config, settings)
        self.source = {"model": config.model, "weights": fingerprint,
                       **getattr(self.adapter.model, "checkpoint_info", {})}
        self.manifests = resolve_manifests(config.data, config.preset)
        self.examples = training_examples(config, self.manifests)
        self.trainable = trainable_parts(model, self.adapter)
        optimizer = torch.optim.AdamW(param_groups(model, config), betas=config.betas)
        self.steps_per_epoch = math.ceil(len(self.loader(0)) / config.grad_accum)
        epochs_total = config.epochs * self.steps_per_epoch
        self.total = min(epochs_total, config.max_steps or epochs_total)
        warmup = math.ceil(config.warmup_ratio * self.total)
        self.scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, self.total)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.state = RunState()
        self.times["load"] = time.perf_counter() - t0

    def loader(self, epoch: int) -> DataLoader:
        rows = epoch_rows(self.examples, self.config.seed, epoch, self.config.prompt_variants)
        # Its own generator: a loader drawing its base seed from the global RNG would shift dropout on resume.
        loader = DataLoader(rows, batch_size=self.config.batch_size, shuffle=False, collate_fn=Collate(self.adapter),
                            generator=torch.Generator().manual_seed(self.config.seed))
        return self.acc.prepare(loader)

    # --- checkpoints ---
    @property
    def checkpoint(self) -> Path:
        return self.out / CHECKPOINT

    def trainable_state(self) -> dict[str, torch.Tensor]:
        model = self.acc.unwrap_model(self.model)
        return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}

    def save_checkpoint(self) -> None:
        """Write the checkpoint folder under a temporary name, then swap it in (a kill leaves the old one)."""
        tmp = self.out / f".{CHECKPOINT}.tmp"
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        torch.save(rng_state(), tmp / f"rng-{self.acc.process_index}.pt")
        if self.acc.is_main_process:
            torch.save({"model": self.trainable_state(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "run": asdict(self.state)}, tmp / "state.pt")
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            old = self.out / f".{CHECKPOINT}.old"
            shutil.rmtree(old, ignore_errors=True)
            if self.checkpoint.exists():
                os.replace(self.checkpoint, old)
            os.replace(tmp, self.checkpoint)
            shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()

    def resume(self) -> None:
        """Load the last checkpoint, if any (its run hash was checked by :func:`train`)."""
        if not (self.checkpoint / "state.pt").is_file():
            return
        state = torch.load(self.checkpoint / "state.pt", map_location="cpu", weights_only=False)
        unknown = self.acc.unwrap_model(self.model).load_state_dict(state["model"], strict=False).unexpected_keys
        if unknown:
            raise BadInputError(self.checkpoint, f"checkpoint has weights the model lacks, e.g. {unknown[0]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.state = RunState(**state["run"])
        self.state.resumed_at.append(self.state.step)
        rng_file = self.checkpoint / f"rng-{self.acc.process_index}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))

    # --- loop ---
    def run(self, stop_after: int | None = None, progress: bool = True) -> bool:
        """Train to the last step (or ``stop_after``, as a kill would); True when finished."""
        t0 = time.perf_counter()
        start = self.state.step
        self.model.train()
        bar = tqdm(total=self.total, initial=start, desc=f"stage {self.config.stage}",
                   disable=not (progress and self.acc.is_local_main_process))
        while self.state.step < self.total:
            if stop_after is not None and self.state.step >= stop_after:
                break
            self.run_epoch(stop_after, bar)
        bar.close()
        self.times["train"] = self.times.get("train", 0.0) + time.perf_counter() - t0
        self.samples = (self.state.step - start) * self.config.batch_size * self.config.grad_accum * self.acc.num_processes
        return self.state.step >= self.total

    def run_epoch(self, stop_after: int | None, bar) -> None:
        epoch, done = divmod(self.state.step, self.steps_per_epoch)
        loader = self.loader(epoch)
        if done:
            loader = self.acc.skip_first_batches(loader, done * self.config.grad_accum)
        micro_losses: list[torch.Tensor] = []
        for batch in loader:
            with self.acc.accumulate(self.model):
                loss = self.model(**batch).loss
                self.acc.backward(loss)
                micro_losses.append(loss.detach())
                if self.acc.sync_gradients and self.config.grad_clip:
                    self.acc.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad()
            if not self.acc.sync_gradients:
                continue
            self.scheduler.step()
            self.state.step += 1
            self.state.losses.append(float(self.acc.reduce(torch.stack(micro_losses).mean(), "mean")))
            micro_losses = []
            bar.update(1)
            bar.set_postfix(loss=f"{self.state.losses[-1]:.4f}")
            if self.state.step % self.config.checkpoint_every == 0 or self.state.step in (stop_after, self.total):
                self.save_checkpoint()
            if self.state.step >= self.total or self.state.step == stop_after:
                return

    # --- result ---
    def save(self) -> dict[str, Any]:
        """Merge the LoRA weights, save the model (safetensors) and processor, then ``train.json``."""
        t0 = time.perf_counter()
        model = self.acc.unwrap_model(self.model)
        if isinstance(model, PeftModel):
            model = model.merge_and_unload()
        record = self.record()
        if self.acc.is_main_process:
            model.save_pretrained(self.out)
            self.adapter.processor.save_pretrained(self.out)
            self.times["save"] = time.perf_counter() - t0
            record["times_s"] = {k: round(v, 2) for k, v in self.times.items()}
            write_json(self.out / RECORD, record)
            shutil.rmtree(self.checkpoint, ignore_errors=True)
        self.acc.wait_for_everyone()
        return record

    def record(self) -> dict[str, Any]:
        parts: dict[str, int] = {}
        for ex in self.examples:
            parts[ex.part] = parts.get(ex.part, 0) + 1
        train_s = self.times.get("train", 0.0)
        model = self.adapter.model
        return {
            "out": str(self.out),
            "config": self.config.to_dict(),
            "config_hash": self.config.hash(),
            "source": self.source,
            "deep_vrm": getattr(model.config, "deep_vrm", None),
            "data": {"manifests": [str(m) for m in self.manifests], "hash": data_hash(self.manifests),
                     "rows": len(self.examples),
                     "parts": parts},
            "trainable": {"total": sum(self.trainable.values()), "by_part": self.trainable},
            "steps": self.state.step,
            "steps_per_epoch": self.steps_per_epoch,
            "global_batch": self.config.batch_size * self.config.grad_accum * self.acc.num_processes,
            "losses": [round(x, 5) for x in self.state.losses],
            "resumed_at": self.state.resumed_at,
            "samples_per_s": round(self.samples / train_s, 2) if train_s else None,
            "world_size": self.acc.num_processes,
            "device": str(self.acc.device),
            "dtype": self.config.dtype,
            "attn_implementation": model.config._attn_implementation,
            "threads": torch.get_num_threads(),
            "versions": library_versions(),
        }


def run_folder(config: TrainConfig) -> Path:
    """Where a run writes: ``config.out``, else ``<cache>/runs/deepvrm-<stage>-<config hash>``."""
    if config.out:
        return Path(config.out)
    return cache_root() / "runs" / f"deepvrm-{config.stage}-{config.hash()}"


def train(config: TrainConfig, *, stop_after: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Run one stage; return its ``train.json`` record (also written to the output folder).

    A finished folder of the same config hash is returned as it is; an unfinished one resumes from its
    checkpoint; a folder of another run is refused. ``stop_after`` leaves the run after that many optimizer
    steps, as a kill would (tests); the return value is then ``{"stopped_at": step, "out": ...}``.
    """
    out = run_folder(config)
    finished = _finished(out, config)
    if finished is not None:
        return finished
    accelerator = Accelerator(cpu=config.device == "cpu", gradient_accumulation_steps=config.grad_accum)
    if accelerator.is_main_process:
        _claim(out, config)
    accelerator.wait_for_everyone()
    trainer = Trainer(config, out, accelerator)
    trainer.resume()
    if not trainer.run(stop_after, progress):
        return {"stopped_at": trainer.state.step, "out": str(out)}
    return trainer.save()


def _finished(out: Path, config: TrainConfig) -> dict[str, Any] | None:
    record = out / RECORD
    if not record.is_file():
        return None
    done = read_json(record)
    if done.get("config_hash") != config.hash():
        raise ConfigError(out, f"holds a finished run of another config ({done.get('config_hash')}); pick another --out")
    return done


def _claim(out: Path, config: TrainConfig) -> None:
    """Mark ``out`` as this run's (``run.json``); refuse a folder that another run has started."""
    marker = out / "run.json"
    if marker.is_file():
        other = read_json(marker).get("config_hash")
        if other != config.hash():
            raise ConfigError(out, f"holds an unfinished run of another config ({other}); pick another --out")
        return
    if out.exists() and any(out.iterdir()):
        raise ConfigError(out, "exists and is not a training run folder; pick another --out")
    write_json(marker, {"config_hash": config.hash(), "config": config.to_dict()})
