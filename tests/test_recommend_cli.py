"""``analysis.py recommend-depth`` end to end on a tiny mini-VL and a tiny synthetic data folder.

The model is a 3-layer, 64-wide mini-VL (packaged ImageNet tower, random merger and decoder) saved to a
folder and loaded by path, as a user's checkpoint would be. The data: 12 held-out source photos (and two
train ones, which must not be captured), each with a trace fake (D2) and two composites whose pasted
object's colour is its class, each with a semantic-cue fake that distorts the object (D1). Every image
is a 64x64 PNG. Everything generated goes to a temporary cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import analysis
from probes.backbones import load_backbone
from probes.backbones.mini_vl import MiniVLAdapter, build_mini_vl, mini_vl_config
from probes.data.manifest import DEFAULT_PROMPT, Record, swift_messages, write_manifest

NUM_LAYERS = 3
COLOURS = {"bird": (220, 40, 40), "cat": (40, 40, 220)}
BACKGROUNDS = [(90, 160, 90), (200, 190, 120), (120, 150, 200), (150, 150, 150)]
SPLITS = ("val", "test")


def write_data(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    records = []

    def add(id: str, draw, background: int, **fields) -> None:
        im = Image.new("RGB", (64, 64), BACKGROUNDS[background % 4])
        draw(ImageDraw.Draw(im))
        path = f"images/{id}.png"
        im.save(root / path)
        records.append(Record(id=id, messages=swift_messages(DEFAULT_PROMPT, fields["label"]), images=[path],
                              post="none", width=64, height=64, format="PNG", orig_width=64, orig_height=64,
                              orig_format="PNG", **fields))

    for s in range(14):
        split = SPLITS[s % 2] if s < 12 else "train"
        common = dict(source_id=f"photo/{s}", split=split, scene_class=("beach", "forest")[s % 2])
        photo = dict(kind="photo", scene_id=f"scene-photo-{s}", **common)
        add(f"p{s}", lambda d: None, s, label="real", cue="none", generator="none", **photo)
        speckle = [(i * 7 % 64, i * 13 % 64) for i in range(200)]
        add(f"t{s}", lambda d, pts=speckle: d.point(pts, fill=(0, 0, 0)), s, label="fake", cue="trace",
            generator="specklegan", **photo)
        for c in range(2):
            k = (2 * s + c) % 12
            cls, x = ("bird", "cat")[k % 2], 8 + 4 * (k % 5)
            comp = dict(kind="composite", object_id=f"stamp/{cls}/{k}", semantic_class=cls,
                        scene_id=f"scene-comp-{s}-{c}", **common)
            add(f"c{s}-{c}", lambda d, x=x, cls=cls: d.ellipse((x, x, x + 30, x + 30), fill=COLOURS[cls]), s,
                label="real", cue="none", generator="none", **comp)
            add(f"f{s}-{c}", lambda d, x=x, cls=cls: d.rectangle((x, x, x + 30, x + 10), fill=COLOURS[cls]), s,
                label="fake", cue="semantic", generator="paste_implausible", d1_kind="scale", **comp)
    write_manifest(root / "manifest.jsonl", records)


@pytest.fixture(scope="module", autouse=True)
def folders(tmp_path_factory):
    """The model and data folders; the cache (activations, probe results) under the same temporary root."""
    root = tmp_path_factory.mktemp("recommend")
    model = build_mini_vl(mini_vl_config(hidden=64, num_layers=NUM_LAYERS, merger_hidden=64, image_size=64,
                                         token_grid=2))
    model.model.save_pretrained(root / "model")
    model.processor.save_pretrained(root / "model")
    write_data(root / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPVRM_LENS_CACHE", str(root / "cache"))
        yield root


def argv(root: Path, out: Path, **changes) -> list[str]:
    options = {"--model": str(root / "model"), "--data": str(root / "data"), "--boot": "50", "--seeds": "0",
               "--folds": "3", "--tasks": "semantic,d1,d2", "--out": str(out), **changes}
    return ["recommend-depth", "--no-generators", *(x for kv in options.items() for x in kv)]


@pytest.fixture(scope="module")
def first_run(folders):
    root = folders
    out = root / "out"
    return analysis.main(argv(root, out)), out


def test_the_saved_folder_loads_as_a_mini_vl(folders):
    backbone = load_backbone(str(folders / "model"))
    assert isinstance(backbone, MiniVLAdapter) and backbone.num_layers == NUM_LAYERS


def test_recommend_depth_writes_the_recommendation_with_its_evidence(first_run):
    code, out = first_run
    assert code == 0
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["num_layers"] == NUM_LAYERS
    assert 1 <= rec["layer"] <= NUM_LAYERS - 1
    assert "within its 95% CI of its plateau" in rec["criterion"] and "clipped to 1..L-1" in rec["criterion"]
    assert rec["position"] == "last" and rec["metric"] == "accuracy"
    assert set(rec["per_task"]) | set(rec["excluded"]) == {"semantic", "d1"}
    assert "semantic" in rec["per_task"]  # the colours make the object class plain
    deepest = max(v["earliest_at_plateau"] for v in rec["per_task"].values())
    assert rec["layer"] == min(max(deepest, 1), NUM_LAYERS - 1)
    curves = rec["curves"]
    assert {r["task"] for r in curves} == {"semantic", "d1", "d2"}
    for task in ("semantic", "d1", "d2"):
        assert sorted(r["layer"] for r in curves if r["task"] == task) == list(range(NUM_LAYERS + 1))
    assert all(r["lo"] <= r["estimate"] <= r["hi"] and r["metric"] == "accuracy" for r in curves)
    assert rec["provenance"]["model"]["num_layers"] == NUM_LAYERS
    assert rec["provenance"]["confound"]["at_chance"] and "warning" not in rec["provenance"]["confound"]
    capture = rec["provenance"]["probe"]["capture"]
    assert capture["rows_in_store"] == 12 * 6  # held-out rows only: the two train sources are not captured


def test_recommend_depth_writes_figures_and_tables(first_run):
    code, out = first_run
    assert code == 0
    for ext in ("png", "pdf", "csv"):
        assert (out / f"emergence.{ext}").is_file()
    with Image.open(out / "emergence.png") as im:
        im.verify()
    assert not (out / "generators.png").exists()  # --no-generators
    for tables in ("tables", "tables-random-weights"):
        for name in ("curves.csv", "selectivity.csv", "folds.csv", "layerwise.json"):
            assert (out / tables / name).is_file()
    summary = json.loads((out / "recommend-depth.json").read_text())
    assert summary["layer"] == json.loads((out / "recommendation.json").read_text())["layer"]
    assert str(out / "emergence.png") in summary["figures"]


def test_a_second_run_reuses_the_cached_results(first_run, folders, tmp_path):
    code, out = first_run
    assert code == 0
    root = folders
    cached = sorted((root / "cache" / "probes").iterdir())
    assert len(cached) == 2  # the trained (here: random-decoder) model and its random-weights baseline
    assert analysis.main(argv(root, tmp_path / "again")) == 0
    assert sorted((root / "cache" / "probes").iterdir()) == cached
    assert (tmp_path / "again" / "recommendation.json").read_bytes() == (out / "recommendation.json").read_bytes()
    assert (tmp_path / "again" / "tables" / "curves.csv").read_bytes() == (out / "tables" / "curves.csv").read_bytes()


@pytest.mark.parametrize("option", ["--model", "--data"])
def test_a_missing_path_exits_2_with_one_line_naming_it(folders, tmp_path, capsys, option):
    root = folders
    missing = tmp_path / "no-such-folder"
    assert analysis.main(argv(root, tmp_path / "out", **{option: str(missing)})) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {missing}: ")
    assert not (tmp_path / "out").exists()
