"""Loaders for users' data: Deep-VRM JSON / JSONL, GenImage folders, on_error skip|stop."""

import json

import numpy as np
import pytest
from PIL import Image

from probes.data import load_deepvrm_json, load_genimage, read_manifest
from probes.errors import BadInputError

ASK = "Is this image real or fake? Please just answer 'real' or 'fake'. <image>"


def _image(path, size, fmt, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


@pytest.fixture
def genimage(tmp_path):
    """Real JPEGs against fake PNGs of another size: the GenImage format bias, in miniature."""
    root = tmp_path / "GenImage"
    for gen in ("sdv14", "biggan"):
        for split in ("train", "val"):
            for i in range(2):
                _image(root / gen / split / "nature" / f"n{i}.JPEG", (100, 80), "JPEG", seed=i)
                _image(root / gen / split / "ai" / f"{gen}_{i}.png", (64, 64), "PNG", seed=10 + i)
    (root / "sdv14" / "train" / "ai" / ".DS_Store").write_bytes(b"junk")  # hidden: ignored
    return root


def _uniform(ds):
    sizes = {(r.width, r.height, r.format, r.bytes) for r in ds.records}
    files = {(ds.folder / r.images[0]).stat().st_size for r in ds.records}
    return len(sizes) == 1 and files == {next(iter(sizes))[3]}


def test_genimage_labels_generators_splits_and_orig_columns(genimage, tmp_path):
    ds = load_genimage(genimage, out=tmp_path / "out")
    assert len(ds.records) == 16
    assert _uniform(ds)
    fakes = [r for r in ds.records if r.label == "fake"]
    reals = [r for r in ds.records if r.label == "real"]
    assert {r.generator for r in fakes} == {"sdv14", "biggan"} and {r.generator for r in reals} == {"none"}
    assert {r.split for r in ds.records} == {"train", "val"}
    assert {(r.orig_format, r.orig_width) for r in reals} == {("JPEG", 100)}
    assert {(r.orig_format, r.orig_width) for r in fakes} == {("PNG", 64)}
    summary = ds.summary()
    assert summary["orig_format_by_label"] == {"fake": {"PNG": 8}, "real": {"JPEG": 8}}
    assert summary["skipped"] == 0
    json.dumps(summary)
    assert [r.id for r in read_manifest(ds.manifest_path)] == [r.id for r in ds.records]
    only = load_genimage(genimage, out=tmp_path / "out", generators=["biggan"], group=lambda p: p.parent.name)
    assert {r.extra["subset"] for r in only.records} == {"biggan"}
    assert {r.source_id for r in only.records} == {"ai", "nature"}


def test_genimage_skip_lists_bad_files_and_stop_raises(genimage, tmp_path):
    bad = genimage / "biggan" / "val" / "ai" / "broken.png"
    bad.write_bytes(b"")
    ds = load_genimage(genimage, out=tmp_path / "out", on_error="skip")
    assert len(ds.records) == 16
    assert ds.summary()["skipped_items"] == [{"item": str(bad), "reason": "empty file (0 bytes)"}]
    with pytest.raises(BadInputError, match="broken.png: empty file"):
        load_genimage(genimage, out=tmp_path / "out2", on_error="stop")


def test_genimage_rejects_a_folder_without_the_layout(tmp_path):
    with pytest.raises(BadInputError, match="ai,nature"):
        load_genimage(tmp_path)


def test_reload_reuses_normalised_images(genimage, tmp_path):
    first = load_genimage(genimage, out=tmp_path / "out")
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "images").rglob("*.png")}
    second = load_genimage(genimage, out=tmp_path / "out")
    assert [r.to_row() for r in first.records] == [r.to_row() for r in second.records]
    assert {p: p.stat().st_mtime_ns for p in written} == written


def _deepvrm_tree(tmp_path):
    imgs = tmp_path / "imgs"
    _image(imgs / "real" / "000001.jpg", (90, 70), "JPEG", 1)
    _image(imgs / "fake" / "000001.png", (64, 64), "PNG", 2)
    _image(imgs / "fake" / "000002.png", (64, 64), "PNG", 3)
    return imgs


def test_deepvrm_eval_json_has_no_labels(tmp_path):
    _deepvrm_tree(tmp_path)
    rows = [{"messages": [{"role": "user", "content": ASK}], "images": ["imgs/real/000001.jpg"]}]
    (tmp_path / "eval_data.json").write_text(json.dumps(rows))
    ds = load_deepvrm_json(tmp_path / "eval_data.json", out=tmp_path / "out")
    (r,) = ds.records
    assert r.label is None and r.prompt == ASK and r.source_id == "000001"
    assert (r.orig_format, r.orig_width, r.width) == ("JPEG", 90, 128)


def test_deepvrm_training_jsonl_answers_and_extra_keys(tmp_path):
    imgs = _deepvrm_tree(tmp_path)
    rows = [
        ("Is this a real image? <image>", "Yes", imgs / "real" / "000001.jpg", "real"),
        ("Is this a AI-generated image? <image>", "yes", "imgs/fake/000001.png", "fake_single"),
        (ASK, "AI-generated", "imgs/fake/000002.png", "fake"),
        (ASK, "natural image", "imgs/real/000001.jpg", "real"),
    ]
    lines = [
        json.dumps(
            {
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                "images": [str(img)],
                "channel": ch,
            }
        )
        for q, a, img, ch in rows
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    ds = load_deepvrm_json(tmp_path / "train.jsonl", out=tmp_path / "out")
    assert [r.label for r in ds.records] == ["real", "fake", "fake", "real"]
    assert [r.extra["channel"] for r in ds.records] == ["real", "fake_single", "fake", "real"]
    assert ds.records[0].images == ds.records[3].images  # same bytes, one normalised file
    assert [r.source_id for r in ds.records] == ["000001", "000001", "000002", "000001"]
    assert _uniform(ds)


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"images": ["imgs/missing.png"]}, "missing.png: no such file"),
        ({"answer": "maybe"}, "cannot read real/fake"),
        ({"images": ["imgs/real/000001.jpg", "imgs/fake/000001.png"], "tags": 2}, "one image per row"),
    ],
)
def test_deepvrm_bad_rows(tmp_path, row, reason):
    _deepvrm_tree(tmp_path)
    prompt = ASK.replace("<image>", "<image> " * row.get("tags", 1)).strip()
    messages = [{"role": "user", "content": prompt}]
    if "answer" in row:
        messages.append({"role": "assistant", "content": row["answer"]})
    good = {"messages": [{"role": "user", "content": ASK}], "images": ["imgs/fake/000002.png"]}
    bad = {"messages": messages, "images": row.get("images", ["imgs/real/000001.jpg"])}
    (tmp_path / "d.json").write_text(json.dumps([good, bad]))
    with pytest.raises(BadInputError, match=reason) as err:
        load_deepvrm_json(tmp_path / "d.json", out=tmp_path / "out")
    assert "\n" not in str(err.value)
    ds = load_deepvrm_json(tmp_path / "d.json", out=tmp_path / "out", on_error="skip")
    assert len(ds.records) == 1 and ds.summary()["skipped"] == 1
    assert reason.split(": ")[-1] in ds.summary()["skipped_items"][0]["reason"]


def test_deepvrm_malformed_json_line_is_skipped(tmp_path):
    _deepvrm_tree(tmp_path)
    good = json.dumps({"messages": [{"role": "user", "content": ASK}], "images": ["imgs/fake/000002.png"]})
    (tmp_path / "d.jsonl").write_text(good + "\n{not json\n")
    ds = load_deepvrm_json(tmp_path / "d.jsonl", out=tmp_path / "out", on_error="skip")
    assert len(ds.records) == 1
    assert ds.summary()["skipped_items"][0]["item"].endswith("d.jsonl:2")
