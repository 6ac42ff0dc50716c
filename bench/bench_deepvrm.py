"""Benchmark Deep-VRM: its forward against the base forward, and training throughput.

(a) Deep-VRM forward / base forward on the same batch (prefill, no KV cache), beside the vision encoder's
    share of the base forward: the low-level stream is one more vision pass, so the ratio should be
    about 1 + vision share;
(b) training throughput, samples/s: forward + backward + AdamW step of stage 1 (LoRA on the base decoder),
    stage 2 (Deep-VRM, LoRA on the low-level encoder and layers >= K) and naive (decoder in full), on the
    same batch; images are loaded and processed once, so this is the model's rate, not the data pipeline's.

Ratios are measured in one run, interleaving the models batch by batch, so machine load cancels.

    python bench/bench_deepvrm.py                                   # tiny random Qwen2.5-VL, CPU
    python bench/bench_deepvrm.py --model mini-vl --low-level full  # the embedded default
    python bench/bench_deepvrm.py --model /models/Qwen2.5-VL-7B-Instruct --device cuda --dtype bfloat16 \\
        --image-pixels 262144 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from injection import DeepVRMForConditionalGeneration  # noqa: E402
from injection.peft_targets import apply_stage  # noqa: E402
from injection.train import TrainConfig, default_injection_layer, load_model, param_groups  # noqa: E402
from probes.backbones.base import LoadSettings  # noqa: E402
from probes.data.manifest import DEFAULT_PROMPT  # noqa: E402


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = LoadSettings(args.dtype, args.attn, args.device)
    base = load_model(args.model, settings, image_pixels=args.image_pixels)
    k = args.injection_layer or default_injection_layer(base.num_layers)
    deep = DeepVRMForConditionalGeneration.from_backbone(base.model, injection_layer=k).eval()
    batch = make_batch(base, args)
    result = {"settings": describe(args, base, batch, k)}
    result["forward"] = forward_ratio(base, deep, batch, args)
    result["training"] = training_throughput(base, deep, batch, args)
    print_summary(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-qwen2.5-vl", help="built-in name or model folder (a base model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--image-size", type=int, default=128, help="side of the square test images, px")
    p.add_argument("--image-pixels", type=int, default=None, help="Qwen folders: processor pixel budget")
    p.add_argument("--injection-layer", type=int, default=None, help="K (default: 16/28 of the layers)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10, help="timed forwards per model in (a)")
    p.add_argument("--train-steps", type=int, default=5, help="timed training steps per stage in (b)")
    p.add_argument("--low-level", default="lora", choices=["lora", "full"],
                   help="stage 2: LoRA on the low-level encoder (official) or full fine-tuning (mini-VL's default)")
    p.add_argument("--conv", default="none", choices=["none", "pointwise", "all"],
                   help="stage 2: LoRA on the low-level encoder's convolutions too")
    p.add_argument("--stages", default="1,2,naive",
                   help="stages timed in (b), comma-separated (naive fine-tunes the whole decoder: leave it out "
                        "where its optimiser state does not fit)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def make_batch(adapter, args: argparse.Namespace):
    """A batch of random images with the official prompt and alternating real/fake answers (labels set)."""
    rng = np.random.default_rng(0)
    size = args.image_size
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(args.batch_size)]
    answers = ["real" if i % 2 else "fake" for i in range(args.batch_size)]
    return adapter.build_inputs(images, [DEFAULT_PROMPT] * args.batch_size, answers).to(args.device)


def describe(args: argparse.Namespace, adapter, batch, k: int) -> dict:
    return {
        "model": args.model, "family": adapter.family, "layers": adapter.num_layers, "hidden": adapter.hidden_size,
        "injection_layer": k, "low_level": args.low_level, "conv": args.conv, "device": args.device, "dtype": args.dtype, "attn": args.attn,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "batch_size": args.batch_size, "seq_len": int(batch["input_ids"].shape[1]),
        "image_tokens": int(adapter.image_token_mask(batch["input_ids"]).sum()), "threads": torch.get_num_threads(),
    }


def timed(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def forward_ratio(adapter, deep, batch, args: argparse.Namespace) -> dict:
    """(a): base forward, vision encoder alone, Deep-VRM forward, interleaved per round."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def base_fwd():
        adapter.model(**inputs, use_cache=False)

    def vision_fwd():
        adapter.vision(inputs["pixel_values"].type(adapter.model.dtype), grid_thw=inputs["image_grid_thw"])

    def deep_fwd():
        deep(**inputs, use_cache=False)

    runs = {"base": base_fwd, "vision": vision_fwd, "deep_vrm": deep_fwd}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(args.rounds):
            for name, fn in runs.items():
                times[name].append(timed(fn, args.device))
    base, vision, dvrm = (np.array(times[n]) for n in ("base", "vision", "deep_vrm"))
    return {
        "base_ms_median": 1e3 * statistics.median(base),
        "vision_ms_median": 1e3 * statistics.median(vision),
        "deep_vrm_ms_median": 1e3 * statistics.median(dvrm),
        "ratio_median": float(np.median(dvrm / base)),
        "vision_share_of_base": float(np.median(vision / base)),
        "expected_ratio": 1 + float(np.median(vision / base)),
        "rounds": args.rounds,
    }


def training_throughput(adapter, deep, batch, args: argparse.Namespace) -> dict:
    """(b): samples/s of a training step (forward, backward, AdamW step) of each stage on the same batch.

    One model is wrapped at a time and unwrapped after (``unload``), so no copy of the weights is made; the
    naive stage runs last because its steps change the base weights.
    """
    out = {}
    for stage in args.stages.split(","):
        if stage == "naive":
            model = adapter.model.requires_grad_(False)
            adapter.layers.requires_grad_(True)
        else:
            options = {"low_level": args.low_level, "conv": args.conv} if stage == "2" else {}
            model = apply_stage(adapter.model if stage == "1" else deep, int(stage), **options)
        out[f"stage_{stage}"] = train_steps(model, batch, TrainConfig(stage=stage), args)
        if stage != "naive":
            model.unload()
    if {"stage_1", "stage_2"} <= set(out):
        out["stage2_over_stage1_step_time"] = out["stage_2"]["step_ms_median"] / out["stage_1"]["step_ms_median"]
    return out


def train_steps(model, batch, config: TrainConfig, args: argparse.Namespace) -> dict:
    optimizer = torch.optim.AdamW(param_groups(model, config), betas=config.betas)
    model.train()

    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up: allocates the optimiser state
    seconds = [timed(step, args.device) for _ in range(args.train_steps)]
    model.eval()
    return {
        "samples_per_s": args.batch_size / statistics.median(seconds),
        "step_ms_median": 1e3 * statistics.median(seconds),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def print_summary(result: dict) -> None:
    s, f, t = result["settings"], result["forward"], result["training"]
    print(f"model {s['model']} ({s['family']}, {s['layers']} layers, K={s['injection_layer']}), batch {s['batch_size']}, "
          f"seq {s['seq_len']}, {s['device']} {s['dtype']}, {s['threads']} threads")
    print(f"(a) forward: base {f['base_ms_median']:.1f} ms, Deep-VRM {f['deep_vrm_ms_median']:.1f} ms -> "
          f"ratio {f['ratio_median']:.3f}; vision encoder {f['vision_ms_median']:.1f} ms = "
          f"{f['vision_share_of_base']:.3f} of the base forward (expected ratio ~{f['expected_ratio']:.3f})")
    for name, r in t.items():
        if isinstance(r, dict):
            print(f"(b) train {name}: {r['samples_per_s']:.2f} samples/s "
                  f"({r['step_ms_median']:.0f} ms/step, {r['trainable']:,} trainable)")


if __name__ == "__main__":
    main()
