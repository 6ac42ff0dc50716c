"""Sub-commands of the analysis flow: data → backbone → capture (→ probes → figures → recommendation).

Each entry of :data:`COMMANDS` is ``name: (add_arguments, run, help)``; ``run(args)`` returns the
JSON-able summary that ``analysis.py`` prints. The functions called here hold the work; this module
only maps options onto them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from probes.errors import BadInputError
from probes.storage import write_json

DEFAULT_MODEL = "mini-vl"


# --- shared options ------------------------------------------------------------------------------


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="built-in name (mini-vl, tiny-qwen2.5-vl, tiny-qwen2-vl), a local model folder, "
                        "or a hub id already in the local cache (default: %(default)s, the embedded default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model dtype; bfloat16 on GPUs (default: %(default)s)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"],
                   help="attention implementation, where the backbone allows it (default: %(default)s)")
    p.add_argument("--image-pixels", type=int, default=None,
                   help="Qwen backbones: fixed pixel budget (min = max pixels), e.g. 262144 as in the paper")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow code shipped with a checkpoint to run (off by default)")


def load_model(args) -> Any:
    from probes.backbones import load_backbone

    options = {"image_pixels": args.image_pixels} if args.image_pixels else {}
    return load_backbone(args.model, dtype=args.dtype, attn_implementation=args.attn, device=args.device,
                         trust_remote_code=args.trust_remote_code, **options)


def add_data_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None,
                   help="a manifest (.jsonl/.json) or a folder holding manifest.jsonl; default: the embedded "
                        "forensic-mini set (built if needed)")


def resolve_manifest(data: str | None, preset: str = "default") -> Path:
    if data is None:
        return embedded_data(preset).manifest_path
    path = Path(data)
    if path.is_dir():
        path = path / "manifest.jsonl"
    if not path.is_file():
        raise BadInputError(data, "no manifest here (pass a manifest file or a folder with manifest.jsonl)")
    return path


def embedded_data(preset: str = "default"):
    from probes.data import ForensicMiniConfig, build_forensic_mini

    return build_forensic_mini(ForensicMiniConfig.preset(preset))


def finish(summary: dict[str, Any], out: str | None, name: str) -> dict[str, Any]:
    """Write the run summary beside the outputs when ``--out`` is given."""
    if out:
        write_json(Path(out) / f"{name}.json", summary)
    return summary


# --- data ----------------------------------------------------------------------------------------

DATA_HELP = """Build the embedded data set, or normalise your own.

Without options: builds "forensic-mini" into the cache (real photos from PyPI and Debian packages,
content-aligned fakes from pretrained generators shipped in wheels, semantic-cue composites, distractors),
every image 128x128 PNG of one byte length so that neither size, format nor file length leaks the label.
A finished build is reused in well under a second; an interrupted one resumes.

Your own data gets the same de-biasing (centre crop, fixed size, identical PNG re-encoding; the original
size/format/bytes are kept in orig_* columns for the confound probe):
  --deepvrm-json FILE   Deep-VRM / ms-swift JSON or JSONL rows (e.g. DATA/Test/eval_data.json)
  --genimage DIR        GenImage-style folders {generator}/{train,val}/{ai,nature}/
"""


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", choices=["default", "small"],
                   help="forensic-mini size: default (~4,500 images) or small (tests)")
    p.add_argument("--config", default=None, help="a ForensicMiniConfig JSON file (overrides --preset)")
    p.add_argument("--deepvrm-json", default=None, metavar="FILE", help="normalise a Deep-VRM JSON/JSONL file")
    p.add_argument("--image-root", default=None, help="with --deepvrm-json: folder the image paths are relative to")
    p.add_argument("--genimage", default=None, metavar="DIR", help="normalise a GenImage-style folder tree")
    p.add_argument("--size", type=int, default=128, help="user data: square side in pixels (default: %(default)s)")
    p.add_argument("--on-error", default="stop", choices=["stop", "skip"],
                   help="a bad image or row: stop with its one-line error, or skip it and list it in the summary")
    p.add_argument("--out", default=None, help="where to write (default: under the cache)")


def run_data(args) -> dict[str, Any]:
    from probes.data import ForensicMiniConfig, build_forensic_mini, load_deepvrm_json, load_genimage

    if args.deepvrm_json:
        ds = load_deepvrm_json(args.deepvrm_json, image_root=args.image_root, size=args.size,
                               on_error=args.on_error, out=args.out)
        return ds.summary()
    if args.genimage:
        return load_genimage(args.genimage, size=args.size, on_error=args.on_error, out=args.out).summary()
    config = ForensicMiniConfig.load(args.config) if args.config else ForensicMiniConfig.preset(args.preset)
    report = build_forensic_mini(config, root=args.out)
    return report.to_dict()


# --- backbone ------------------------------------------------------------------------------------

BACKBONE_HELP = """Pretrain the embedded default backbone, mini-VL, on forensic-mini's semantic questions.

mini-VL = the ImageNet-pretrained EfficientNet-Lite0 shipped in a wheel (frozen vision tower) + a projector
+ a Qwen2.5-VL text decoder (M-RoPE). Only the projector and decoder are trained, on "What is in this
image?" and "What kind of scene is this?" (train split), never on real/fake labels. The tower's features
are cached, the run is deterministic and resumes after a kill. Prints held-out semantic accuracy beside two
baselines on the same split (EfficientNet linear probe, colour histogram).
"""


def add_backbone_arguments(p: argparse.ArgumentParser) -> None:
    add_data_option(p)
    p.add_argument("--preset", default="default", choices=["default", "small"], help="embedded data preset")
    p.add_argument("--config", default=None, help="a PretrainConfig JSON file (default settings otherwise)")
    p.add_argument("--out", default=None, help="checkpoint folder (default: <cache>/backbones/mini-vl-<hash>)")


def run_backbone(args) -> dict[str, Any]:
    from probes.backbones.pretrain import PretrainConfig, pretrain_mini_vl

    data_dir = resolve_manifest(args.data, args.preset).parent
    config = PretrainConfig.load(args.config) if args.config else PretrainConfig()
    return pretrain_mini_vl(config, data_dir, out=args.out)


# --- capture -------------------------------------------------------------------------------------

CAPTURE_HELP = """Capture per-layer hidden states with nnsight into the activation cache.

For every image: the input of decoder layer 0 (vision features scattered in) and the output of every
decoder layer, at the image-token positions (mean-pooled; per token with --per-token) and at the last
token. Stored in shards keyed by provenance (weights, processor, prompt, positions, dtype, attention,
manifest); a store of another provenance is refused, and an interrupted capture resumes.
"""


def add_capture_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_data_option(p)
    p.add_argument("--positions", default="image_mean,last", help="comma-separated: image_mean, last")
    p.add_argument("--per-token", action="store_true", help="also store every image token (large)")
    p.add_argument("--prompt", default=None, help="one prompt for every row (default: each row's own)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--store-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--on-error", default="stop", choices=["stop", "skip"])
    p.add_argument("--out", default=None, help="store folder (default: <cache>/activations/<key>)")


def run_capture(args) -> dict[str, Any]:
    from probes.capture import capture
    from probes.data import read_manifest

    manifest = resolve_manifest(args.data)
    backbone = load_model(args)
    report = capture(
        backbone, read_manifest(manifest), manifest.parent,
        positions=[s for s in args.positions.split(",") if s], per_token=args.per_token, prompt=args.prompt,
        batch_size=args.batch_size, store_dtype=args.store_dtype, on_error=args.on_error, store=args.out,
    )
    return report.to_dict()


# --- probe / recommend-depth --------------------------------------------------------------------

PROBE_HELP = """Layer-wise linear probes with real statistics, and the emergence figures.

Captures what is needed (reusing the cache), then for every task fits L2-logistic probes on every layer
(nested grouped CV for the regularisation, several seeds), with 95% bootstrap CIs, a control task with
random labels (selectivity = task - control), per-generator probes, and a confound probe on file size,
format and byte length alone (which must sit at chance). Tasks: semantic (object class), scene, d1
(semantic-cue fakes vs their twins), d2 (trace-only fakes vs the images they re-render), gen:<family>.
Splits are by source photo / object, never by image or token. By default only the held-out splits are
probed: the embedded backbone was pretrained on the train split's images.
"""


def add_probe_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_data_option(p)
    p.add_argument("--tasks", default="semantic,scene,d1,d2", help="comma-separated task names")
    p.add_argument("--no-generators", action="store_true", help="skip the gen:<family> probes")
    p.add_argument("--position", default="last", choices=["last", "image_mean"],
                   help="last token (the answer position) or the mean over image tokens")
    p.add_argument("--splits", default="val,test", help="comma-separated splits to probe, or 'all'")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the grouped fold assignment")
    p.add_argument("--folds", type=int, default=5, help="outer grouped folds (fewer when a class has fewer groups)")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap draws for the CIs")
    p.add_argument("--no-baseline", action="store_true", help="skip the same-architecture random-weights baseline")
    p.add_argument("--batch-size", type=int, default=16, help="capture batch size")
    p.add_argument("--out", default=None, help="folder for tables and figures (default: runs/<model>/probe)")


def layerwise_config(args):
    from probes.layerwise import LayerwiseConfig

    return LayerwiseConfig(
        tasks=tuple(t for t in args.tasks.split(",") if t), generators=not args.no_generators,
        position=args.position, splits=None if args.splits == "all" else tuple(args.splits.split(",")),
        seeds=tuple(int(x) for x in args.seeds.split(",")), n_folds=args.folds, n_boot=args.boot,
        device=args.device,
    )


def run_probe(args, *, figure_stem: str = "emergence") -> dict[str, Any]:
    from probes.data import read_manifest
    from probes.layerwise import probe_backbone
    from probes.plots import emergence_figure, generator_heatmap

    manifest = resolve_manifest(args.data)
    records = read_manifest(manifest)
    config = layerwise_config(args)
    backbone = load_model(args)
    result = probe_backbone(backbone, records, manifest.parent, config, batch_size=args.batch_size)
    baseline = None
    if not args.no_baseline:
        baseline = probe_backbone(backbone.random_like(), records, manifest.parent, config, batch_size=args.batch_size)
    out = Path(args.out or Path("runs") / Path(args.model).name / "probe")
    result.save(out / "tables")
    if baseline is not None:
        baseline.save(out / "tables-random-weights")
    recommended = getattr(args, "recommended", None)
    title = f"{backbone.family} ({Path(args.model).name}), {config.position} token, {manifest.parent.name}"
    figures = emergence_figure(result.curves, result.selectivity, out / figure_stem, recommended=recommended,
                               baseline=None if baseline is None else baseline.curves, title=title)
    if config.generators:
        figures += generator_heatmap(result.curves, out / "generators", title=title)
    summary = {
        "out": str(out),
        "figures": figures,
        "model": backbone.provenance(),
        "config": config.to_dict(),
        "tasks": result.tasks,
        "confound": result.confound,
        "accuracy_by_layer": _by_layer(result.curves, "accuracy"),
        "selectivity_by_layer": _by_layer(result.selectivity, None),
    }
    if "warning" in result.confound:
        print(f"WARNING: {result.confound['warning']}", flush=True)
    return summary, result


def _by_layer(table, metric: str | None) -> dict[str, list]:
    t = table if metric is None else table[table.metric == metric]
    return {task: [[int(r.layer), round(float(r.estimate), 4), round(float(r.lo), 4), round(float(r.hi), 4)]
                   for r in g.sort_values("layer").itertuples()] for task, g in t.groupby("task")}


def run_probe_command(args) -> dict[str, Any]:
    summary, _ = run_probe(args)
    return finish(summary, summary["out"], "probe")


RECOMMEND_HELP = """Recommend the injection layer K for Deep-VRM from the probe curves, with its evidence.

Criterion: the earliest layer at which every semantic curve (semantic object class and D1 by default) is
within its 95% CI of its plateau (its maximum over layers), clipped to 1..L-1 so that a trainable layer
follows. K is 1-based: the low-level stream is fused after decoder layer K (16 of 28 in the paper's
Qwen2.5-VL-7B). Curves whose selectivity never clears zero are left out, and the output says so.
Writes DIR/recommendation.json and the emergence figure with K marked.
"""


def add_recommend_arguments(p: argparse.ArgumentParser) -> None:
    add_probe_arguments(p)
    p.add_argument("--criterion-tasks", default="semantic,d1", help="the curves whose plateau fixes K")


def run_recommend(args) -> dict[str, Any]:
    from probes.depth import recommend
    from probes.plots import emergence_figure

    summary, result = run_probe(args, figure_stem="emergence")
    rec = recommend(result.curves[result.curves.metric == "accuracy"], summary["model"]["num_layers"],
                    tasks=tuple(args.criterion_tasks.split(",")), selectivity=result.selectivity,
                    position=result.provenance["config"]["position"])
    rec.provenance = {"model": summary["model"], "probe": result.provenance, "confound": result.confound}
    out = Path(summary["out"])
    baseline = out / "tables-random-weights" / "curves.csv"
    import pandas as pd

    summary["figures"] = emergence_figure(
        result.curves, result.selectivity, out / "emergence", recommended=rec.layer,
        baseline=pd.read_csv(baseline) if baseline.is_file() else None,
        title=f"{summary['model']['family']}: recommended K = {rec.layer} of {rec.num_layers}",
    ) + [f for f in summary["figures"] if "generators" in f]
    write_json(out / "recommendation.json", rec.to_dict())
    print(f"recommended injection layer: K = {rec.layer} of {rec.num_layers} ({rec.criterion})", flush=True)
    return finish({"layer": rec.layer, "num_layers": rec.num_layers, "criterion": rec.criterion,
                   "per_task": rec.per_task, "excluded": rec.excluded,
                   "recommendation": str(out / "recommendation.json"), "probe_provenance": result.provenance,
                   **summary}, str(out), "recommend-depth")


# --- all -----------------------------------------------------------------------------------------

ALL_HELP = """The main job on the embedded default: data → backbone → capture → probes → figures → K.

1. data      build forensic-mini (real photos, generator re-renders, semantic-cue composites)
2. backbone  pretrain mini-VL on its semantic questions; held-out accuracy beside two baselines
3. capture   per-layer activations of the held-out images (nnsight), into the activation cache
4. probes    layer-wise probes for every task, the control task, the confound probe, and the same
             architecture with random weights as a baseline
5. figures   the emergence curves and the layer x generator heat map (PNG, PDF, CSV beside them)
6. K         the recommended injection layer, with its evidence (recommendation.json)

Every step reuses what is already built, so a second run takes seconds. The full summary goes to
OUT/all.json; the printed one names where everything went.
"""


def add_all_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", choices=["default", "small"], help="embedded data preset")
    p.add_argument("--out", default="runs/embedded", help="folder for figures, tables and summaries "
                                                           "(default: %(default)s)")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap draws for the CIs")


def run_all(args) -> dict[str, Any]:
    t0 = time.perf_counter()
    data = embedded_data(args.preset)
    print(f"[1 data] forensic-mini ({data.counts['manifest']['rows']} rows): {data.path}", flush=True)
    backbone = run_backbone(argparse.Namespace(data=str(data.path), preset=args.preset, config=None, out=None))
    acc, base = backbone["accuracy"], backbone["baselines"]
    print(f"[2 backbone] mini-VL: {backbone['path']}\n  held-out object accuracy {acc['object']:.3f} "
          f"(EfficientNet-Lite0 linear probe {base['efficientnet_linear_probe']:.3f}, colour histogram "
          f"{base['colour_histogram']:.3f}; bar passes: {backbone['bar']['passes']})", flush=True)
    probe_args = argparse.Namespace(
        model=backbone["path"], device="cpu", dtype="float32", attn="sdpa", image_pixels=None,
        trust_remote_code=False, data=str(data.path), tasks="semantic,scene,d1,d2", no_generators=False,
        position="last", splits="val,test", seeds="0,1,2", folds=5, boot=args.boot, no_baseline=False,
        batch_size=16, out=args.out, criterion_tasks="semantic,d1",
    )
    rec = run_recommend(probe_args)
    capture = rec["probe_provenance"]["capture"]
    print(f"[3 capture] {capture['rows_in_store']} images x {rec['model']['num_layers'] + 1} layer outputs: "
          f"{capture['store']}", flush=True)
    print(f"[4 probes] tables: {Path(args.out) / 'tables'} (random-weights baseline: tables-random-weights)",
          flush=True)
    print("[5 figures] " + ", ".join(f for f in rec["figures"] if f.endswith(".png")), flush=True)
    print(f"[6 K] recommended injection layer K = {rec['layer']} of {rec['num_layers']}: {rec['criterion']}\n"
          f"  evidence: {rec['recommendation']}", flush=True)
    full = {"data": {"path": str(data.path), "manifest_hash": data.manifest_hash, "counts": data.counts},
            "backbone": backbone, "recommend_depth": rec, "seconds": round(time.perf_counter() - t0, 1)}
    write_json(Path(args.out) / "all.json", full)
    return {
        "data": str(data.path), "backbone": backbone["path"], "activations": capture["store"],
        "figures": rec["figures"], "recommendation": rec["recommendation"], "layer": rec["layer"],
        "num_layers": rec["num_layers"], "semantic_accuracy": acc["object"], "baselines": base,
        "summary": str(Path(args.out) / "all.json"), "seconds": full["seconds"],
    }


COMMANDS = {
    "all": (add_all_arguments, run_all, ALL_HELP),
    "data": (add_data_arguments, run_data, DATA_HELP),
    "backbone": (add_backbone_arguments, run_backbone, BACKBONE_HELP),
    "capture": (add_capture_arguments, run_capture, CAPTURE_HELP),
    "probe": (add_probe_arguments, run_probe_command, PROBE_HELP),
    "recommend-depth": (add_recommend_arguments, run_recommend, RECOMMEND_HELP),
}
