"""Training recipes: the :class:`~injection.train.TrainConfig` of each run of a Deep-VRM comparison.

A recipe gives stage 1 (semantic alignment), stage 2 (artifact-aware refinement, from stage 1's output) and
the naive baseline (the base decoder fine-tuned on D₂). The paper's recipe is :class:`TrainConfig`'s
defaults; a recipe lists each setting it changes, per run, with the reason, and the reasons go into the
run's ``notes`` (stored in ``train.json``).

:func:`embedded_default` is the recipe of ``python analysis.py deepvrm``: mini-VL (a 12-layer, 128-wide
Qwen2.5-VL text decoder on a frozen ImageNet EfficientNet-Lite0) on the embedded forensic-mini set, the whole
comparison on two CPU cores within minutes.

>>> configs = embedded_default("runs/deepvrm-embedded")
>>> configs["2"].model                      # stage 2 starts from stage 1's folder
'runs/deepvrm-embedded/stage1'
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from injection.train import STAGES, TrainConfig
from probes.errors import ConfigError

EMBEDDED_MODEL = "mini-vl"
RUN_NAMES = {"1": "stage1", "2": "stage2", "naive": "naive"}  # sub-folders of the comparison's --out


@dataclass(frozen=True)
class Override:
    """One setting a recipe changes from the paper's recipe (the TrainConfig default), and why."""

    value: Any
    why: str


# The embedded default's deviations from the paper's recipe, per run. Settings not listed keep the paper's:
# LoRA r=128/alpha=256 (stage 1) and r=64/alpha=128 (stage 2), dropout 0.05, AdamW (0.9, 0.95), weight
# decay 1e-3, cosine schedule with 5 % warm-up, batch 8, K at the paper's relative depth (7 of 12), average
# fusion, the low-level encoder as LoRA on its linear layers, loss on the answer tokens, naive: 2 epochs on D2.
# Chosen on the val split (never on test), each stage timed on 2 shared CPU cores:
#   stage 2, 1 epoch, answer rows frozen: AUC 0.514, answers "real" to every image;
#   stage 2, 1 epoch, answer rows trained: AUC 0.648 (stage 1 without them), 0.663 (stage 1 with them);
#   stage 2, 2 epochs, answer rows frozen: AUC 0.673, but 490 s for stage 2 alone;
#   naive at lr 1e-4: AUC 0.549, answers "real" to every image; at 1e-3: AUC 0.580 (base model 0.496).
_SMALL_MODEL_LR = ("the paper's 1e-4 is for a 7B model over thousands of steps; a 128-wide decoder trained for a few "
                   "hundred CPU steps barely moves at 1e-4 (naive at 1e-4: val AUC 0.549 and 'real' for every image, "
                   "at 1e-3: 0.580), so 1e-3, the rate mini-VL itself was pretrained with, for every run alike")
_ONE_PROMPT = ("each row is asked its own (official) prompt, 'Is this image real or fake?', instead of a draw among "
               "8 variants: with a few hundred steps, spreading them over 8 prompts and 5 answer-word pairs leaves "
               "the evaluated prompt too few; the variants are a generalisation device of the full-size recipe")
_ANSWER_ROWS = ("mini-VL's pretraining never used the words real/fake/yes/no, so their (tied) embedding rows are "
                "random; the paper's frozen embeddings then keep the model from saying them (stage 2 with frozen "
                "rows: val AUC 0.514, 'real' for every image; with trainable rows: 0.648). Only the rows of the "
                "answer words train, in every run alike")
_SEMANTIC_CAP = ("at most {n} of the 8,392 semantic QA train rows (a seeded sample): the paper mixes its semantic QA "
                 "with the forensic rows at a few-to-one ratio; all of them would make the run 3-4 times longer "
                 "on 2 CPU cores")
EMBEDDED_DEFAULT: dict[str, dict[str, Override]] = {
    "1": {
        "lr": Override(1e-3, _SMALL_MODEL_LR),
        "epochs": Override(1, "one pass over D1 + the semantic sample (130 steps, about 90 s) fits the time budget; "
                              "stage 1 only aligns, stage 2 is where the artifacts are learned"),
        "max_semantic": Override(300, _SEMANTIC_CAP.format(n=300)),
        "prompt_variants": Override(False, _ONE_PROMPT),
        "answer_tokens": Override(True, _ANSWER_ROWS),
    },
    "2": {
        "lr": Override(1e-3, _SMALL_MODEL_LR),
        "merger_lr": Override(1e-3, "mini-VL's vision tower is a CNN without linear layers, so the low-level "
                                    "encoder's LoRA targets are its merger's two linear layers only; at the paper's "
                                    "merger rate (1e-6) the low-level stream could not learn at all. The main "
                                    "merger is frozen in stage 2, so this rate reaches the low-level merger only"),
        "epochs": Override(1, "one pass over every train row + the semantic sample (374 steps, about 220 s): two "
                              "passes take about 450 s on 2 shared cores, over the 12-minute budget of stage 1 + "
                              "stage 2 + eval"),
        "max_semantic": Override(300, _SEMANTIC_CAP.format(n=300)),
        "prompt_variants": Override(False, _ONE_PROMPT),
        "answer_tokens": Override(True, _ANSWER_ROWS),
    },
    "naive": {
        "lr": Override(1e-3, _SMALL_MODEL_LR),
        "prompt_variants": Override(False, _ONE_PROMPT),
        "answer_tokens": Override(True, _ANSWER_ROWS),
    },
}


def overrides(recipe: dict[str, dict[str, Override]] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """The recipe's deviations as JSON: ``{run: {setting: {"value", "paper", "why"}}}``."""
    recipe = EMBEDDED_DEFAULT if recipe is None else recipe
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    return {stage: {k: {"value": o.value, "paper": defaults.get(k), "why": o.why} for k, o in changes.items()}
            for stage, changes in recipe.items()}


def embedded_default(
    out: str | Path,
    *,
    preset: str = "default",
    device: str = "cpu",
    dtype: str = "float32",
    attn: str = "sdpa",
    model: str = EMBEDDED_MODEL,
    extra: dict[str, Any] | None = None,
) -> dict[str, TrainConfig]:
    """The three training runs of the embedded-default comparison, keyed ``"1"``, ``"2"``, ``"naive"``.

    Each run writes to ``<out>/<stage1|stage2|naive>``; stage 2 starts from ``<out>/stage1``, stage 1 and the
    naive baseline from ``model``. ``extra`` (TrainConfig fields, e.g. ``{"max_steps": 2}`` for a smoke test)
    applies to every run after the recipe, and is noted as such.
    """
    out = Path(out)
    extra = dict(extra or {})
    known = {f.name for f in fields(TrainConfig)}
    bad = sorted(set(extra) - known) or sorted(set(extra) & {"stage", "model", "out", "data", "preset"})
    if bad:
        raise ConfigError(f"recipe override {bad[0]!r}", f"not a TrainConfig setting the recipe lets you change; "
                                                         f"known: {sorted(known - {'stage', 'model', 'out', 'data', 'preset'})}")
    configs = {}
    for stage in STAGES:
        changes = EMBEDDED_DEFAULT[stage]
        notes = ["embedded-default recipe; paper's recipe except: "
                 + "; ".join(f"{k}={o.value!r} ({o.why})" for k, o in changes.items())]
        if extra:
            notes.append(f"run overrides on top of the recipe: {extra}")
        values = {
            "stage": stage,
            "model": str(out / RUN_NAMES["1"]) if stage == "2" else model,
            "preset": preset, "device": device, "dtype": dtype, "attn": attn,
            "out": str(out / RUN_NAMES[stage]),
            **{k: o.value for k, o in changes.items()},
            **extra,
            "notes": " | ".join(notes),
        }
        configs[stage] = TrainConfig(**values)
    return configs
