"""Capture with nnsight into the activation store, on the tiny random Qwen models.

Reference numbers come from plain HF forwards (``output_hidden_states=True``) of the same inputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from probes import capture as capture_module
from probes.backbones import load_backbone
from probes.cache import ActivationStore
from probes.capture import capture
from probes.data.manifest import DEFAULT_PROMPT, Record, swift_messages, write_manifest
from probes.errors import BadInputError, ProvenanceError

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5  # fp32, the tolerance the contract promises


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny-qwen2.5-vl")


def make_records(folder: Path, sizes, prefix: str = "img") -> list[Record]:
    """One random PNG per size (``(width, height)``), as manifest rows with the default prompt."""
    rng = np.random.default_rng(0)
    records = []
    for i, (w, h) in enumerate(sizes):
        name = f"{prefix}-{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
        records.append(Record(id=f"{prefix}-{i:03d}", messages=swift_messages(DEFAULT_PROMPT, None), images=[name]))
    return records


def hf_states(backbone, folder: Path, records) -> tuple[dict, torch.Tensor]:
    """The HF forward of one batch of ``records``: its inputs and hidden states ``[L + 1, B, T, D]``."""
    images = [Image.open(folder / r.images[0]).convert("RGB") for r in records]
    inputs = backbone.build_inputs(images, [r.prompt for r in records])
    with torch.no_grad():
        out = backbone.model(**inputs, output_hidden_states=True, use_cache=False)
    return inputs, torch.stack(out.hidden_states)


def load_all(report, position, layers=None):
    return ActivationStore.open(report.store).load(position, layers)


def test_capture_equals_hf_hidden_states(tiny, tmp_path):
    records = make_records(tmp_path, [(112, 112)] * 3)
    report = capture(tiny, records, tmp_path, per_token=True, batch_size=3, store_dtype="float32", progress=False,
                     store=tmp_path / "store")
    inputs, ref = hf_states(tiny, tmp_path, records)  # ref [L + 1, B, T, D]; ref[L] is after the final norm
    L = tiny.num_layers
    mask = tiny.image_token_mask(inputs["input_ids"])
    ids, mean = load_all(report, "image_mean")
    _, last = load_all(report, "last")
    _, tokens = load_all(report, "image_tokens")
    assert ids == [r.id for r in records]
    assert mean.shape == (3, L + 1, tiny.hidden_size) and tokens.shape == (3, L + 1, 16, tiny.hidden_size)
    for k in range(L):  # raw residual stream: layer-0 input, then outputs of layers 1..L-1
        h = ref[k]
        expected_mean = torch.stack([h[b][mask[b]].mean(0) for b in range(3)])
        assert np.abs(mean[:, k] - expected_mean.numpy()).max() <= TOL
        assert np.abs(last[:, k] - h[:, -1].numpy()).max() <= TOL
        assert np.abs(tokens[:, k] - h[mask].view(3, 16, -1).numpy()).max() <= TOL
    # Index L is the last layer's output *before* the final norm: norming it gives HF's last state.
    norm = tiny.module(tiny.final_norm_path)
    with torch.no_grad():
        normed = norm(torch.from_numpy(np.array(last[:, L])))
    assert (normed - ref[L][:, -1]).abs().max() <= TOL
    assert (torch.from_numpy(np.array(last[:, L])) - ref[L][:, -1]).abs().max() > 1e-2


def test_layer0_input_is_the_scattered_vision_features(tiny, tmp_path):
    records = make_records(tmp_path, [(112, 112), (112, 112)])
    report = capture(tiny, records, tmp_path, positions=["image_tokens"], layers=[0], store_dtype="float32",
                     progress=False, store=tmp_path / "store")
    inputs, _ = hf_states(tiny, tmp_path, records)
    with torch.no_grad():
        features = tiny.vision(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    _, tokens = load_all(report, "image_tokens")  # [2, 1, 16, D]
    assert np.abs(tokens[:, 0].reshape(-1, tiny.hidden_size) - features.numpy()).max() <= TOL


def test_left_padding_makes_rows_independent_of_batch_mates(tiny, tmp_path):
    # Different sizes give different image-token counts, so rows are padded to different lengths.
    records = make_records(tmp_path, [(112, 112), (168, 112), (112, 224), (140, 140), (112, 112)])
    alone = capture(tiny, records, tmp_path, batch_size=1, store_dtype="float32", progress=False,
                    store=tmp_path / "alone")
    batched = capture(tiny, records, tmp_path, batch_size=5, store_dtype="float32", progress=False,
                      store=tmp_path / "batched", prefetch=True)
    for position in ("image_mean", "last"):
        ids_a, a = load_all(alone, position)
        ids_b, b = load_all(batched, position)
        assert ids_a == ids_b
        assert np.abs(a - b).max() <= TOL


def test_resume_after_a_kill_recomputes_nothing_and_keeps_every_row_once(tiny, tmp_path, monkeypatch):
    records = make_records(tmp_path, [(112, 112)] * 10)
    options = dict(batch_size=2, shard_rows=4, progress=False, store_dtype="float32")
    clean = capture(tiny, records, tmp_path, store=tmp_path / "clean", **options)

    forward = capture_module.LayerTracer.__call__
    seen = {"batches": 0, "rows": 0, "kill_at": 3}

    def dies_on_fourth_batch(self, inputs):
        if seen["batches"] == seen["kill_at"]:
            raise KeyboardInterrupt  # what a Ctrl-C mid-run looks like
        seen["batches"] += 1
        seen["rows"] += len(inputs["input_ids"])
        return forward(self, inputs)

    monkeypatch.setattr(capture_module.LayerTracer, "__call__", dies_on_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        capture(tiny, records, tmp_path, store=tmp_path / "resumed", **options)
    store = ActivationStore.open(tmp_path / "resumed")
    assert store.ids == [r.id for r in records[:6]]  # one full shard, plus the batch already computed
    assert not store.complete

    seen.update(rows=0, kill_at=-1)
    report = capture(tiny, records, tmp_path, store=tmp_path / "resumed", **options)
    assert seen["rows"] == 4 and report.rows_captured == 4  # only the missing rows were computed
    assert report.shards_reused == 2 and report.complete
    for position in ("image_mean", "last"):
        ids_c, c = load_all(clean, position)
        ids_r, r = load_all(report, position)
        assert ids_r == ids_c == [rec.id for rec in records]
        np.testing.assert_array_equal(r, c)


def test_a_shard_written_but_not_indexed_stays_invisible(tiny, tmp_path, monkeypatch):
    records = make_records(tmp_path, [(112, 112)] * 4)
    from probes import cache as cache_module

    real_write = cache_module.write_json

    def killed_before_index(path, obj):
        if Path(path).name.startswith("index-rank"):
            raise KeyboardInterrupt
        real_write(path, obj)

    monkeypatch.setattr(cache_module, "write_json", killed_before_index)
    with pytest.raises(KeyboardInterrupt):
        capture(tiny, records, tmp_path, batch_size=2, shard_rows=2, progress=False, store=tmp_path / "s")
    assert (tmp_path / "s" / "image_mean" / "rank00-00000.npy").is_file()  # the orphan file
    assert ActivationStore.open(tmp_path / "s").ids == []
    monkeypatch.setattr(cache_module, "write_json", real_write)
    report = capture(tiny, records, tmp_path, batch_size=2, shard_rows=2, progress=False, store=tmp_path / "s")
    assert report.rows_captured == 4 and report.rows_in_store == 4


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(backbone=dict(seed=1)), "backbone.weights"),
        (dict(backbone=dict(dtype="bfloat16")), "backbone.dtype"),
        (dict(capture=dict(prompt="What is in this image? <image>")), "prompt"),
        (dict(capture=dict(store_dtype="float32")), "store_dtype"),
        (dict(capture=dict(positions=["last"])), "positions"),
    ],
)
def test_another_provenance_is_refused_with_one_line_naming_the_field(tiny, tmp_path, change, field):
    records = make_records(tmp_path, [(112, 112)] * 2)
    capture(tiny, records, tmp_path, progress=False, store=tmp_path / "s")
    other = load_backbone("tiny-qwen2.5-vl", **change.get("backbone", {})) if "backbone" in change else tiny
    with pytest.raises(ProvenanceError) as err:
        capture(other, records, tmp_path, progress=False, store=tmp_path / "s", **change.get("capture", {}))
    assert str(err.value).count("\n") == 0
    assert f"{field} differs" in str(err.value)


def test_the_default_folder_is_keyed_by_provenance(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPVRM_LENS_CACHE", str(tmp_path / "cache"))
    records = make_records(tmp_path, [(112, 112)] * 2)
    a = capture(tiny, records, tmp_path, progress=False)
    b = capture(tiny, records, tmp_path, progress=False, prompt="What is in this image? <image>")
    assert Path(a.store).parent == Path(b.store).parent == tmp_path / "cache" / "activations"
    assert a.key != b.key
    provenance = ActivationStore.open(a.store).provenance
    for name in ("manifest", "library_versions", "layer_index", "position_meaning", "processor", "source"):
        assert name in provenance
    assert provenance["backbone"]["attn_implementation"] == "sdpa" and provenance["store_dtype"] == "float16"


def test_strided_ranks_union_and_merge_to_the_one_process_result(tiny, tmp_path):
    records = make_records(tmp_path, [(112, 112)] * 7)
    one = capture(tiny, records, tmp_path, batch_size=2, progress=False, store=tmp_path / "one")
    for rank in (1, 0):
        part = capture(tiny, records, tmp_path, batch_size=2, progress=False, store=tmp_path / "two",
                       rank=rank, world_size=2)
        assert part.rows_captured == len(records[rank::2])
    store = ActivationStore.open(tmp_path / "two")
    assert store.complete and len(store.shard_names()) == 2  # no process group: read-time union
    unmerged = store.load("last")
    assert store.merge() and store.shard_names() == ["merged-001"]
    for position in ("image_mean", "last"):
        ids_1, x_1 = load_all(one, position)
        ids_2, x_2 = store.load(position)
        assert ids_1 == ids_2 == [r.id for r in records]
        assert np.abs(x_1.astype(np.float32) - x_2.astype(np.float32)).max() <= 1e-3  # fp16 store
    np.testing.assert_array_equal(unmerged[1], store.load("last")[1])


def test_two_processes_with_torchrun_merge_to_the_one_process_result(tiny, tmp_path):
    records = make_records(tmp_path, [(112, 112)] * 6)
    manifest = tmp_path / "manifest.jsonl"
    write_manifest(manifest, records)
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch.distributed as dist\n"
        "from probes.backbones import load_backbone\n"
        "from probes.capture import capture\n"
        "from probes.data.manifest import read_manifest\n"
        "dist.init_process_group('gloo')\n"
        "records = read_manifest(sys.argv[1])\n"
        "r = capture(load_backbone('tiny-qwen2.5-vl'), records, sys.argv[2], batch_size=2, progress=False,\n"
        "            store_dtype='float32', store=sys.argv[3])\n"
        "open(f'{sys.argv[3]}.rank{r.rank}.json', 'w').write(r.to_json())\n"
        "dist.destroy_process_group()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(manifest), str(tmp_path), str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    reports = [json.loads((tmp_path / f"two.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(r["rank"], r["world_size"], r["rows_captured"]) for r in reports] == [(0, 2, 3), (1, 2, 3)]
    one = capture(tiny, records, tmp_path, batch_size=2, progress=False, store_dtype="float32",
                  store=tmp_path / "one")
    two = ActivationStore.open(tmp_path / "two")
    assert two.shard_names() == ["merged-001"]  # rank 0 merged after the barrier
    assert {p.name for p in (tmp_path / "two").glob("index-rank*.json")} == {"index-rank00.json", "index-rank01.json"}
    for position in ("image_mean", "last"):
        ids_1, x_1 = load_all(one, position)
        ids_2, x_2 = two.load(position)
        assert ids_1 == ids_2
        assert np.abs(x_1 - x_2).max() <= TOL


def test_qwen2_vl_tiny_capture_equals_hf(tmp_path):
    backbone = load_backbone("tiny-qwen2-vl")
    records = make_records(tmp_path, [(112, 112)] * 2)
    report = capture(backbone, records, tmp_path, batch_size=2, per_token=True, store_dtype="float32",
                     progress=False, store=tmp_path / "store")
    inputs, ref = hf_states(backbone, tmp_path, records)
    mask = backbone.image_token_mask(inputs["input_ids"])
    _, last = load_all(report, "last")
    _, tokens = load_all(report, "image_tokens")
    L = backbone.num_layers
    assert np.abs(last[:, :L] - ref[:L, :, -1].transpose(0, 1).numpy()).max() <= TOL
    with torch.no_grad():
        features = backbone.vision(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    features = getattr(features, "pooler_output", features)
    assert np.abs(tokens[:, 0].reshape(-1, backbone.hidden_size) - features.numpy()).max() <= TOL
    assert mask.sum() == tokens.shape[0] * tokens.shape[2]


def test_mini_vl_the_embedded_default_captures_like_hf(tmp_path):
    from probes.backbones.mini_vl import build_mini_vl

    backbone = build_mini_vl()  # untrained: same classes and shapes as the trained checkpoint
    records = make_records(tmp_path, [(128, 128), (96, 160)])
    report = capture(backbone, records, tmp_path, batch_size=2, store_dtype="float32", progress=False,
                     store=tmp_path / "store")
    inputs, ref = hf_states(backbone, tmp_path, records)
    mask = backbone.image_token_mask(inputs["input_ids"])
    L = backbone.num_layers
    _, mean = load_all(report, "image_mean")
    _, last = load_all(report, "last")
    expected_mean = torch.stack([ref[:L, b][:, mask[b]].mean(1) for b in range(2)])  # [B, L, D]
    assert np.abs(mean[:, :L] - expected_mean.numpy()).max() <= TOL
    assert np.abs(last[:, :L] - ref[:L, :, -1].transpose(0, 1).numpy()).max() <= TOL


@pytest.mark.parametrize("prefetch", [False, True])
def test_a_bad_image_stops_with_one_line_naming_it(tiny, tmp_path, prefetch):
    records = make_records(tmp_path, [(112, 112)] * 5)
    (tmp_path / records[3].images[0]).write_bytes(b"not a png at all")
    with pytest.raises(BadInputError) as err:
        capture(tiny, records, tmp_path, batch_size=2, shard_rows=2, progress=False, store=tmp_path / "s",
                prefetch=prefetch)
    message = str(err.value)
    assert "\n" not in message and records[3].id in message and records[3].images[0] in message
    assert "not an image file" in message
    assert ActivationStore.open(tmp_path / "s").ids == [r.id for r in records[:2]]  # the batch before it is kept


def test_skip_mode_lists_bad_rows_keeps_the_rest_and_retries_them_later(tiny, tmp_path):
    records = make_records(tmp_path, [(112, 112)] * 5)
    bad_file = tmp_path / records[2].images[0]
    good_bytes = bad_file.read_bytes()
    bad_file.write_bytes(b"")
    records[4].images[0] = "missing.png"
    # An aspect ratio the Qwen processor refuses: loads fine, fails in preprocessing, alone.
    Image.new("RGB", (8, 2000)).save(tmp_path / "thin.png")
    records.append(Record(id="thin", messages=swift_messages(DEFAULT_PROMPT, None), images=["thin.png"]))
    report = capture(tiny, records, tmp_path, batch_size=3, on_error="skip", progress=False, store=tmp_path / "s",
                     prefetch=True)
    skipped = {s["item"].split(":")[0] for s in report.skipped}
    assert skipped == {f"row {records[2].id}", f"row {records[4].id}", "row thin"}
    assert report.rows_captured == 3 and not report.complete
    store = ActivationStore.open(report.store)
    assert store.ids == [records[i].id for i in (0, 1, 3)]
    assert [s["id"] for s in store.skipped] == [records[2].id, records[4].id, "thin"]
    assert "empty file" in store.skipped[0]["reason"]

    bad_file.write_bytes(good_bytes)  # fixed: a rerun captures it and nothing else
    again = capture(tiny, records, tmp_path, batch_size=3, on_error="skip", progress=False, store=tmp_path / "s")
    assert again.rows_captured == 1 and len(again.skipped) == 2
    assert ActivationStore.open(report.store).ids == [records[i].id for i in (0, 1, 2, 3)]


def test_per_token_refuses_rows_with_another_token_count(tiny, tmp_path):
    records = make_records(tmp_path, [(112, 112), (112, 112), (224, 112)])
    report = capture(tiny, records, tmp_path, per_token=True, on_error="skip", progress=False, store=tmp_path / "s")
    assert [s["item"].split(":")[0] for s in report.skipped] == [f"row {records[2].id}"]
    assert "image tokens" in report.skipped[0]["reason"]
    with pytest.raises(BadInputError):
        capture(tiny, records, tmp_path, per_token=True, progress=False, store=tmp_path / "s")


def test_fp16_storage_refuses_values_beyond_its_range(tmp_path):
    from probes.errors import ConfigError

    loud = load_backbone("tiny-qwen2.5-vl")
    with torch.no_grad():
        loud.model.get_input_embeddings().weight.mul_(1e8)  # embeddings beyond fp16's 65504
    records = make_records(tmp_path, [(112, 112)])
    with pytest.raises(ConfigError, match="beyond fp16; use float32"):
        capture(loud, records, tmp_path, progress=False, store=tmp_path / "half")
    report = capture(loud, records, tmp_path, store_dtype="float32", progress=False, store=tmp_path / "full")
    assert report.complete


def test_report_is_json(tiny, tmp_path):
    records = make_records(tmp_path, [(112, 112)] * 2)
    report = capture(tiny, records, tmp_path, progress=False, store=tmp_path / "s")
    data = json.loads(report.to_json())
    assert data["rows_captured"] == 2 and data["complete"] and data["shards"] == ["merged-001"]
    assert data["images_per_s"] > 0 and data["store"] == str(tmp_path / "s")
