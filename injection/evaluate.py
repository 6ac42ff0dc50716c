"""Detection evaluation, as the official ``eval.sh`` (paper.md §6–7), plus held-out semantic QA.

For each data set (a forensic-mini folder or manifest, or a Deep-VRM / ms-swift eval JSON such as
``DATA/Test/eval_data.json``) the model answers every image's question greedily; one JSONL row per image is
written to ``<out>/<name>_test_result.jsonl``: id, prompt, generated text, parsed answer, label, logit
margin, generator, cue.

- **accuracy** is read from the *generated* answer (:func:`~probes.data.parse_answer`); an answer that says
  neither real nor fake counts as wrong and is also counted apart (``unparsed``);
- **AP and ROC-AUC** (fake = positive) use the logit margin at the answer position: the logit of the first
  token of the prompt's fake-answer word minus that of its real-answer word ("fake" − "real" for the
  official prompt; "no" − "yes" for "Is this a real image?");
- **breakdowns** by generator and by cue: each group's fakes against all real images of the set;
- **semantic QA** (the folder's ``semantic.jsonl``, rows of the evaluated split, by default the held-out test
  rows; object and scene classes): accuracy
  of the generated answer and of the closed-set choice among the question's class words, a first look at
  semantic forgetting after forensic fine-tuning.

>>> summary = evaluate("runs/deepvrm-2-abc", ["DATA/Test/eval_data.json"], out="eval/")
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from tqdm.auto import tqdm
from transformers import GenerationConfig

from injection.train import PROMPT_ANSWERS, SEMANTIC_FILE, load_image, load_model
from probes.backbones.base import BackboneAdapter, LoadSettings
from probes.backbones.processing import OBJECT_CLASSES, SCENE_CLASSES, SEMANTIC_PROMPTS
from probes.data import load_deepvrm_json, manifest_hash, parse_answer, read_manifest
from probes.data.manifest import LABELS, Record
from probes.errors import BadInputError
from probes.storage import cache_root, hash_json, library_versions, write_json, write_text

DEFAULT_ANSWERS = ("real", "fake")
HELD_OUT = ("val", "test")
SEMANTIC_CLASSES = dict(zip(SEMANTIC_PROMPTS, (OBJECT_CLASSES, SCENE_CLASSES)))
SPLITS = ("test", "val", "train", "all")
_WORD = re.compile(r"[a-z0-9]+")


@dataclass
class EvalSet:
    """One data set to evaluate: its name, rows, the folder their image paths are relative to, and the
    held-out semantic QA rows (empty unless the folder has ``semantic.jsonl``)."""

    name: str
    records: list[Record]
    root: Path
    semantic: list[Record]
    hash: str


def read_eval_set(path: str | Path, split: str = "test", image_size: int = 128, on_error: str = "stop") -> EvalSet:
    """A forensic-mini folder (or its ``manifest.jsonl``): the rows of ``split`` and the semantic QA rows of the
    same split (val and test for ``all``).
    Any other JSON/JSONL file: Deep-VRM / ms-swift rows, normalised by :func:`load_deepvrm_json` (labels from
    a ``label`` column or the assistant answer)."""
    if split not in SPLITS:
        raise BadInputError(f"split={split}", f"use one of {list(SPLITS)}")
    path = Path(path)
    manifest = path / "manifest.jsonl" if path.is_dir() else path
    if not manifest.is_file():
        raise BadInputError(path, "no such file (pass a data folder with manifest.jsonl, or an eval JSON/JSONL file)")
    if manifest.name != "manifest.jsonl":
        ds = load_deepvrm_json(manifest, size=image_size, on_error=on_error)
        return EvalSet(manifest.stem, ds.records, ds.folder, [], manifest_hash(manifest))
    records = [r for r in read_manifest(manifest) if split == "all" or r.split in (None, split)]
    semantic_file = manifest.parent / SEMANTIC_FILE
    semantic_splits = HELD_OUT if split == "all" else (split,)
    semantic = [r for r in read_manifest(semantic_file) if r.split in semantic_splits] if semantic_file.is_file() else []
    return EvalSet(manifest.parent.name, records, manifest.parent, semantic, manifest_hash(manifest))


# --- model answers -------------------------------------------------------------------------------


def first_token(tokenizer, word: str) -> int:
    """The id of the first token of ``word`` as an answer starts (no leading space)."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise BadInputError(f"answer word {word!r}", "tokenises to nothing")
    return ids[0]


@torch.no_grad()
def answer(adapter: BackboneAdapter, images: Sequence[str], prompts: Sequence[str], max_new_tokens: int) -> tuple[list[str], torch.Tensor]:
    """Greedy answers to a batch, and the logits [B, vocab] at the answer position (first generated token)."""
    model = adapter.model
    inputs = adapter.build_inputs([load_image(p) for p in images], list(prompts)).to(model.device)
    tokenizer = adapter.processor.tokenizer
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=model.generation_config.eos_token_id, output_logits=True,
                              return_dict_in_generate=True)
    out = model.generate(**inputs, generation_config=config)
    new_tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [t.strip() for t in texts], out.logits[0].float().cpu()


def batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def detection_rows(adapter: BackboneAdapter, data: EvalSet, batch_size: int, max_new_tokens: int,
                   prompt: str | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """One result row per image: the generated answer, what it says, and the fake-minus-real logit margin."""
    tokenizer = adapter.processor.tokenizer
    rows = []
    for part in tqdm(list(batches(len(data.records), batch_size)), desc=f"eval {data.name}", disable=not progress):
        records = data.records[part]
        prompts = [prompt or r.prompt for r in records]
        texts, logits = answer(adapter, [str(r.image_path(data.root)) for r in records], prompts, max_new_tokens)
        for r, p, text, row_logits in zip(records, prompts, texts, logits):
            real_word, fake_word = PROMPT_ANSWERS.get(p, DEFAULT_ANSWERS)
            margin = row_logits[first_token(tokenizer, fake_word)] - row_logits[first_token(tokenizer, real_word)]
            parsed = parse_answer(p, text)
            rows.append({
                "id": r.id, "image": r.images[0], "prompt": p, "response": text, "parsed": parsed,
                "label": r.label, "correct": parsed == r.label if r.label else None,
                "margin": round(float(margin), 5), "generator": r.generator, "cue": r.cue, "split": r.split,
            })
    return rows


def semantic_rows(adapter: BackboneAdapter, data: EvalSet, batch_size: int, max_new_tokens: int,
                  progress: bool = True) -> list[dict[str, Any]]:
    """Held-out semantic QA: the generated answer and the closed-set choice among the question's classes."""
    tokenizer = adapter.processor.tokenizer
    choices = {p: (classes, [first_token(tokenizer, c) for c in classes]) for p, classes in SEMANTIC_CLASSES.items()}
    rows = []
    for part in tqdm(list(batches(len(data.semantic), batch_size)), desc=f"semantic {data.name}", disable=not progress):
        records = data.semantic[part]
        texts, logits = answer(adapter, [str(r.image_path(data.root)) for r in records], [r.prompt for r in records],
                               max_new_tokens)
        for r, text, row_logits in zip(records, texts, logits):
            classes, ids = choices.get(r.prompt, ((), []))
            closed = classes[int(row_logits[ids].argmax())] if _distinct(ids) else None
            rows.append({
                "id": r.id, "prompt": r.prompt, "question": r.extra.get("question"), "response": text,
                "answer": r.answer, "correct": _first_word(text) == _first_word(r.answer or ""),
                "closed_set": closed, "closed_set_correct": None if closed is None else closed == r.answer,
            })
    return rows


def _distinct(ids: list[int]) -> bool:
    return bool(ids) and len(set(ids)) == len(ids)


def _first_word(text: str) -> str:
    words = _WORD.findall(text.lower())
    return words[0] if words else ""


# --- metrics -------------------------------------------------------------------------------------


def detection_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy from the parsed answers (unparsed = wrong, also counted), AP and ROC-AUC from the margins."""
    rows = [r for r in rows if r["label"] in LABELS]
    n = len(rows)
    if not n:
        return {"n": 0}
    unparsed = sum(r["parsed"] is None for r in rows)
    correct = sum(bool(r["correct"]) for r in rows)
    by_label = {lab: [r for r in rows if r["label"] == lab] for lab in LABELS}
    out = {
        "n": n, "n_fake": len(by_label["fake"]), "n_real": len(by_label["real"]),
        "accuracy": correct / n,
        "real_accuracy": _mean(r["correct"] for r in by_label["real"]),
        "fake_accuracy": _mean(r["correct"] for r in by_label["fake"]),
        "unparsed": unparsed,
        "accuracy_parsed": correct / (n - unparsed) if n > unparsed else None,
        "ap": None, "auc": None,
    }
    y = np.array([r["label"] == "fake" for r in rows])
    if 0 < y.sum() < n:
        scores = np.array([r["margin"] for r in rows])
        out["ap"] = float(average_precision_score(y, scores))
        out["auc"] = float(roc_auc_score(y, scores))
    return out


def group_metrics(rows: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """Per value of ``key`` (generator, cue): that group's fakes against every real image; ``real``: the reals."""
    reals = [r for r in rows if r["label"] == "real"]
    fakes = [r for r in rows if r["label"] == "fake"]
    out = {str(v): detection_metrics([r for r in fakes if r[key] == v] + reals)
           for v in sorted({r[key] for r in fakes}, key=str)}
    if reals:
        out["real"] = detection_metrics(reals)
    return out


def semantic_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {"n": 0}
    out: dict[str, Any] = {"n": len(rows), "accuracy": _mean(r["correct"] for r in rows),
                           "closed_set_accuracy": _mean(r["closed_set_correct"] for r in rows)}
    for question in sorted({r["question"] for r in rows if r["question"]}):
        part = [r for r in rows if r["question"] == question]
        out[question] = {"n": len(part), "accuracy": _mean(r["correct"] for r in part),
                         "closed_set_accuracy": _mean(r["closed_set_correct"] for r in part)}
    return out


def _mean(values) -> float | None:
    values = [bool(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


# --- the run -------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def evaluate(
    model: str,
    data: Sequence[str],
    *,
    out: str | Path | None = None,
    settings: LoadSettings | None = None,
    split: str = "test",
    prompt: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 8,
    semantic: bool = True,
    image_size: int = 128,
    image_pixels: int | None = None,
    on_error: str = "stop",
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model`` (a base or Deep-VRM checkpoint, or a built-in backbone) on each data set; write the
    result JSONL files and ``eval.json`` (metrics and provenance) to ``out``; return that summary."""
    settings = settings or LoadSettings()
    sets = [read_eval_set(d, split, image_size, on_error) for d in data]  # bad data fails before the model loads
    t0 = time.perf_counter()
    adapter = load_model(model, settings, image_pixels=image_pixels)
    adapter.model.eval()
    out = Path(out) if out else default_out(model, adapter)
    summary: dict[str, Any] = {
        "model": model, "weights": adapter.weights_fingerprint(), "family": adapter.family,
        "deep_vrm": getattr(adapter.model.config, "deep_vrm", None), "out": str(out),
        "settings": {"split": split, "prompt": prompt, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                     "dtype": settings.dtype, "attn_implementation": settings.attn_implementation,
                     "device": settings.device, "processor": adapter.processor_settings()},
        "datasets": {}, "versions": library_versions(),
    }
    load_s = time.perf_counter() - t0
    images = 0
    for data_set in sets:
        rows = detection_rows(adapter, data_set, batch_size, max_new_tokens, prompt, progress)
        write_jsonl(out / f"{data_set.name}_test_result.jsonl", rows)
        result = {"rows": len(rows), "data_hash": data_set.hash, **detection_metrics(rows),
                  "by_generator": group_metrics(rows, "generator"), "by_cue": group_metrics(rows, "cue")}
        images += len(rows)
        if semantic and data_set.semantic:
            qa = semantic_rows(adapter, data_set, batch_size, max_new_tokens, progress)
            write_jsonl(out / f"{data_set.name}_semantic_result.jsonl", qa)
            result["semantic"] = semantic_metrics(qa)
            images += len(qa)
        summary["datasets"][data_set.name] = result
    total = time.perf_counter() - t0
    summary["times_s"] = {"load": round(load_s, 2), "total": round(total, 2)}
    summary["images_per_s"] = round(images / (total - load_s), 2) if total > load_s else None
    write_json(out / "eval.json", summary)
    return summary


def default_out(model: str, adapter: BackboneAdapter) -> Path:
    """``<checkpoint>/eval`` for a folder, ``<cache>/eval/<name>-<weights>`` for a built-in backbone."""
    if Path(model).is_dir():
        return Path(model) / "eval"
    return cache_root() / "eval" / f"{model}-{hash_json(adapter.weights_fingerprint(), 8)}"
