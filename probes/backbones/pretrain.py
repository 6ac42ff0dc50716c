"""Pretraining of mini-VL: the projector and the text decoder learn to name what an image shows.

Only the semantic questions of forensic-mini's ``semantic.jsonl`` train split are used ("What is in this
image?" → object class, "What kind of scene is this?" → scene class); real/fake labels never are. The
tower is frozen, so its features are computed once and cached (safetensors, keyed by the data and the
tower settings); each step projects cached features and feeds them through ``mm_encoder_outputs``, which
gives the same numbers as the raw-pixel forward.

The run is deterministic (same config, data and thread count → same weights) and resumable: an atomic
checkpoint every ``checkpoint_every`` steps holds the trainable weights, their moving average, the
optimiser and the random state, and a killed run picks up from the last one.

>>> report = pretrain_mini_vl(PretrainConfig(), data_dir)     # → <cache>/backbones/mini-vl-<hash>/
>>> report["accuracy"]["object"], report["baselines"]
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers.modeling_outputs import BaseModelOutputWithPooling

from probes.backbones.base import LoadSettings
from probes.backbones.mini_vl import (
    MiniVLAdapter,
    build_mini_vl,
    class_token_ids,
    mini_vl_config,
    trained_dir,
)
from probes.backbones.processing import OBJECT_CLASSES, SCENE_CLASSES, SEMANTIC_PROMPTS
from probes.data.manifest import Record, read_manifest
from probes.errors import BadInputError, ConfigError
from probes.storage import (
    atomic_dir,
    atomic_path,
    cache_root,
    hash_bytes,
    hash_file,
    hash_json,
    hash_state_dict,
    library_versions,
    read_json,
    write_json,
)

OBJECT_PROMPT, SCENE_PROMPT = SEMANTIC_PROMPTS
QUESTIONS = {OBJECT_PROMPT: ("object", OBJECT_CLASSES), SCENE_PROMPT: ("scene", SCENE_CLASSES)}
HELD_OUT = ("val", "test")
_RUN_ONLY = ("checkpoint_every", "eval_every")  # fields that do not change the weights


@dataclass
class PretrainConfig:
    """Everything that decides the pretrained weights (architecture, optimisation, seed).

    ``checkpoint_every`` and ``eval_every`` only decide how often the run saves and measures; they are left
    out of :meth:`hash`.
    """

    # architecture (see mini_vl_config)
    image_size: int = 160
    token_grid: int = 4
    hidden: int = 128
    num_layers: int = 12
    merger_hidden: int = 512
    merger_dropout: float = 0.1
    # optimisation
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 30
    grad_clip: float = 1.0
    hflip: bool = True  # mirror the token grid of half the rows (see augment)
    ema_decay: float = 0.995  # the saved weights are an exponential moving average (0: the last step's)
    seed: int = 0
    # bookkeeping
    checkpoint_every: int = 100
    eval_every: int = 200

    def __post_init__(self):
        self.betas = tuple(self.betas)
        for name in ("epochs", "batch_size", "checkpoint_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}", "must be at least 1")
        if not 0 < self.lr < 1:
            raise ConfigError(f"lr={self.lr}", "must be in (0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay={self.ema_decay}", "must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"pretrain config keys {unknown}", f"unknown; known: {sorted(known)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> PretrainConfig:
        if not Path(path).is_file():
            raise BadInputError(path, "no such pretrain config file")
        return cls.from_dict(read_json(path))

    def hash(self) -> str:
        """Provenance hash of the fields that change the weights."""
        return hash_json({k: v for k, v in self.to_dict().items() if k not in _RUN_ONLY})

    def model_config(self):
        return mini_vl_config(
            hidden=self.hidden,
            num_layers=self.num_layers,
            image_size=self.image_size,
            token_grid=self.token_grid,
            merger_hidden=self.merger_hidden,
            merger_dropout=self.merger_dropout,
        )


# --- data --------------------------------------------------------------------------------------------


@dataclass
class SemanticData:
    """The rows of ``semantic.jsonl``, their images, and the tower features of those images."""

    root: Path
    records: list[Record]
    images: list[str]  # unique image paths, relative to root, in first-seen order
    image_index: np.ndarray  # [rows] row -> position in images
    data_hash: str

    @classmethod
    def read(cls, data_dir: str | Path) -> SemanticData:
        root = Path(data_dir)
        path = root / "semantic.jsonl"
        if not path.is_file():
            raise BadInputError(root, "no semantic.jsonl here; build the data set first")
        records = [r for r in read_manifest(path) if r.prompt in QUESTIONS and r.answer is not None]
        if not records:
            raise BadInputError(path, f"no rows ask one of {list(QUESTIONS)} with an answer")
        for r in records:
            words = QUESTIONS[r.prompt][1]
            if r.answer not in words:
                raise BadInputError(f"{path}:{r.id}", f"answer {r.answer!r} is not one of {words}")
        images = list(dict.fromkeys(r.images[0] for r in records))
        position = {p: i for i, p in enumerate(images)}
        missing = [p for p in images if not (root / p).is_file()]
        if missing:
            raise BadInputError(root / missing[0], f"image missing ({len(missing)} of {len(images)} are)")
        files = {p: hash_file(root / p) for p in images}
        data_hash = hash_json({"semantic": hash_bytes(path.read_bytes()), "images": files})
        index = np.array([position[r.images[0]] for r in records])
        return cls(root, records, images, index, data_hash)

    def rows(self, splits: Sequence[str], prompt: str | None = None) -> np.ndarray:
        return np.array([i for i, r in enumerate(self.records)
                         if r.split in splits and (prompt is None or r.prompt == prompt)], dtype=np.int64)


def tower_features(adapter: MiniVLAdapter, data: SemanticData, batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """Frozen-tower features of every image, ``[n_images, g·g, 1280]`` float16, from the cache or computed.

    The cache key covers the data hash, the tower weights and every processor setting, so a change of any
    of them computes anew.
    """
    vision = adapter.model.vision
    key = hash_json({
        "data": data.data_hash,
        "tower": hash_state_dict(vision.tower.state_dict()),
        "processor": adapter.processor_settings(),
        "grid": vision.config.token_grid,
    })
    path = cache_root() / "features" / f"mini-vl-tower-{key}.safetensors"
    if path.is_file():
        return load_file(path)["features"]
    ip = adapter.processor.image_processor
    # channels-last and small batches run the CPU convolutions 1.5-2x faster, with the same numbers
    fast = copy.deepcopy(vision).to(memory_format=torch.channels_last)
    out = []
    with torch.no_grad():
        for i in tqdm(range(0, len(data.images), batch_size), desc="tower features", disable=not progress):
            images = [Image.open(data.root / p) for p in data.images[i : i + batch_size]]
            pixels = ip(images, return_tensors="pt")["pixel_values"].to(vision.dtype)
            out.append(fast.tower_features(pixels.contiguous(memory_format=torch.channels_last)).half())
    features = torch.cat(out)
    with atomic_path(path) as tmp:
        save_file({"features": features}, str(tmp), metadata={"key": key, "images": json.dumps(data.images)})
    return features


def feature_statistics(features: torch.Tensor, image_rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation over every token of the given images (the train split)."""
    x = features[torch.as_tensor(np.unique(image_rows))].float().flatten(0, 1)
    return x.mean(0), x.std(0).clamp_min(1e-3)


# --- token rows --------------------------------------------------------------------------------------


@dataclass
class TokenRows:
    """Pre-tokenised rows: each row's ids (unpadded) and labels, batched with left padding."""

    ids: list[torch.Tensor]
    labels: list[torch.Tensor]
    grid: torch.Tensor  # [3] the image_grid_thw of one image
    image_token_id: int
    pad_id: int

    @classmethod
    def build(cls, adapter: MiniVLAdapter, records: Sequence[Record]) -> TokenRows:
        """One processor call per distinct (prompt, answer): every row of that pair has the same tokens."""
        size = adapter.processor.image_processor.size["height"]
        blank = Image.new("RGB", (size, size))
        cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for r in records:
            if (r.prompt, r.answer) not in cache:
                b = adapter.build_inputs([blank], [r.prompt], [r.answer])
                keep = b["attention_mask"][0].bool()
                cache[r.prompt, r.answer] = (b["input_ids"][0][keep], b["labels"][0][keep])
        ids = [cache[r.prompt, r.answer][0] for r in records]
        labels = [cache[r.prompt, r.answer][1] for r in records]
        grid = b["image_grid_thw"][0]
        return cls(ids, labels, grid, adapter.image_token_id, adapter.processor.tokenizer.pad_token_id)

    def batch(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        width = max(len(self.ids[i]) for i in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(rows):
            n = len(self.ids[i])
            ids[j, width - n :] = self.ids[i]
            labels[j, width - n :] = self.labels[i]
            mask[j, width - n :] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "mm_token_type_ids": (ids == self.image_token_id).long(),
            "image_grid_thw": self.grid.repeat(len(rows), 1),
            "labels": labels,
        }


def forward_cached(model, batch: dict[str, torch.Tensor], features: torch.Tensor):
    """The model's forward on cached tower features ``[B, g·g, 1280]`` instead of pixels."""
    tokens = model.vision.merge(features).flatten(0, 1)
    encoded = {"image": BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=(tokens,))}
    return model(**batch, mm_encoder_outputs=encoded)


# --- training ----------------------------------------------------------------------------------------


def learning_rate(config: PretrainConfig, step: int, total: int) -> float:
    """Linear warm-up, then cosine decay to zero at ``total``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_order(config: PretrainConfig, epoch: int, n: int) -> torch.Tensor:
    """Row order of an epoch: a function of (seed, epoch) alone, so a resumed run sees the same batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))


def augment(config: PretrainConfig, step: int, features: torch.Tensor) -> torch.Tensor:
    """Training view of cached features ``[B, g·g, C]``: with ``hflip``, half the rows (drawn from
    (seed, step) alone) get their token grid mirrored left-right."""
    if not config.hflip:
        return features
    gen = torch.Generator().manual_seed(config.seed * 100_003 + 7 + step)
    b, t, c = features.shape
    g = math.isqrt(t)
    grid = features.view(b, g, g, c)
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], grid.flip(2), grid).reshape(b, t, c)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("model.visual.tower.")}


class WeightAverage:
    """Exponential moving average of the trainable parameters, with the usual warm-up of the decay."""

    def __init__(self, model, decay: float):
        self.decay = decay
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.average = {n: p.detach().clone() for n, p in self.params.items()}

    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for n, p in self.params.items():
                self.average[n].mul_(d).add_(p.detach(), alpha=1 - d)

    @contextlib.contextmanager
    def applied(self):
        """The model with the averaged weights inside the block, its own weights after."""
        live = {n: p.detach().clone() for n, p in self.params.items()}
        self.copy_into_model(self.average)
        try:
            yield
        finally:
            self.copy_into_model(live)

    def copy_into_model(self, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(weights[n])


def save_checkpoint(path: Path, model, optimizer, average: WeightAverage | None, step: int, history: list[dict]) -> None:
    state = {
        "step": step,
        "model": trainable_state(model),
        "average": average.average if average else {},
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "history": json.dumps(history),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, model, optimizer, average: WeightAverage | None) -> tuple[int, list[dict]]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    if average:
        average.average = state["average"]
    torch.set_rng_state(state["rng"])
    return int(state["step"]), json.loads(state["history"])


def pretrain_mini_vl(
    config: PretrainConfig | None = None,
    data_dir: str | Path | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Pretrain mini-VL on ``data_dir/semantic.jsonl`` and save it to ``out`` (default
    ``<cache>/backbones/mini-vl-<config hash>``): weights (safetensors), config, processor, ``pretrain.json``.

    A finished folder made from the same config and data is returned as it is. ``stop_after`` leaves the run
    after that many steps, as a kill would (its checkpoint stays for the next call to resume from);
    the return value is then ``{"stopped_at": step}``. Times in the report are those of the last call.
    """
    config = config or PretrainConfig()
    if data_dir is None:
        raise ConfigError("data_dir=None", "pass the forensic-mini folder (it holds semantic.jsonl)")
    out = Path(out) if out is not None else trained_dir(config)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    data = SemanticData.read(data_dir)
    done = _finished_report(out, config, data.data_hash)
    if done is not None:
        return done
    train_rows = data.rows(("train",))
    if len(train_rows) == 0:
        raise BadInputError(data.root / "semantic.jsonl", "no train rows")
    work = _work_folder(out, config, data.data_hash)

    adapter = build_mini_vl(config.model_config(), seed=config.seed, settings=LoadSettings())
    t0 = time.perf_counter()
    features = tower_features(adapter, data, progress=progress)
    seconds = {"features": time.perf_counter() - t0}
    mean, std = feature_statistics(features, data.image_index[train_rows])
    adapter.model.vision.feature_mean.copy_(mean)
    adapter.model.vision.feature_std.copy_(std)

    t0 = time.perf_counter()
    run = _train(adapter, config, data, features, train_rows, work / "state.pt", progress, stop_after)
    if "stopped_at" in run:
        return run
    seconds["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scores = evaluate(adapter, data, progress=progress)
    baselines = linear_baselines(data, features)
    seconds["eval"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    seconds["cpu_total"] = time.process_time() - cpu_start  # all threads; wall time on a shared machine is longer
    report = {
        "path": str(out),
        "config": config.to_dict(),
        "config_hash": config.hash(),
        "data": {"dir": str(data.root), "hash": data.data_hash, "rows": len(data.records),
                 "images": len(data.images), "train_rows": len(train_rows)},
        **run,
        "accuracy": scores,
        "baselines": baselines,
        "bar": bar_check(scores["object"], baselines),
        "parameters": parameter_counts(adapter.model),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "threads": torch.get_num_threads(),
        "library_versions": library_versions(),
        "weights": adapter.weights_fingerprint(),
    }
    with atomic_dir(out) as tmp:
        adapter.model.save_pretrained(tmp)
        adapter.processor.save_pretrained(tmp)
        write_json(tmp / "pretrain.json", report)
    shutil.rmtree(work)
    return report


def _work_folder(out: Path, config: PretrainConfig, data_hash: str) -> Path:
    """``.<out>.work/`` beside ``out``; a checkpoint left there by another config or data is dropped."""
    work = out.parent / f".{out.name}.work"
    run = {"config": config.hash(), "data": data_hash}
    if (work / "run.json").is_file() and read_json(work / "run.json") != run:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "run.json", run)
    return work


def _train(adapter: MiniVLAdapter, config: PretrainConfig, data: SemanticData, features: torch.Tensor,
           train_rows: np.ndarray, state_path: Path, progress: bool, stop_after: int | None) -> dict[str, Any]:
    """The training loop, from the checkpoint at ``state_path`` if there is one: ``{"steps", "history"}``."""
    model = adapter.model
    tokens = TokenRows.build(adapter, data.records)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_rows) / config.batch_size)
    total = config.epochs * steps_per_epoch
    average = WeightAverage(model, config.ema_decay) if config.ema_decay > 0 else None
    step, history = 0, []
    initial_embeddings = model.get_input_embeddings().weight.detach().clone()
    if state_path.is_file():
        step, history = load_checkpoint(state_path, model, optimizer, average)
    else:
        torch.manual_seed(config.seed)  # dropout
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc="pretrain mini-VL", disable=not progress)
    while step < total:
        if stop_after is not None and step >= stop_after:
            bar.close()
            return {"stopped_at": step}
        epoch, offset = divmod(step, steps_per_epoch)
        order = train_rows[epoch_order(config, epoch, len(train_rows)).numpy()]
        rows = order[offset * config.batch_size : (offset + 1) * config.batch_size]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step, total)
        feats = features[torch.as_tensor(data.image_index[rows])].float()
        feats = augment(config, step, feats)
        loss = forward_cached(model, tokens.batch(rows), feats).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        if average:
            average.update(step)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % config.eval_every == 0 or step == total:
            entry = {"step": step, "loss": round(loss.item(), 4), "seconds": round(time.perf_counter() - t0, 1)}
            with average.applied() if average else contextlib.nullcontext():
                history.append({**entry, **_cached_accuracy(adapter, data, tokens, features)})
            model.train()
        if step % config.checkpoint_every == 0 and step < total:
            save_checkpoint(state_path, model, optimizer, average, step, history)
    bar.close()
    if average:
        average.copy_into_model(average.average)
    restored = restore_unseen_rows(model, initial_embeddings, tokens, train_rows)
    model.eval()
    return {"steps": total, "history": history, "embedding_rows_restored": restored}


def restore_unseen_rows(model, initial: torch.Tensor, tokens: TokenRows, train_rows: np.ndarray) -> int:
    """Put back the initial (tied) embedding rows of the tokens no training row contains.

    Through the tied output head every step pushes all unseen words' logits down along the same
    directions, so words such as ``real`` and ``fake`` leave pretraining as near-copies of each other; a
    later fine-tune would then start from two indistinguishable answers. Returns the number of rows restored.
    """
    seen = torch.zeros(initial.shape[0], dtype=torch.bool)
    for i in train_rows:
        seen[tokens.ids[i]] = True
    unseen = ~seen
    with torch.no_grad():
        model.get_input_embeddings().weight[unseen] = initial[unseen].to(model.get_input_embeddings().weight.dtype)
    return int(unseen.sum())


def _finished_report(out: Path, config: PretrainConfig, data_hash: str) -> dict[str, Any] | None:
    report = out / "pretrain.json"
    if not report.is_file():
        return None
    done = read_json(report)
    same = done.get("config_hash") == config.hash() and done.get("data", {}).get("hash") == data_hash
    return done if same else None


# --- evaluation --------------------------------------------------------------------------------------


def _cached_accuracy(adapter: MiniVLAdapter, data: SemanticData, tokens: TokenRows, features: torch.Tensor,
                     batch_size: int = 128) -> dict[str, float]:
    """Held-out accuracy per question on cached features: argmax over the class words at the answer position."""
    adapter.model.eval()
    out = {}
    for prompt, (name, words) in QUESTIONS.items():
        rows = data.rows(HELD_OUT, prompt)
        if len(rows) == 0:
            continue
        ids = torch.tensor(class_token_ids(adapter.processor.tokenizer, words))
        gold = torch.tensor([words.index(data.records[i].answer) for i in rows])
        pred = []
        with torch.no_grad():
            for i in range(0, len(rows), batch_size):
                chunk = rows[i : i + batch_size]
                batch = tokens.batch(chunk)
                # the answer's first token is predicted at the position before it
                at = (batch["labels"] != -100).long().argmax(1) - 1
                feats = features[torch.as_tensor(data.image_index[chunk])].float()
                logits = forward_cached(adapter.model, batch, feats).logits
                pred.append(logits[torch.arange(len(chunk)), at][:, ids].argmax(-1))
        out[f"heldout_{name}"] = round(float((torch.cat(pred) == gold).float().mean()), 4)
    return out


def evaluate(adapter: MiniVLAdapter, data: SemanticData, batch_size: int = 64, progress: bool = True) -> dict[str, Any]:
    """Held-out accuracy per question through the full raw-pixel forward.

    The answer is the argmax over the question's class words at the answer position; ``*_generate_agrees``
    is the share of rows where greedy ``generate`` emits that same word.
    """
    model, tok = adapter.model, adapter.processor.tokenizer
    out: dict[str, Any] = {}
    for prompt, (name, words) in QUESTIONS.items():
        rows = data.rows(HELD_OUT, prompt)
        if len(rows) == 0:
            continue
        ids = torch.tensor(class_token_ids(tok, words))
        gold = torch.tensor([words.index(data.records[i].answer) for i in rows])
        pred, agree = [], []
        chunks = range(0, len(rows), batch_size)
        for i in tqdm(chunks, desc=f"evaluate ({name})", disable=not progress):
            chunk = rows[i : i + batch_size]
            images = [Image.open(data.root / data.records[j].images[0]) for j in chunk]
            inputs = adapter.build_inputs(images, [prompt] * len(chunk))
            with torch.no_grad():  # one pass: greedy generation returns the logits it chose from
                gen = model.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True,
                                     output_logits=True)
            choice = ids[gen.logits[0][:, ids].argmax(-1)]
            pred.append(choice)
            agree.append(gen.sequences[:, -1] == choice)
        pred = torch.cat(pred)
        out[name] = round(float((pred == ids[gold]).float().mean()), 4)
        out[f"{name}_rows"] = len(rows)
        out[f"{name}_generate_agrees"] = round(float(torch.cat(agree).float().mean()), 4)
    return out


def colour_histograms(root: Path, images: Sequence[str], bins: int = 4) -> np.ndarray:
    """Joint RGB histograms with ``bins`` levels per channel (64 bins by default), normalised to sum 1."""
    out = np.zeros((len(images), bins**3))
    for i, p in enumerate(images):
        x = np.asarray(Image.open(root / p).convert("RGB"), dtype=np.int64) * bins // 256
        code = (x[..., 0] * bins + x[..., 1]) * bins + x[..., 2]
        out[i] = np.bincount(code.ravel(), minlength=bins**3) / code.size
    return out


def logistic_accuracy(x_train, y_train, x_test, y_test, Cs: Sequence[float] = (0.01, 0.1, 1.0)) -> float:
    """Held-out accuracy of a standardised L2 logistic regression, at its best ``C`` on the held-out rows
    (a generous reference: the bar is relative to it)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = []
    for C in Cs:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000)).fit(x_train, y_train)
        scores.append(clf.score(x_test, y_test))
    return round(float(max(scores)), 4)


def linear_baselines(data: SemanticData, features: torch.Tensor) -> dict[str, Any]:
    """The two references of the bar, on the object question, same train and held-out rows as the model.

    ``efficientnet_linear_probe``: the tower's 1280-d features averaged over the token grid.
    ``colour_histogram``: a 64-bin joint RGB histogram.
    """
    train, held = data.rows(("train",), OBJECT_PROMPT), data.rows(HELD_OUT, OBJECT_PROMPT)
    if len(train) == 0 or len(held) == 0:
        return {}
    y = np.array([r.answer for r in data.records])
    pooled = features.float().mean(1).numpy()[data.image_index]
    hist = colour_histograms(data.root, data.images)[data.image_index]
    values, counts = np.unique(y[train], return_counts=True)
    return {
        "efficientnet_linear_probe": logistic_accuracy(pooled[train], y[train], pooled[held], y[held]),
        "colour_histogram": logistic_accuracy(hist[train], y[train], hist[held], y[held]),
        "majority_class": round(float((y[held] == values[counts.argmax()]).mean()), 4),
    }


def bar_check(object_accuracy: float, baselines: dict[str, Any]) -> dict[str, Any]:
    """The bar: ≥ 70 % of the EfficientNet linear probe and ≥ 2× the colour histogram."""
    if not baselines:
        return {"passes": None, "reason": "no object rows in train or held-out"}
    probe, hist = baselines["efficientnet_linear_probe"], baselines["colour_histogram"]
    ratio_probe = object_accuracy / probe if probe else math.inf
    ratio_hist = object_accuracy / hist if hist else math.inf
    return {
        "ratio_to_probe": round(ratio_probe, 3),
        "ratio_to_histogram": round(ratio_hist, 3),
        "passes": ratio_probe >= 0.7 and ratio_hist >= 2.0,
    }


def parameter_counts(model) -> dict[str, int]:
    vision = model.vision
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    total = count(model)
    return {
        "total": total,
        "tower_frozen": count(vision.tower),
        "merger": count(vision.merger),
        "decoder": count(model.model.language_model),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
