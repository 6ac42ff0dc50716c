"""Capture decoder hidden states with nnsight into the activation store (:mod:`probes.cache`).

Per row, ``L + 1`` raw residual-stream states of the language model, none after the final norm:

- index 0: the input of the first decoder layer, i.e. the token embeddings with the vision features
  scattered in at the image-token positions (nnterp's ``layers[0].input[mask] == image_features``);
- index i (1..L): the output of decoder layer i.

HF's ``output_hidden_states`` gives the same states except the last one, which is after the final norm.

Positions (declared in the provenance, as every probe result must):

- ``image_mean``: mean over the image-token positions (``input_ids == image_token_id``), in fp32;
- ``last``: the last position, which under the adapter's left padding is each row's last real token;
- ``image_tokens`` (``per_token=True``): every image token, in image-token order; every row must have
  the same number of image tokens (fix the processor's pixel budget).

Per batch: one processor call (``backbone.build_inputs``) and one traced forward. Positions are pooled
inside the trace, so at most one layer's full hidden states ``[B, T, D]`` are alive at a time, and the
trace stops after the last stored layer (the final norm and the unembedding never run). Rows go to
shards of about ``SHARD_BYTES``, so memory stays flat however many rows there are.

>>> report = capture(load_backbone("tiny-qwen2.5-vl"), read_manifest(path), path.parent)
>>> ids, x = ActivationStore.open(report.store).load("image_mean")  # [N, L + 1, hidden]
"""

from __future__ import annotations

import inspect
import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from queue import Full, Queue
from typing import Any, TypeVar

import numpy as np
import torch
from nnsight import NNsight
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm
from transformers import BatchFeature

from probes.backbones.base import DTYPES, BackboneAdapter
from probes.cache import POSITIONS, STORE_DTYPES, ActivationStore, ShardWriter
from probes.data.images import open_image, to_rgb
from probes.data.manifest import IMAGE_TAG, Record, dumps_manifest
from probes.errors import BadInputError, ConfigError, ErrorLog, LensError, OnError
from probes.storage import hash_bytes, hash_json, library_versions

DEFAULT_POSITIONS = ("image_mean", "last")
SHARD_BYTES = 64 << 20  # sets rows per shard: the memory a capture holds, and the most a kill can lose
LAYER_INDEX = (
    "0 = input of decoder layer 1 (token embeddings with the vision features scattered in); "
    "i = output of decoder layer i; raw residual stream, no final norm"
)
POSITION_MEANING = {
    "image_mean": "mean over positions where input_ids == image_token_id, accumulated in fp32",
    "last": "last position of the left-padded sequence (each row's last real token)",
    "image_tokens": "every position where input_ids == image_token_id, in image-token order",
}
_FP16_MAX = 65504.0
_END = object()  # marks the end of a prefetched stream
T = TypeVar("T")


@dataclass
class CaptureReport:
    """What one :func:`capture` call did. JSON-able (:meth:`to_json`)."""

    store: str
    key: str
    positions: list[str]
    layers: list[int]
    rank: int
    world_size: int
    rows_planned: int  # rows of the whole store (all ranks)
    rows_captured: int  # rows this call computed and wrote
    rows_in_store: int
    complete: bool
    shards_reused: int  # shards already committed before this call, not recomputed
    shards_written: list[str]
    shards: list[str]  # what the store holds now (one ``merged-NNN`` once merged)
    skipped: list[dict[str, str]]  # this call's skipped rows: {"item", "reason"}
    seconds: float  # the whole call
    forward_seconds: float  # traced forwards, pooling and the copy to host
    images_per_s: float  # rows / (loading + preprocessing + forward + writing)
    forward_images_per_s: float  # rows / forward_seconds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def capture(
    backbone: BackboneAdapter,
    records: Sequence[Record],
    root_dir: str | Path,
    *,
    positions: Sequence[str] = DEFAULT_POSITIONS,
    per_token: bool = False,
    layers: Sequence[int] | None = None,
    prompt: str | None = None,
    batch_size: int = 8,
    store_dtype: str = "float16",
    on_error: OnError = "stop",
    progress: bool = True,
    store: str | Path | None = None,
    shard_rows: int | None = None,
    merge: bool = True,
    prefetch: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> CaptureReport:
    """Capture ``records`` (image paths relative to ``root_dir``) into their activation store; resume.

    Args:
        positions: stored positions, from ``POSITIONS``; ``per_token=True`` adds ``image_tokens``.
        layers: stored layer indices, 0..L (default all; see the module docstring).
        prompt: the user prompt for every row, with its ``<image>`` tag (default: each row's own).
        store_dtype: ``float16`` (half the disk; refuses values beyond fp16's range) or ``float32``.
        on_error: ``stop`` raises at the first bad row; ``skip`` lists it in the report and goes on.
        store: the store folder (default ``<cache>/activations/<key>``); an existing store of another
            provenance is refused with a :class:`ProvenanceError` naming the field.
        shard_rows: rows per shard (default: as many as fit in ``SHARD_BYTES``).
        merge: once the store is complete, rewrite it as one memory-mappable file per position.
        prefetch: prepare the next batch in a background thread (default: on when the model is not on
            the CPU, where preprocessing and the forward would compete for the same cores).
        rank, world_size: this process's slice of the rows (``records[rank::world_size]``); default
            from ``torch.distributed`` when initialised, else ``$RANK``/``$WORLD_SIZE``.

    Rows already in the store are not recomputed. Each rank writes its own shards; with
    ``torch.distributed`` initialised, rank 0 merges after a barrier.
    """
    started = time.perf_counter()
    positions = _positions(positions, per_token)
    layers = _layers(backbone, layers)
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}", "must be at least 1")
    if prompt is not None and prompt.count(IMAGE_TAG) != 1:
        raise ConfigError(f"prompt={prompt!r}", f"needs exactly one {IMAGE_TAG} tag, where the image goes")
    if store_dtype not in STORE_DTYPES:
        raise ConfigError(f"store_dtype={store_dtype}", f"choose from {STORE_DTYPES}")
    rank, world_size = _rank_world(rank, world_size)
    records = list(records)
    provenance = capture_provenance(
        backbone, records, positions=positions, layers=layers, store_dtype=store_dtype, prompt=prompt
    )
    act_store = ActivationStore.create(provenance, [r.id for r in records], path=store)
    done = set(act_store.ids)
    shards_reused = len(act_store.shard_names())
    todo = [r for r in records[rank::world_size] if r.id not in done]

    tokens = None  # image tokens per row, fixed by the store's first row when stored per token
    if "image_tokens" in positions:
        tokens = act_store.row_shape("image_tokens")[1] if done else 0
    if prefetch is None:
        prefetch = backbone.model.device.type != "cpu"
    errors = ErrorLog(on_error)
    desc = "capture" if world_size == 1 else f"capture rank {rank}"
    loop_started = time.perf_counter()
    with (
        closing(_ahead(_batches(backbone, todo, Path(root_dir), batch_size, prompt, tokens), prefetch)) as batches,
        tqdm(total=len(todo), unit="img", desc=desc, disable=not progress) as bar,
    ):
        tally = _stream(batches, LayerTracer(backbone, positions, layers, store_dtype), act_store.writer(rank),
                        _ShardBuffer(shard_rows, batch_size), errors, bar)
    loop_s = time.perf_counter() - loop_started
    _finish(act_store, rank, world_size, merge)
    return CaptureReport(
        store=str(act_store.path),
        key=act_store.key,
        positions=list(positions),
        layers=list(layers),
        rank=rank,
        world_size=world_size,
        rows_planned=len(records),
        rows_captured=tally.rows,
        rows_in_store=len(act_store.ids),
        complete=act_store.complete,
        shards_reused=shards_reused,
        shards_written=tally.shards,
        shards=act_store.shard_names(),
        skipped=errors.skipped,
        seconds=time.perf_counter() - started,
        forward_seconds=tally.forward_s,
        images_per_s=tally.rows / loop_s if tally.rows else 0.0,
        forward_images_per_s=tally.rows / tally.forward_s if tally.rows else 0.0,
    )


@dataclass
class _Tally:
    rows: int = 0
    forward_s: float = 0.0
    shards: list[str] = field(default_factory=list)


def _stream(
    batches: Iterator[_Batch], tracer: LayerTracer, writer: ShardWriter, buffer: _ShardBuffer, errors: ErrorLog, bar: tqdm
) -> _Tally:
    """Trace each batch and commit shards as they fill; however the loop ends, commit what is buffered."""
    tally = _Tally()
    skipped: dict[str, str] = {}  # id -> reason, for the store's index

    def commit() -> None:
        name = writer.commit(*buffer.take(), skipped)
        if name:
            tally.shards.append(name)

    try:
        for batch in batches:
            for record, err in batch.failures:
                errors.handle(err)  # raises under "stop"
                skipped[record.id] = err.reason
            bar.update(len(batch.failures))
            if not batch.rows:
                continue
            t0 = time.perf_counter()
            acts = tracer(batch.inputs)
            tally.forward_s += time.perf_counter() - t0
            ids = [r.id for r in batch.rows]
            if not buffer.fits(len(ids)):
                commit()
            buffer.add(ids, acts)
            tally.rows += len(ids)
            bar.update(len(ids))
    finally:
        commit()  # keep the rows already computed and the skips seen, whatever stopped the loop
    return tally


def capture_provenance(
    backbone: BackboneAdapter,
    records: Sequence[Record],
    *,
    positions: Sequence[str],
    layers: Sequence[int],
    store_dtype: str,
    prompt: str | None = None,
) -> dict[str, Any]:
    """The store's provenance. The key hashes ``probes.cache.KEY_FIELDS``; the rest is recorded only.

    The device enters as its type (``cuda``, not ``cuda:1``), so that the ranks of a multi-GPU capture
    share one store; the rows enter as a hash of each row's id, image path, image hash and prompt, so
    that editing labels or splits in the manifest does not invalidate the cache.
    """
    model = backbone.provenance()
    prompts = [prompt or r.prompt for r in records]
    distinct = sorted(set(prompts))
    return {
        "backbone": {
            "family": model["family"],
            "weights": model["weights"],
            "num_layers": model["num_layers"],
            "hidden_size": model["hidden_size"],
            "image_token_id": backbone.image_token_id,
            "processor_hash": model["processor_hash"],
            "dtype": model["dtype"],
            "attn_implementation": model["attn_implementation"],
            "device": torch.device(model["device"]).type,
        },
        "prompt": distinct[0] if len(distinct) == 1 else distinct,
        "positions": list(positions),
        "layers": list(layers),
        "store_dtype": store_dtype,
        "rows": hash_json([[r.id, r.images, r.sha256, p] for r, p in zip(records, prompts)]),
        # Recorded, not keyed.
        "source": model["source"],
        "processor": model["processor"],
        "manifest": hash_bytes(dumps_manifest(records).encode("utf-8")),
        "layer_index": LAYER_INDEX,
        "position_meaning": {p: POSITION_MEANING[p] for p in positions},
        "library_versions": library_versions(),
    }


def forward_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """Forward settings for capture (and for a bare forward to compare with): no KV cache, and
    logits for the last position only, where the model's forward takes them."""
    params = inspect.signature(model.forward).parameters
    wanted = {"use_cache": False, "logits_to_keep": 1}
    return {k: v for k, v in wanted.items() if k in params}


class LayerTracer:
    """One nnsight trace per batch; returns ``{position: array [B, len(layers), ...]}`` in ``store_dtype``
    on the host (``[B, len(layers), hidden]``, or ``[B, len(layers), n_image_tokens, hidden]``)."""

    def __init__(
        self, backbone: BackboneAdapter, positions: Sequence[str], layers: Sequence[int], store_dtype: str = "float16"
    ):
        self.backbone = backbone
        self.positions = tuple(positions)
        self.store_dtype = DTYPES[store_dtype]
        self.model = NNsight(backbone.model)
        decoder = _envoy(self.model, backbone.layers_path)
        self.first = decoder[0]
        self.read_input = 0 in layers
        self.outputs = [decoder[i - 1] for i in layers if i > 0]  # in execution order, as nnsight needs
        self.kwargs = forward_kwargs(backbone.model)

    def __call__(self, inputs: BatchFeature) -> dict[str, np.ndarray]:
        inputs = inputs.to(self.backbone.model.device)
        if not bool(inputs["attention_mask"][:, -1].all()):
            raise ConfigError("padding_side=right", "capture needs left padding: the last position must be real")
        pool = _Pooling(self.backbone.image_token_mask(inputs["input_ids"]), self.positions)
        with torch.inference_mode(), self.model.trace(**inputs, **self.kwargs) as tracer:
            if self.read_input:
                pool(self.first.input)
            for envoy in self.outputs:
                pool(envoy.output)  # a Tensor [B, T, D] in transformers 5, not a tuple
            tracer.stop()  # nothing after the last stored layer is needed
        return _to_host(pool.result(), self.store_dtype)


class _Pooling:
    """Reduces hidden states ``[B, T, D]``, layer after layer, to the stored positions.

    ``image_mean`` and ``last`` come from one batched product per layer with weights ``[B, P, T]`` (the
    mean over image tokens; a one-hot at the last position), accumulated in fp32. What is kept is always
    a new tensor, never a view, which would keep the layer's whole ``[B, T, D]`` alive.
    """

    def __init__(self, mask: Tensor, positions: tuple[str, ...]):
        self.mask = mask  # [B, T] bool
        self.pooled_names = [p for p in ("image_mean", "last") if p in positions]
        self.per_token = "image_tokens" in positions
        weights = []
        if "image_mean" in positions:
            weights.append(mask / mask.sum(1, keepdim=True).clamp(min=1))
        if "last" in positions:
            last = torch.zeros(mask.shape, device=mask.device)
            last[:, -1] = 1.0
            weights.append(last)
        self.weights = torch.stack(weights, 1).float() if weights else None  # [B, P, T]
        self.pooled: list[Tensor] = []  # per layer, [B, P, D]
        self.tokens: list[Tensor] = []  # per layer, [B, n, D]

    def __call__(self, h: Tensor) -> None:
        if self.weights is not None:
            self.pooled.append(torch.bmm(self.weights, h.float()))
        if self.per_token:
            self.tokens.append(h[self.mask].view(h.shape[0], -1, h.shape[-1]))

    def result(self) -> dict[str, Tensor]:
        """``{position: [B, layers, D]}``, and ``image_tokens``: ``[B, layers, n, D]``."""
        out = {}
        if self.pooled:
            pooled = torch.stack(self.pooled, 1)  # [B, layers, P, D]
            out.update((name, pooled[:, :, i]) for i, name in enumerate(self.pooled_names))
        if self.tokens:
            out["image_tokens"] = torch.stack(self.tokens, 1)
        return out


def _to_host(acts: dict[str, Tensor], dtype: torch.dtype) -> dict[str, np.ndarray]:
    """Cast on the device (less to copy), then to host numpy."""
    out = {}
    for position, t in acts.items():
        if dtype == torch.float16:
            peak = float(t.abs().amax()) if t.numel() else 0.0
            if peak > _FP16_MAX:
                raise ConfigError(
                    "store_dtype=float16", f"{position} reaches |x| = {peak:.4g}, beyond fp16; use float32"
                )
        out[position] = t.to(dtype).cpu().numpy()
    return out


class _ShardBuffer:
    """Rows waiting for the next shard, in arrays allocated once and filled in place.

    A commit writes views of them (no concatenation copy), so memory stays at one shard.
    """

    def __init__(self, rows: int | None, batch_size: int):
        self.rows = rows
        self.batch_size = batch_size
        self.ids: list[str] = []
        self.arrays: dict[str, np.ndarray] = {}

    def fits(self, n: int) -> bool:
        return not self.arrays or len(self.ids) + n <= len(next(iter(self.arrays.values())))

    def add(self, ids: list[str], acts: dict[str, np.ndarray]) -> None:
        if not self.arrays:
            per_row = sum(a[0].nbytes for a in acts.values())
            capacity = max(self.rows or SHARD_BYTES // per_row, self.batch_size)
            self.arrays = {p: np.empty((capacity, *a.shape[1:]), a.dtype) for p, a in acts.items()}
        n = len(self.ids)
        for position, a in acts.items():
            self.arrays[position][n : n + len(ids)] = a
        self.ids += ids

    def take(self) -> tuple[list[str], dict[str, np.ndarray]]:
        ids, self.ids = self.ids, []
        return ids, {p: a[: len(ids)] for p, a in self.arrays.items()}


# --- inputs ----------------------------------------------------------------------------------------


@dataclass
class _Batch:
    rows: list[Record]  # the rows that made it into ``inputs``
    inputs: BatchFeature | None
    failures: list[tuple[Record, LensError]]  # rows left out, with why


def _batches(
    backbone: BackboneAdapter,
    records: list[Record],
    root: Path,
    batch_size: int,
    prompt: str | None,
    tokens: int | None,
) -> Iterator[_Batch]:
    """Read, check and preprocess each batch of ``records``; rows that fail are handed back, not raised,
    so that the caller applies the ``on_error`` policy (in its own thread).

    ``tokens``: the image-token count every row must have (per-token capture): None = no check, 0 = the
    first row's count.
    """
    for start in range(0, len(records), batch_size):
        rows, images, failures = [], [], []
        for record in records[start : start + batch_size]:
            try:
                images.append(_read_image(record, root))
                rows.append(record)
            except BadInputError as err:
                failures.append((record, err))
        rows, images, inputs = _build(backbone, rows, images, prompt, root, failures)
        if tokens is not None and rows:
            counts = backbone.image_token_mask(inputs["input_ids"]).sum(1).tolist()
            tokens = tokens or counts[0]
            odd = {i for i, n in enumerate(counts) if n != tokens}
            failures += [(rows[i], BadInputError(
                _item(rows[i], root), f"{counts[i]} image tokens where the store has {tokens}; per-token capture "
                "needs one image size (resize the images or fix the processor's pixel budget)")) for i in sorted(odd)]
            if odd:
                keep = [i for i in range(len(rows)) if i not in odd]
                rows, images, inputs = _build(
                    backbone, [rows[i] for i in keep], [images[i] for i in keep], prompt, root, failures
                )
        yield _Batch(rows, inputs, failures)


def _build(
    backbone: BackboneAdapter,
    rows: list[Record],
    images: list[Image.Image],
    prompt: str | None,
    root: Path,
    failures: list[tuple[Record, LensError]],
) -> tuple[list[Record], list[Image.Image], BatchFeature | None]:
    """One processor call for the batch. If it fails, find the rows that fail alone, add them to
    ``failures``, and retry without them."""
    if not rows:
        return rows, images, None
    try:
        return rows, images, backbone.build_inputs(images, [prompt or r.prompt for r in rows])
    except (ValueError, TypeError, RuntimeError) as batch_err:
        bad = {}
        for i, (record, image) in enumerate(zip(rows, images)):
            try:
                backbone.build_inputs([image], [prompt or record.prompt])
            except (ValueError, TypeError, RuntimeError) as err:
                bad[i] = BadInputError(_item(record, root), f"preprocessing failed ({err})")
        if not bad:
            raise batch_err  # no row fails alone: not a row's fault
    failures += [(rows[i], err) for i, err in bad.items()]
    keep = [i for i in range(len(rows)) if i not in bad]
    return _build(backbone, [rows[i] for i in keep], [images[i] for i in keep], prompt, root, failures)


def _ahead(items: Iterator[T], enabled: bool) -> Iterator[T]:
    """Yield ``items``, preparing the next one in a background thread while the caller uses this one.

    On an accelerator this overlaps image decoding and preprocessing (CPU) with the forward (device).
    An exception in the producer is raised in the caller, in order.
    """
    if not enabled:
        yield from items
        return
    slot: Queue = Queue(maxsize=1)
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        while not stop.is_set():  # the consumer may have gone (an error there): then give up
            try:
                slot.put(entry, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except Exception as err:  # handed over, and raised in the consumer
            put((None, err))

    threading.Thread(target=produce, name="capture-prefetch", daemon=True).start()
    try:
        while True:
            item, err = slot.get()
            if err is not None:
                raise err
            if item is _END:
                return
            yield item
    finally:
        stop.set()


def _read_image(record: Record, root: Path) -> Image.Image:
    """The row's image, RGB, through the data layer's safe loader (one-line error naming the file)."""
    if len(record.images) != 1:
        raise BadInputError(f"row {record.id}", f"{len(record.images)} images; capture takes one image per row")
    path = record.image_path(root)
    try:
        image, _ = open_image(path)
        return to_rgb(image, path)
    except BadInputError as err:
        raise BadInputError(f"row {record.id}: {err.item}", err.reason) from None


def _item(record: Record, root: Path) -> str:
    return f"row {record.id}: {record.image_path(root)}"


# --- options ---------------------------------------------------------------------------------------


def _positions(positions: Sequence[str], per_token: bool) -> tuple[str, ...]:
    wanted = tuple(dict.fromkeys([*positions, *(["image_tokens"] if per_token else [])]))
    unknown = [p for p in wanted if p not in POSITIONS]
    if not wanted or unknown:
        raise ConfigError(f"positions={list(positions)}", f"choose from {POSITIONS}")
    return wanted


def _layers(backbone: BackboneAdapter, layers: Sequence[int] | None) -> list[int]:
    every = list(range(backbone.num_layers + 1))
    if layers is None:
        return every
    chosen = sorted(set(layers))
    if not chosen or any(k not in every for k in chosen):
        raise ConfigError(f"layers={list(layers)}", f"choose from 0..{backbone.num_layers} (0 = input of layer 1)")
    return chosen


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    dist = torch.distributed
    if rank is None and world_size is None:
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank}", f"must be in 0..{world_size - 1}")
    return rank, world_size


def _envoy(model: NNsight, path: str):
    for name in path.split("."):
        model = getattr(model, name)
    return model


def _finish(act_store: ActivationStore, rank: int, world_size: int, merge: bool) -> None:
    """Merge a complete store: alone, or on rank 0 between barriers when ``torch.distributed`` runs.

    Ranks launched without a process group cannot know when the others are done; their shards are
    read as one view anyway, and ``ActivationStore.merge`` can be run afterwards.
    """
    dist = torch.distributed
    synced = world_size > 1 and dist.is_available() and dist.is_initialized()
    if synced:
        dist.barrier()
    if merge and rank == 0 and (world_size == 1 or synced) and act_store.complete:
        act_store.merge()
    if synced:
        dist.barrier()


__all__ = [
    "DEFAULT_POSITIONS",
    "LAYER_INDEX",
    "POSITION_MEANING",
    "CaptureReport",
    "LayerTracer",
    "capture",
    "capture_provenance",
    "forward_kwargs",
]
