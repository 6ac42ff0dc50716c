"""The ``inspect`` command: semantic forgetting, use of the injected stream, ablations.

:data:`COMMANDS` follows ``analysis.py``'s convention: ``name: (add_arguments, run, help)``; ``run(args)`` returns
the JSON-able summary that ``analysis.py`` prints. The work is in :mod:`injection.inspect`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from probes.errors import BadInputError, ConfigError

ACTIONS = ("forgetting", "gating", "ablate", "all")

HELP = """Inspect trained Deep-VRM models: semantic forgetting, how the injected stream is used, ablations.

  forgetting  base vs naive fine-tune vs Deep-VRM: held-out semantic QA (stand-in for BLINK / MME), semantic
              probe accuracy per layer, probe transfer (base probes scored on each model), debiased linear CKA
              per layer on the image tokens with bootstrap CIs, and the check that Deep-VRM's layers <= K did not
              move from its start. Writes OUT/forgetting/: table2.csv/.md (the paper's Table 2 shape), qa.csv,
              probes.csv, cka.csv, forgetting.png/.pdf/.csv, forgetting.json.
  gating      per generator and cue, the change of the fake-real logit margin when the injected stream is
              removed, replaced by another image's (shuffled) or by the content-aligned partner's (the real crop
              behind a fake, and the reverse); ||injected||/||h|| and the gate per token; attention mass from the
              answer position to the image tokens per layer; a verdict on "trace-only fakes lean on the stream,
              semantic-cue fakes on the semantic path". Writes OUT/gating/: margins.csv, reliance.csv, auc.csv,
              attention(_summary).csv, footprint.csv, tokens.csv, gate.csv, figures reliance, auc, attention,
              stream, footprint (.png/.pdf/.csv), gating.json.
  ablate      stage-2 runs from the Deep-VRM run's config (--train-config, default: --deepvrm's train.json) at
              each --depths K, and the --variants init (copy/random), fusion (average/add/gated), early (layers
              < K frozen/trainable); runs are cached by config hash and resume; each is evaluated (detection and
              semantic QA on a seeded test subset). Writes OUT/ablate/: ablate.csv, depth and variants figures,
              ablate.json (with the training cost apart: sweep_cost).
  all         forgetting, gating and ablate in turn.

Results are cached under <cache>/inspect/ (activation stores, QA answers, gating tables, evaluations), so a
second run only redraws. Models: a built-in backbone (mini-vl, tiny-qwen2.5-vl) or a model / run folder.

  python analysis.py inspect forgetting --base mini-vl --naive RUNS/naive --deepvrm RUNS/s2 --out inspect/
  python analysis.py inspect gating --deepvrm RUNS/s2 --out inspect/
  python analysis.py inspect ablate --deepvrm RUNS/s2 --depths 2 4 7 10 --recommendation probes/recommendation.json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=ACTIONS, help="what to inspect")
    p.add_argument("--base", default="mini-vl", help="the base model (built-in name or folder; default: %(default)s)")
    p.add_argument("--naive", default=None, help="the naive fine-tune's run folder (stage naive)")
    p.add_argument("--deepvrm", default=None, help="the Deep-VRM run folder (stage 2)")
    p.add_argument("--data", default=None, help="a data folder with manifest.jsonl (+ semantic.jsonl); default: the "
                                                "embedded forensic-mini set of --preset")
    p.add_argument("--preset", default="default", choices=["default", "small"], help="embedded data preset")
    p.add_argument("--out", default=None, help="output folder (default: <cache>/inspect/out)")
    p.add_argument("--config", default=None, help="a JSON config of the action (ForgettingConfig, GatingConfig or "
                                                  "AblateConfig); options given here override it")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model dtype")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward (default: 16)")
    p.add_argument("--n-boot", type=int, default=None, help="bootstrap draws (default: 1000)")
    p.add_argument("--seed", type=int, default=None, help="seed of samples, donors and bootstraps (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: as set)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    f = p.add_argument_group("forgetting")
    f.add_argument("--tasks", nargs="+", default=None, help="probe tasks (default: semantic)")
    f.add_argument("--positions", nargs="+", default=None, choices=["image_mean", "last"], help="probe positions")
    f.add_argument("--prompt", default=None, help="capture prompt with <image> (default: the object question; "
                                                  "'own': each row's own prompt)")
    f.add_argument("--cka-images", type=int, default=None, help="images for CKA (default: 400)")
    f.add_argument("--qa-max-rows", type=int, default=None, help="at most this many semantic QA rows")
    f.add_argument("--seeds", nargs="+", type=int, default=None, help="probe CV seeds (default: 0)")
    g = p.add_argument_group("gating")
    g.add_argument("--split", default=None, help="rows to read (default: test)")
    g.add_argument("--max-rows", type=int, default=None, help="a seeded sample of that many rows (+ partners)")
    g.add_argument("--conditions", nargs="+", default=None, choices=["removed", "shuffled", "partner"])
    g.add_argument("--no-attention", action="store_true", help="skip attention masses (then any attention works)")
    a = p.add_argument_group("ablate")
    a.add_argument("--train-config", default=None, help="the base stage-2 TrainConfig: a JSON file or a run folder "
                                                        "(default: --deepvrm's train.json)")
    a.add_argument("--depths", nargs="+", type=int, default=None, help="K values of the depth sweep")
    a.add_argument("--variants", nargs="*", default=None, choices=["init", "fusion", "early"],
                   help="variant groups at the base K (default: all three; none: give no value)")
    a.add_argument("--train-set", nargs="+", default=None, metavar="KEY=VALUE",
                   help="override base TrainConfig fields for every run (JSON values), e.g. max_steps=50")
    a.add_argument("--no-train", action="store_true", help="evaluate finished runs only; list the missing ones")
    a.add_argument("--recommendation", default=None, help="recommend-depth's recommendation.json (or K) to mark")
    a.add_argument("--eval-forensic", type=int, default=None, help="forensic test rows per evaluation (default 400; "
                                                                   "0: all)")
    a.add_argument("--eval-semantic", type=int, default=None, help="semantic QA rows per evaluation (default 300; "
                                                                   "0: all)")


# --- configs from options ------------------------------------------------------------------------------


def _values(args, cls, mapping: dict[str, str]) -> dict[str, Any]:
    values = cls.load(args.config).to_dict() if args.config and args.action != "all" else {}
    common = {"device": "device", "dtype": "dtype", "batch_size": "batch_size", "n_boot": "n_boot", "seed": "seed",
              "threads": "threads"}
    for option, name in {**common, **mapping}.items():
        value = getattr(args, option)
        if value is not None:
            values[name] = value
    return values


def forgetting_config(args):
    from injection.inspect.forgetting import ForgettingConfig

    values = _values(args, ForgettingConfig, {"tasks": "tasks", "positions": "positions", "cka_images": "cka_images",
                                              "qa_max_rows": "qa_max_rows", "seeds": "seeds"})
    if args.prompt is not None:
        values["prompt"] = None if args.prompt == "own" else args.prompt
    return ForgettingConfig.from_dict(values)


def gating_config(args):
    from injection.inspect.gating import GatingConfig

    values = _values(args, GatingConfig, {"split": "split", "max_rows": "max_rows", "conditions": "conditions"})
    if args.no_attention:
        values["attention"] = False
    if args.prompt is not None and args.action == "gating":
        values["prompt"] = None if args.prompt == "own" else args.prompt
    return GatingConfig.from_dict(values)


def ablate_config(args):
    from injection.inspect.ablate import AblateConfig

    values = _values(args, AblateConfig, {"depths": "depths", "variants": "variants"})
    for option in ("eval_forensic", "eval_semantic"):
        value = getattr(args, option)
        if value is not None:
            values[option] = value or None
    if args.no_train:
        values["train"] = False
    return AblateConfig.from_dict(values)


def base_train_config(args):
    from injection.inspect.ablate import load_base_config

    source = args.train_config or args.deepvrm
    if source is None:
        raise BadInputError("--train-config", "missing: pass the Deep-VRM run folder (--deepvrm) or a TrainConfig JSON")
    config = load_base_config(source)
    if args.train_set:
        from injection.train import TrainConfig

        values = config.to_dict()
        for item in args.train_set:
            key, sep, text = item.partition("=")
            if not sep:
                raise ConfigError(f"--train-set {item}", "use KEY=VALUE")
            try:
                values[key] = json.loads(text)
            except json.JSONDecodeError:
                values[key] = text
        values["out"] = None  # another config: its own cached folder
        config = TrainConfig.from_dict(values)
    return config


# --- running -------------------------------------------------------------------------------------------


def _out(args) -> Path:
    if args.out:
        return Path(args.out)
    from probes.storage import cache_root

    return cache_root() / "inspect" / "out"


def run_forgetting_action(args) -> dict[str, Any]:
    from injection.inspect.forgetting import run_forgetting

    models = {"base": args.base, "naive": args.naive, "deepvrm": args.deepvrm}
    summary = run_forgetting(models, args.data, forgetting_config(args), out=_out(args) / "forgetting",
                             preset=args.preset, progress=not args.quiet)
    return {"out": str(_out(args) / "forgetting"), "table2": summary["table2"],
            "frozen_check": summary["frozen_check"], "injection_layer": summary["injection_layer"],
            "reused": summary["reused"], "seconds": summary["seconds"], "files": summary.get("files", [])}


def run_gating_action(args) -> dict[str, Any]:
    from injection.inspect.gating import run_gating

    if not args.deepvrm:
        raise BadInputError("--deepvrm", "missing: pass the Deep-VRM run folder")
    summary = run_gating(args.deepvrm, args.data, gating_config(args), out=_out(args) / "gating", preset=args.preset,
                         progress=not args.quiet)
    return {"out": str(_out(args) / "gating"), "verdict": summary["verdict"], "stream": summary["stream"],
            "data": summary["data"], "reused": summary["reused"], "seconds": summary["seconds"],
            "files": summary.get("files", [])}


def run_ablate_action(args) -> dict[str, Any]:
    from injection.inspect.ablate import recommended_layer, run_ablate

    references = {"base": args.base, "naive": args.naive}
    summary = run_ablate(base_train_config(args), args.data, ablate_config(args), references=references,
                         recommended=recommended_layer(args.recommendation), out=_out(args) / "ablate",
                         progress=not args.quiet)
    keep = ("name", "group", "value", "status", "folder", "injection_layer", "fusion", "auc", "accuracy",
            "semantic_acc", "semantic_retention")
    return {"out": str(_out(args) / "ablate"), "runs": [{k: r.get(k) for k in keep} for r in summary["runs"]],
            "sweep_cost": summary["sweep_cost"], "eval_s": summary["eval_s"], "seconds": summary["seconds"],
            "files": summary.get("files", [])}


def run(args) -> dict[str, Any]:
    actions = {"forgetting": run_forgetting_action, "gating": run_gating_action, "ablate": run_ablate_action}
    if args.action != "all":
        return actions[args.action](args)
    if args.config:
        raise ConfigError("--config", "one config per action: run the actions one by one to pass one")
    out = {}
    for name, action in actions.items():
        if name == "ablate" and args.depths is None and args.variants == []:
            continue
        out[name] = action(args)
    out["seconds"] = round(sum(v.get("seconds", 0.0) for v in out.values()), 2)
    return out


COMMANDS = {"inspect": (add_arguments, run, HELP)}
