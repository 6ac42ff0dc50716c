"""Benchmark capture: its cost over a bare forward, its memory as rows grow, and its throughput.

(a) capture of every layer vs a bare forward of the same batches with the same settings
    (``forward_kwargs``: no KV cache, ``logits_to_keep=1``; same dtype and attention) -- goal <= 1.10;
(b) peak RSS of a capture of 4N images vs N, each in a fresh subprocess -- goal <= 1.1. It stores
    per-token states (the heaviest rows) in shards of ``--rss-shard-rows`` rows, fewer than N, so that
    a capture that kept rows in memory would show; the peak is taken over the capture alone (after
    loading the model) and over the whole process;
(c) images/s: bare model, capture forward (trace + pooling + copy to host), and end to end (image
    loading, preprocessing, forward, writing).

Ratios are measured in one run, pairing each batch's bare and traced forward, so machine load cancels.

    python bench/bench_capture.py                                   # tiny random Qwen2.5-VL, CPU
    python bench/bench_capture.py --model mini-vl                   # the embedded default
    python bench/bench_capture.py --model /models/Qwen2.5-VL-3B-Instruct --device cuda --dtype bfloat16 \\
        --image-size 448 --batch-size 16 --n 256
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from probes.backbones import load_backbone  # noqa: E402
from probes.capture import LayerTracer, capture, forward_kwargs  # noqa: E402
from probes.data.manifest import DEFAULT_PROMPT, Record, read_manifest, swift_messages, write_manifest  # noqa: E402


def main() -> None:
    args = parse_args()
    if args.rss_child:
        print(json.dumps(rss_child(args)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-capture-") as tmp:
        folder = Path(tmp)
        manifest = make_images(folder, 4 * args.n, args.image_size)
        backbone = load(args)
        records = read_manifest(manifest)
        result = {"settings": settings(args, backbone)}
        result["overhead"] = overhead(backbone, records, folder, args)
        result["throughput"] = throughput(backbone, records[: args.n], folder, args)
        result["rss"] = rss(manifest, args)
    print_summary(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-qwen2.5-vl", help="built-in name or model folder (load_backbone)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--image-size", type=int, default=224, help="side of the square images, px")
    p.add_argument("--image-pixels", type=int, default=None, help="processor pixel budget (default: side^2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n", type=int, default=64, help="images for (b) and (c); (b) also runs 4n")
    p.add_argument("--batches", type=int, default=4, help="distinct batches timed in (a)")
    p.add_argument("--rounds", type=int, default=5, help="times each batch is timed in (a)")
    p.add_argument("--per-token", action="store_true", help="also store image_tokens (the heavy case)")
    p.add_argument("--shard-rows", type=int, default=None, help="rows per shard in (c) (default: capture's)")
    p.add_argument("--rss-shard-rows", type=int, default=16, help="rows per shard in (b)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra load_backbone option, e.g. num_layers=36 or init=random (repeatable)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)  # manifest path: run one (b) capture
    p.add_argument("--rows", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load(args: argparse.Namespace):
    """The backbone, with its processor's pixel budget fixed to the bench's image size."""
    if args.threads:
        torch.set_num_threads(args.threads)
    pixels = args.image_pixels or args.image_size**2
    options = {"dtype": args.dtype, "attn_implementation": args.attn, "device": args.device}
    options.update((k, int(v) if v.isdigit() else v) for k, v in (o.split("=", 1) for o in args.option))
    if args.model.startswith("tiny-"):
        # Tiny models take no pixel-budget option: swap in a processor with this budget.
        from probes.backbones.tiny import tiny_processor

        backbone = load_backbone(args.model, **options)
        backbone.processor = tiny_processor(backbone.family, pixels)
        return backbone
    if Path(args.model).is_dir():
        return load_backbone(args.model, image_pixels=pixels, **options)
    return load_backbone(args.model, **options)


def make_images(folder: Path, n: int, size: int) -> Path:
    """``n`` random-noise PNGs (hard to compress, so decoding costs what a photo would) and a manifest."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        name = f"img-{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)
        records.append(Record(id=f"img-{i:05d}", messages=swift_messages(DEFAULT_PROMPT, None), images=[name]))
    path = folder / "manifest.jsonl"
    write_manifest(path, records)
    return path


def settings(args: argparse.Namespace, backbone) -> dict:
    image = Image.new("RGB", (args.image_size, args.image_size))
    inputs = backbone.build_inputs([image], [DEFAULT_PROMPT])
    return {
        "model": args.model,
        "family": backbone.family,
        "layers": backbone.num_layers,
        "hidden": backbone.hidden_size,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "dtype": args.dtype,
        "attn": args.attn,
        "image_size": args.image_size,
        "image_tokens": int(backbone.image_token_mask(inputs["input_ids"]).sum()),
        "seq_len": int(inputs["input_ids"].shape[1]),
        "batch_size": args.batch_size,
        "positions": ["image_mean", "last", *(["image_tokens"] if args.per_token else [])],
        "forward_kwargs": forward_kwargs(backbone.model),
        "threads": torch.get_num_threads(),
    }


def overhead(backbone, records, folder: Path, args: argparse.Namespace) -> dict:
    """(a): per batch, a bare forward and the capture's traced forward (+ pooling, fp16 cast, copy to host)."""
    positions = ["image_mean", "last", *(["image_tokens"] if args.per_token else [])]
    tracer = LayerTracer(backbone, positions, list(range(backbone.num_layers + 1)))
    kwargs = forward_kwargs(backbone.model)
    batches = []
    for b in range(args.batches):
        rows = records[b * args.batch_size : (b + 1) * args.batch_size]
        images = [Image.open(folder / r.images[0]).convert("RGB") for r in rows]
        batches.append(backbone.build_inputs(images, [r.prompt for r in rows]).to(args.device))

    def bare(inputs):
        with torch.inference_mode():
            backbone.model(**inputs, **kwargs)

    def traced(inputs):
        tracer(inputs)

    for inputs in batches:  # warm-up: first calls allocate and (for nnsight) compile
        bare(inputs)
        traced(inputs)
    wall, cpu = [], []  # (bare, capture) seconds per batch, paired
    for r in range(args.rounds):
        for inputs in batches:
            order = (bare, traced) if r % 2 == 0 else (traced, bare)  # alternate who runs first
            times = {fn: timed(fn, inputs, args.device) for fn in order}
            wall.append((times[bare][0], times[traced][0]))
            cpu.append((times[bare][1], times[traced][1]))
    return {
        "ratio_median": statistics.median(c / b for b, c in wall),
        "ratio_cpu_median": statistics.median(c / b for b, c in cpu),
        "bare_ms_median": 1e3 * statistics.median(b for b, _ in wall),
        "capture_ms_median": 1e3 * statistics.median(c for _, c in wall),
        "pairs": len(wall),
        "goal": 1.10,
    }


def timed(fn, inputs, device: str) -> tuple[float, float]:
    """Wall and process CPU seconds. On a shared CPU machine with ``--threads 1``, CPU time is the
    steadier measure (time spent waiting for a core is left out)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn(inputs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def throughput(backbone, records, folder: Path, args: argparse.Namespace) -> dict:
    """(c): one end-to-end capture of ``n`` images into a fresh store (the model is warm)."""
    with tempfile.TemporaryDirectory(prefix="store-") as store:
        report = capture(backbone, records, folder, per_token=args.per_token, batch_size=args.batch_size,
                         shard_rows=args.shard_rows, progress=False, store=store)
    return {
        "images": report.rows_captured,
        "end_to_end_img_s": report.images_per_s,
        "capture_forward_img_s": report.forward_images_per_s,
        "shards": len(report.shards_written),
    }


def rss(manifest: Path, args: argparse.Namespace) -> dict:
    """(b): peak RSS of a whole capture of N and of 4N images, each in its own process."""
    peaks = {}
    for rows in (args.n, 4 * args.n):
        cmd = [sys.executable, __file__, "--rss-child", str(manifest), "--rows", str(rows), *child_args(args)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        peaks[rows] = json.loads(out.strip().splitlines()[-1])
    small, large = peaks[args.n], peaks[4 * args.n]
    return {
        "n": args.n,
        "peak_rss_mb_n": small["peak_rss_mb"],
        "peak_rss_mb_4n": large["peak_rss_mb"],
        "ratio": large["peak_rss_mb"] / small["peak_rss_mb"],
        "process_peak_mb_n": small["process_peak_mb"],
        "process_peak_mb_4n": large["process_peak_mb"],
        "process_ratio": large["process_peak_mb"] / small["process_peak_mb"],
        "growth_mb_n": small["peak_rss_mb"] - small["base_rss_mb"],
        "growth_mb_4n": large["peak_rss_mb"] - large["base_rss_mb"],
        "peak_reset": small["peak_reset"] and large["peak_reset"],
        "stored_mb_4n": large["stored_mb"],  # what RSS would grow by if rows were kept in memory
        "shards_4n": large["shards"],
        "gpu_peak_mb_4n": large["gpu_peak_mb"],
        "goal": 1.1,
    }


def child_args(args: argparse.Namespace) -> list[str]:
    out = ["--model", args.model, "--device", args.device, "--dtype", args.dtype, "--attn", args.attn,
           "--image-size", str(args.image_size), "--batch-size", str(args.batch_size)]
    if args.image_pixels:
        out += ["--image-pixels", str(args.image_pixels)]
    if args.threads:
        out += ["--threads", str(args.threads)]
    for option in args.option:
        out += ["--option", option]
    return out


def rss_child(args: argparse.Namespace) -> dict:
    manifest = Path(args.rss_child)
    records = read_manifest(manifest)[: args.rows]
    backbone = load(args)
    backbone.weights_fingerprint()  # hashing the weights is not capture's memory
    reset = reset_peak_rss()
    base = status_mb("VmRSS")
    with tempfile.TemporaryDirectory(prefix="store-") as store:
        report = capture(backbone, records, manifest.parent, per_token=True, batch_size=args.batch_size,
                         shard_rows=args.rss_shard_rows, progress=False, store=store, merge=False)
        stored = sum(f.stat().st_size for f in Path(store).rglob("*.npy"))
    return {
        "rows": report.rows_captured,
        "base_rss_mb": base,
        "peak_rss_mb": status_mb("VmHWM"),  # the capture's peak when the reset worked, else the process's
        "peak_reset": reset,
        "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "stored_mb": stored / 2**20,
        "shards": len(report.shards_written),
        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None,
    }


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs``), so that VmHWM then measures what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def print_summary(result: dict) -> None:
    s, o, t, r = result["settings"], result["overhead"], result["throughput"], result["rss"]
    print(f"model {s['model']} ({s['family']}, {s['layers']} layers x {s['hidden']}), {s['device']} {s['gpu'] or ''}"
          f" {s['dtype']} {s['attn']}, {s['image_size']} px -> {s['image_tokens']} image tokens, seq {s['seq_len']},"
          f" batch {s['batch_size']}, positions {s['positions']}, threads {s['threads']}")
    print(f"(a) capture / bare forward, median of {o['pairs']} paired batches: wall {o['ratio_median']:.3f}, "
          f"CPU time {o['ratio_cpu_median']:.3f} (goal <= {o['goal']}); bare {o['bare_ms_median']:.1f} ms, "
          f"capture {o['capture_ms_median']:.1f} ms per batch")
    print(f"(b) peak RSS 4N / N during capture: {r['ratio']:.3f}, whole process: {r['process_ratio']:.3f} (goal <= "
          f"{r['goal']}); N = {r['n']}: {r['peak_rss_mb_n']:.0f} MB (+{r['growth_mb_n']:.1f} MB over the loaded "
          f"model), 4N: {r['peak_rss_mb_4n']:.0f} MB (+{r['growth_mb_4n']:.1f} MB); 4N stored "
          f"{r['stored_mb_4n']:.1f} MB per token in {r['shards_4n']} shards")
    bare_img_s = s["batch_size"] / (o["bare_ms_median"] / 1e3)
    print(f"(c) img/s: bare forward {bare_img_s:.1f}, capture forward {t['capture_forward_img_s']:.1f}, "
          f"end to end {t['end_to_end_img_s']:.1f} ({t['images']} images)")


if __name__ == "__main__":
    main()
