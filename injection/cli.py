"""Sub-commands of the Deep-VRM flow: params → train (stage 1, stage 2, naive) → eval.

Each entry of :data:`COMMANDS` is ``name: (add_arguments, run, help)``; ``run(args)`` returns the JSON-able
summary that ``analysis.py`` prints. The work is in :mod:`injection.train` and :mod:`injection.evaluate`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from probes.errors import BadInputError

DEFAULT_MODEL = "mini-vl"
TRAIN_OPTIONS = (  # CLI option -> TrainConfig field; options left unset keep --config's value or the default
    "stage", "model", "data", "preset", "injection_layer", "fusion", "low_level", "conv", "lora_r", "lora_alpha",
    "epochs", "max_steps", "batch_size", "grad_accum", "lr", "merger_lr", "low_level_lr", "weight_decay", "warmup_ratio",
    "max_semantic", "prompt_variants", "seed", "dtype", "attn", "image_pixels", "gradient_checkpointing", "answer_tokens",
    "device", "checkpoint_every", "out", "notes",
)


def add_device_options(p: argparse.ArgumentParser, default_dtype: str | None = "float32") -> None:
    p.add_argument("--device", default=None if default_dtype is None else "cpu",
                   help="cpu, cuda, cuda:1, ... (under `accelerate launch` each process takes its own GPU; "
                        "default: cpu)")
    p.add_argument("--dtype", default=default_dtype, choices=["float32", "bfloat16", "float16"],
                   help="model dtype; bfloat16 on GPUs, as the paper (default: float32)")
    p.add_argument("--attn", default=None if default_dtype is None else "sdpa",
                   choices=["sdpa", "eager", "flash_attention_2"], help="attention implementation (default: sdpa)")


# --- params --------------------------------------------------------------------------------------

PARAMS_HELP = """Count the trainable parameters of a training stage from a config.json alone.

The model is built on the meta device (no weights, no memory, seconds even for 7B), made a Deep-VRM model
with K = --injection-layer, and wrapped with the stage's LoRA (peft_targets):
  stage 1: LoRA r=128, alpha=256 on every linear layer of every decoder layer;
  stage 2: LoRA r=64, alpha=128 on every linear layer of the low-level ViT, its merger, and the decoder
           layers with 0-based index >= K.
Check against the paper: Qwen2.5-VL-7B-Instruct's config with K = 16 gives 115,023,872 trainable (115.02M).
(--device and --dtype are accepted as by every command; the count itself needs neither.)

  python analysis.py params --config /work/shared/configs/qwen2.5-vl-7b-instruct.json --stage 2 --json
"""


def add_params_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="a model's config.json (e.g. Qwen2.5-VL-7B-Instruct's)")
    p.add_argument("--stage", type=int, default=2, choices=[1, 2], help="training stage (default: %(default)s)")
    p.add_argument("--injection-layer", type=int, default=None,
                   help="K: decoder layers before the fusion (default: 16 of 28, the same depth otherwise)")
    p.add_argument("--r", type=int, default=None, help="LoRA rank (default: the stage's, 128 or 64)")
    p.add_argument("--alpha", type=int, default=None, help="LoRA alpha (default: the stage's, 256 or 128)")
    p.add_argument("--low-level", default="lora", choices=["lora", "full"],
                   help="stage 2: LoRA on the low-level encoder (official) or full fine-tuning of it")
    p.add_argument("--conv", default="none", choices=["none", "pointwise", "all"],
                   help="stage 2: also put LoRA on the low-level encoder's convolutions (default: none, official)")
    p.add_argument("--json", action="store_true", help="print the JSON summary only (no readable line on stderr)")
    add_device_options(p)


def run_params(args) -> dict[str, Any]:
    from injection.peft_targets import parameter_counts
    from injection.train import default_injection_layer

    path = Path(args.config)
    if not path.is_file():
        raise BadInputError(path, "no such config file")
    k = args.injection_layer or default_injection_layer(_num_layers(path))
    counts = parameter_counts(path, stage=args.stage, injection_layer=k, r=args.r, alpha=args.alpha,
                              low_level=args.low_level, conv=args.conv)
    if not args.json:
        print(f"stage {args.stage}, K = {k}: {counts['trainable']:,} trainable of {counts['total']:,} parameters "
              f"({counts['trainable_percent']} %)", file=sys.stderr)
    return counts


def _num_layers(config: Path) -> int:
    try:
        values = json.loads(config.read_text())
        return (values.get("text_config") or {}).get("num_hidden_layers") or values["num_hidden_layers"]
    except (json.JSONDecodeError, KeyError) as e:
        raise BadInputError(config, f"not a model config.json ({e.__class__.__name__}: {e})") from None


# --- train ---------------------------------------------------------------------------------------

TRAIN_HELP = """Train one Deep-VRM stage, or the naive baseline (PEFT + accelerate).

  --stage 1      semantic alignment: LoRA (r=128) on every decoder layer of the base model; data = semantic
                 QA + D1 (semantic-cue fakes and their plausible twins). Saved with the LoRA merged.
  --stage 2      artifact-aware refinement, from the stage-1 folder (--model): a Deep-VRM model (low-level
                 encoder = copy of the main one, fused after layer K) with LoRA (r=64) on the low-level
                 encoder and layers >= K; data = every train row (D2, D1, distractors) + semantic QA.
  --stage naive  the comparison: the base model's decoder fine-tuned in full on D2 (trace fakes + reals).

Paper recipe by default: AdamW (0.9, 0.95), lr 1e-4, merger lr 1e-6, weight decay 1e-3, cosine schedule,
5 % warm-up, 2 epochs, loss on the answer tokens, prompts drawn from the official variants (real/fake,
yes/no, natural/AI-generated). Options override a --config JSON (a TrainConfig), which overrides defaults.
The output folder (--out, default <cache>/runs/deepvrm-<stage>-<hash>) gets the model (safetensors),
its processor and train.json (config, data hash, losses, times, versions). A killed run resumes from its
last checkpoint when started again with the same options; a finished one is returned as it is.

  python analysis.py train --stage 1 --model mini-vl --out runs/s1
  python analysis.py train --stage 2 --model runs/s1 --out runs/s2

Several processes (DDP; gloo on CPU, NCCL on GPUs): --batch-size is per process. On CPU, launch through
torchrun with --device cpu (accelerate's --cpu flag alone starts one process):
  accelerate launch --multi_gpu --num_processes 2 analysis.py train --stage 2 --model runs/s1 --device cpu
  accelerate launch --multi_gpu --num_processes 8 analysis.py train --stage 2 --model runs/s1 --data DATA \
      --device cuda --dtype bfloat16 --attn flash_attention_2 --image-pixels 262144 --batch-size 32 \
      --grad-accum 2 --gradient-checkpointing
"""


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", choices=["1", "2", "naive"], default=None, help="which stage (required unless in --config)")
    p.add_argument("--config", default=None, help="a TrainConfig JSON file (e.g. a run's train.json 'config')")
    p.add_argument("--model", default=None,
                   help="start: built-in (mini-vl, tiny-qwen2.5-vl), a model folder, or the stage-1 output "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE|DIR",
                   help="manifests or folders with manifest.jsonl (+ semantic.jsonl), rows pooled; default: the "
                        "embedded forensic-mini set. Data without cue columns (the official files, normalised by "
                        "`data --deepvrm-json`) give every labelled row to the stage: pass the stage's files")
    p.add_argument("--preset", default=None, choices=["default", "small"], help="embedded data preset")
    p.add_argument("--injection-layer", type=int, default=None,
                   help="stage 2: K (default: the checkpoint's, else round(16/28 x layers))")
    p.add_argument("--fusion", default=None, choices=["average", "add", "gated"], help="stage 2: fusion (default: average)")
    p.add_argument("--low-level", default=None, choices=["lora", "full"],
                   help="stage 2: LoRA on the low-level encoder (official) or full fine-tuning of it")
    p.add_argument("--conv", default=None, choices=["none", "pointwise", "all"],
                   help="stage 2: LoRA on the low-level encoder's convolutions too (CNN towers)")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: 128 stage 1, 64 stage 2)")
    p.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha (default: 2 x rank)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the data (default: 2)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=None, help="rows per process and micro-step (default: 8)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-steps per optimizer step (default: 1)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 1e-4)")
    p.add_argument("--merger-lr", type=float, default=None, help="learning rate of merger parameters (default: 1e-6)")
    p.add_argument("--low-level-lr", type=float, default=None,
                   help="stage 2: learning rate of the low-level encoder except its merger (default: --lr)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: 1e-3)")
    p.add_argument("--warmup-ratio", type=float, default=None, help="share of steps in warm-up (default: 0.05)")
    p.add_argument("--max-semantic", type=int, default=None, help="at most this many semantic QA rows (seeded sample)")
    p.add_argument("--no-prompt-variants", dest="prompt_variants", action="store_const", const=False, default=None,
                   help="ask each row its own prompt instead of drawing among the official variants")
    p.add_argument("--seed", type=int, default=None, help="data order, prompt draws, dropout (default: 0)")
    p.add_argument("--image-pixels", type=int, default=None, help="Qwen backbones: pixel budget (262144 in the paper)")
    p.add_argument("--gradient-checkpointing", action="store_const", const=True, default=None,
                   help="recompute activations in the backward pass (large models)")
    p.add_argument("--answer-tokens", action="store_const", const=True, default=None,
                   help="also train the embedding (tied lm_head) rows of the answer words' tokens; off in the paper, "
                        "needed for mini-VL, whose pretraining never taught it to emit real/fake/yes/no")
    p.add_argument("--checkpoint-every", type=int, default=None, help="optimizer steps between checkpoints (default: 50)")
    p.add_argument("--notes", default=None, help="free text stored in train.json (why these settings)")
    p.add_argument("--out", default=None, help="output folder (default: <cache>/runs/deepvrm-<stage>-<hash>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_options(p, default_dtype=None)


def run_train(args) -> dict[str, Any]:
    from injection.train import TrainConfig, train

    values = TrainConfig.load(args.config).to_dict() if args.config else {}
    values |= {k: getattr(args, k) for k in TRAIN_OPTIONS if getattr(args, k) is not None}
    if "stage" not in values:
        raise BadInputError("--stage", "missing: pass --stage 1, 2 or naive (or a --config that has it)")
    values.setdefault("model", DEFAULT_MODEL)
    record = train(TrainConfig.from_dict(values), progress=not args.quiet)
    losses = record.get("losses", [])
    keep = ("out", "config_hash", "deep_vrm", "data", "trainable", "steps", "global_batch", "samples_per_s",
            "times_s", "world_size", "resumed_at")
    return {**{k: record[k] for k in keep if k in record}, "loss_first": losses[:1], "loss_last": losses[-1:]}


# --- eval ----------------------------------------------------------------------------------------

EVAL_HELP = """Evaluate a checkpoint's real/fake answers, as the official eval.sh, plus held-out semantic QA.

--data takes forensic-mini folders (the test split by default) and Deep-VRM / ms-swift eval files such as
DATA/Test/eval_data.json (images normalised to --image-size, labels from the answer column). For each data
set <name>, <out>/<name>_test_result.jsonl gets one row per image: id, prompt, generated text ("response"),
parsed answer, label, logit margin, generator, cue. eval.json gets the metrics:
  accuracy     from the parsed *generated* answer (greedy, --max-new-tokens); unparseable = wrong, and
               counted apart ("unparsed")
  AP, ROC-AUC  from the logit margin fake-word minus real-word at the answer position (fake = positive)
  by_generator, by_cue   each group's fakes against every real image of the set
  semantic     val/test rows of the folder's semantic.jsonl: generated and closed-set class accuracy

  python analysis.py eval --model runs/s2 --data DATA/Test/eval_data.json --out eval/s2
"""


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="a trained folder (Deep-VRM or base), a model folder or "
                                                          "a built-in backbone (default: %(default)s)")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE|DIR",
                   help="data sets (default: the embedded forensic-mini set of --preset)")
    p.add_argument("--preset", default="default", choices=["default", "small"], help="embedded data preset")
    p.add_argument("--split", default="test", choices=["test", "val", "train", "all"],
                   help="forensic-mini rows to evaluate (rows without a split are always kept)")
    p.add_argument("--prompt", default=None, help="ask every image this prompt (default: each row's own)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=8, help="greedy answer length (eval.sh uses 64)")
    p.add_argument("--no-semantic", dest="semantic", action="store_false", help="skip the semantic QA rows")
    p.add_argument("--image-size", type=int, default=128, help="eval JSON files: side images are normalised to")
    p.add_argument("--image-pixels", type=int, default=None, help="Qwen backbones: pixel budget (262144 in the paper)")
    p.add_argument("--on-error", default="stop", choices=["stop", "skip"], help="a bad eval row: stop, or skip it")
    p.add_argument("--out", default=None, help="output folder (default: <model>/eval, or under the cache)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_options(p)


def run_eval(args) -> dict[str, Any]:
    from injection.evaluate import evaluate
    from injection.train import resolve_data
    from probes.backbones.base import LoadSettings

    data = args.data or [str(resolve_data(None, args.preset).parent)]
    summary = evaluate(
        args.model, data, out=args.out, settings=LoadSettings(args.dtype, args.attn, args.device), split=args.split,
        prompt=args.prompt, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, semantic=args.semantic,
        image_size=args.image_size, image_pixels=args.image_pixels, on_error=args.on_error, progress=not args.quiet,
    )
    return summary


# --- deepvrm: the whole comparison ----------------------------------------------------------------

DEEPVRM_HELP = """The Deep-VRM comparison on the embedded default: base model, naive fine-tune, Deep-VRM.

Runs, in this order, the recipe of injection/recipes.py (mini-VL on forensic-mini; the paper's settings
except where the recipe says why not):
  1. eval of the base model (mini-vl)                         -> <out>/eval/base/
  2. naive: the base decoder fine-tuned in full on D2, eval    -> <out>/naive/, <out>/eval/naive/
  3. stage 1: LoRA on the decoder, semantic QA + D1            -> <out>/stage1/
  4. stage 2: Deep-VRM from stage 1, LoRA on the low-level
     encoder and layers >= K, every train row + semantic QA    -> <out>/stage2/
  5. eval of Deep-VRM                                         -> <out>/eval/deep-vrm/
Every step is reused when done, and a killed training run resumes from its checkpoint, so running the
command again finishes the job. Evaluation is on the test split (detection: accuracy of the generated
answer, AP and ROC-AUC of the fake-minus-real logit margin, pooled, per generator and per cue; held-out
semantic QA accuracy). It writes <out>/comparison.json (recipe, table, times) and <out>/comparison.csv
(rows: base, naive, deep-vrm) and prints the table.

  python analysis.py deepvrm                                   # -> <cache>/runs/deepvrm-embedded/
  python analysis.py deepvrm --preset small --set max_steps=2 --out /tmp/smoke
"""

COMPARISON = ("base", "naive", "deep-vrm")
SUMMARY_COLUMNS = ("accuracy", "ap", "auc", "semantic_accuracy")  # printed per group: auc only


def add_deepvrm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", choices=["default", "small"], help="embedded data preset")
    p.add_argument("--out", default=None, help="output folder (default: <cache>/runs/deepvrm-embedded, "
                                               "<cache>/runs/deepvrm-embedded-small for --preset small)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change a TrainConfig setting of every run on top of the recipe (JSON values), e.g. "
                        "--set max_steps=2 for a smoke test; noted in each train.json")
    p.add_argument("--eval-batch-size", type=int, default=16, help="rows per evaluation batch")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_options(p)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> a dict; VALUE is read as JSON (``2``, ``1e-3``, ``true``), else kept a string."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadInputError(f"--set {item}", "expected KEY=VALUE, e.g. max_steps=2")
        try:
            values[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            values[key.strip().replace("-", "_")] = value
    return values


def run_deepvrm(args) -> dict[str, Any]:
    import time

    from injection import recipes
    from injection.train import resolve_data, train
    from probes.backbones.base import LoadSettings
    from probes.storage import cache_root, write_json, write_text

    suffix = "" if args.preset == "default" else f"-{args.preset}"
    out = Path(args.out) if args.out else cache_root() / "runs" / f"deepvrm-embedded{suffix}"
    configs = recipes.embedded_default(out, preset=args.preset, device=args.device, dtype=args.dtype, attn=args.attn,
                                       extra=parse_overrides(args.overrides))
    data = str(resolve_data(None, args.preset).parent)
    settings = LoadSettings(args.dtype, args.attn, args.device)
    progress = not args.quiet
    steps: dict[str, dict[str, Any]] = {}
    evals: dict[str, dict[str, Any]] = {}

    def step(name: str, fn, reused: bool):
        print(f"[deepvrm] {name} ...", flush=True)
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        steps[name] = {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1),
                       "reused": reused}
        if isinstance(result, dict) and "times_s" in result:  # as recorded by the run that did the work
            steps[name]["recorded_times_s"] = result["times_s"]
        note = " (reused)" if reused else ""
        print(f"[deepvrm] {name}: {steps[name]['wall_s']} s wall, {steps[name]['cpu_s']} s CPU{note}", flush=True)
        return result

    def training(name: str, config):
        return step(f"train {name}", lambda: train(config, progress=progress), (Path(config.out) / "train.json").is_file())

    def evaluation(row: str, model: str):
        where = out / "eval" / row
        request = eval_request(model, data, settings, args.eval_batch_size)
        evals[row] = step(f"eval {row}", lambda: cached_evaluate(
            model, data, where, settings, batch_size=args.eval_batch_size, progress=progress, request=request),
            eval_is_cached(where, request))

    evaluation("base", recipes.EMBEDDED_MODEL)
    naive = training("naive", configs["naive"])
    evaluation("naive", naive["out"])
    training("stage 1", configs["1"])
    stage2 = training("stage 2", configs["2"])
    evaluation("deep-vrm", stage2["out"])

    columns, rows = comparison_table(evals)
    write_text(out / "comparison.csv", table_csv(columns, rows))
    print(format_table(columns, rows), flush=True)
    summary = {
        "out": str(out), "data": data, "split": "test",
        "recipe": {"name": "embedded-default", "overrides": recipes.overrides(),
                   "run_overrides": parse_overrides(args.overrides),
                   "configs": {recipes.RUN_NAMES[s]: c.to_dict() for s, c in configs.items()}},
        "runs": {"base": recipes.EMBEDDED_MODEL, "naive": naive["out"], "deep-vrm": stage2["out"]},
        "evals": {row: e["out"] for row, e in evals.items()},
        "times_s": steps,  # this invocation's; a reused step keeps the times of its run in recorded_times_s
        "total_s": {"wall": round(sum(s["wall_s"] for s in steps.values()), 1),
                    "cpu": round(sum(s["cpu_s"] for s in steps.values()), 1)},
        "table": {r["model"]: {k: v for k, v in r.items() if k != "model"} for r in rows},
    }
    write_json(out / "comparison.json", summary)
    return {k: summary[k] for k in ("out", "runs", "evals", "times_s", "total_s")} | {
        "files": [str(out / "comparison.json"), str(out / "comparison.csv")]}


def eval_request(model: str, data: str, settings, batch_size: int) -> dict[str, Any]:
    """What decides an evaluation's result: the weights, the data and the settings."""
    return {"model": model, "weights": _weights_id(model), "data": data, "split": "test",
            "dtype": settings.dtype, "attn": settings.attn_implementation, "batch_size": batch_size,
            "max_new_tokens": 8}


def eval_is_cached(out: Path, request: dict[str, Any]) -> bool:
    from probes.storage import read_json

    return (out / "eval.json").is_file() and (out / "request.json").is_file() and read_json(out / "request.json") == request


def cached_evaluate(model: str, data: str, out: Path, settings, batch_size: int = 16, progress: bool = True,
                    request: dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`~injection.evaluate.evaluate` on the test split, reused when ``out`` holds the eval of the same
    weights, data and settings (``request.json`` beside ``eval.json``; ``request``: :func:`eval_request`'s)."""
    from injection.evaluate import evaluate
    from probes.storage import read_json, write_json

    request = request or eval_request(model, data, settings, batch_size)
    if eval_is_cached(out, request):
        return read_json(out / "eval.json")
    summary = evaluate(model, [data], out=out, settings=settings, split="test", batch_size=batch_size,
                       max_new_tokens=request["max_new_tokens"], progress=progress)
    write_json(out / "request.json", request)
    return summary


def _weights_id(model: str) -> str:
    """A hash of the weights file(s) of a model folder, or of the built-in backbone's checkpoint folder."""
    from probes.storage import hash_file, hash_json

    folder = Path(model)
    if not folder.is_dir() and model == "mini-vl":
        from probes.backbones.mini_vl import trained_dir

        folder = trained_dir()
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    return hash_json([hash_file(f) for f in files]) if files else model


def comparison_table(evals: dict[str, dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Eval summaries (``eval.json``, one data set each) -> the columns and one row per model.

    Columns: pooled ``accuracy``, ``real_accuracy``, ``fake_accuracy``, ``unparsed``, ``ap``, ``auc``; then
    ``generator=<g>:<accuracy|ap|auc>`` for each generator and ``cue=<c>:...`` for each cue (that group's
    fakes against every real image); then ``semantic_accuracy`` and ``semantic_closed_set_accuracy``
    (held-out semantic QA). A metric a model lacks is ``None``.
    """
    pooled = ("accuracy", "real_accuracy", "fake_accuracy", "unparsed", "ap", "auc")
    groups: dict[str, set[str]] = {"generator": set(), "cue": set()}
    results = {}
    for name, summary in evals.items():
        datasets = summary.get("datasets") or {}
        if len(datasets) != 1:
            raise BadInputError(f"eval of {name}", f"expected one data set, got {sorted(datasets)}")
        result = results[name] = next(iter(datasets.values()))
        for key in groups:
            groups[key] |= {g for g in result.get(f"by_{key}", {}) if g != "real"}
    columns = list(pooled)
    for key in groups:
        columns += [f"{key}={g}:{m}" for g in sorted(groups[key]) for m in ("accuracy", "ap", "auc")]
    columns += ["semantic_accuracy", "semantic_closed_set_accuracy"]
    rows = []
    for name, result in results.items():
        row: dict[str, Any] = {"model": name, **{m: result.get(m) for m in pooled}}
        for key in groups:
            for g in sorted(groups[key]):
                metrics = result.get(f"by_{key}", {}).get(g, {})
                row |= {f"{key}={g}:{m}": metrics.get(m) for m in ("accuracy", "ap", "auc")}
        semantic = result.get("semantic") or {}
        row["semantic_accuracy"] = semantic.get("accuracy")
        row["semantic_closed_set_accuracy"] = semantic.get("closed_set_accuracy")
        rows.append(row)
    return columns, rows


def table_csv(columns: list[str], rows: list[dict[str, Any]]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["model", *columns], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else _round(row[k]) for k in ["model", *columns]})
    return buffer.getvalue()


def format_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """The table transposed for reading: one line per metric, one column per model. Per-group lines show
    AUC only (the CSV has accuracy and AP too)."""
    shown = [c for c in columns if ":" not in c or c.endswith(":auc")]
    width = max(len(c) for c in shown)
    lines = [" ".join([f"{'metric':<{width}}", *(f"{r['model']:>10}" for r in rows)])]
    for c in shown:
        cells = ("-" if r.get(c) is None else f"{_round(r[c]):.4g}" if isinstance(r[c], float) else str(r[c])
                 for r in rows)
        lines.append(" ".join([f"{c:<{width}}", *(f"{cell:>10}" for cell in cells)]))
    return "\n".join(lines)


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


COMMANDS = {
    "params": (add_params_arguments, run_params, PARAMS_HELP),
    "train": (add_train_arguments, run_train, TRAIN_HELP),
    "eval": (add_eval_arguments, run_eval, EVAL_HELP),
    "deepvrm": (add_deepvrm_arguments, run_deepvrm, DEEPVRM_HELP),
}
