"""forensic-mini (small preset): uniform images, grouping, partners, semantic file, determinism, resume.

The session fixture builds the small preset into the cache once (later runs reuse it); the rebuild test
makes a fresh copy in a temporary root, interrupted after a stage and resumed, and compares hashes.
"""

import struct
import time
from collections import defaultdict

import pytest
from PIL import Image

from probes.data import (
    ForensicMiniConfig,
    GroupLeakError,
    build_forensic_mini,
    check_grouping,
    group_folds,
    logo_folds,
    read_manifest,
)
from probes.data.forensic_mini import OBJECT_PROMPT, SCENE_PROMPT
from probes.data.manifest import DEFAULT_PROMPT, IMAGE_TAG, manifest_hash
from probes.data.plan import D1_KINDS
from probes.errors import ConfigError
from probes.storage import hash_file

SMALL = ForensicMiniConfig.preset("small")


@pytest.fixture(scope="session")
def built(cache_dir):
    return build_forensic_mini(SMALL, progress=False)


@pytest.fixture(scope="session")
def records(built):
    return read_manifest(built.manifest_path)


@pytest.fixture(scope="session")
def semantic(built):
    return read_manifest(built.semantic_path)


def _chunks(data: bytes) -> list[bytes]:
    out, i = [], 8
    while i < len(data):
        (n,) = struct.unpack(">I", data[i : i + 4])
        out.append(data[i + 4 : i + 8])
        i += 12 + n
    return out


def test_every_image_has_one_size_mode_format_and_length(built, records):
    files = sorted((built.path / "images").iterdir())
    assert len(files) == len(records) + SMALL.n_semantic_pool
    lengths, chunk_lists = set(), set()
    for f in files:
        data = f.read_bytes()
        lengths.add(len(data))
        chunk_lists.add(tuple(_chunks(data)))
        with Image.open(f) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "RGB", (128, 128))
    assert len(lengths) == 1
    assert chunk_lists == {(b"IHDR", b"IDAT", b"IEND")}  # no metadata chunk
    (length,) = lengths
    for r in records:
        assert (r.width, r.height, r.format, r.bytes) == (128, 128, "PNG", length)
        assert (r.orig_width, r.orig_height, r.orig_format, r.orig_bytes) == (128, 128, "PNG", length)
        assert r.sha256 == hash_file(r.image_path(built.path))


def test_rows_are_ms_swift_rows(built, records):
    assert [r.id for r in records] == [f"fm-{i:05d}" for i in range(len(records))]
    for r in records:
        assert r.prompt == DEFAULT_PROMPT and r.prompt.endswith(IMAGE_TAG) and r.prompt.index(IMAGE_TAG) > 0
        assert r.answer == r.label and r.label in ("real", "fake")
        assert r.images == [f"images/{r.id}.png"]
        assert r.split == _split(r.fold)


def _split(fold: int) -> str:
    return "train" if fold < 6 else "val" if fold < 8 else "test"


def test_kinds_and_counts(built, records):
    by_gen = defaultdict(int)
    for r in records:
        by_gen[r.generator] += 1
    assert by_gen["paste_implausible"] == SMALL.n_implausible
    for fam, n in SMALL.families.items():
        assert by_gen[fam] == n, fam
    assert built.skipped == {}
    d1 = [r for r in records if r.cue == "semantic"]
    assert {r.d1_kind for r in d1} == set(D1_KINDS)
    assert all(r.label == "fake" and r.kind == "composite" for r in d1)
    posts = [r for r in records if r.post != "none"]
    assert {r.post for r in posts} == {"jpeg_double", "resize_roundtrip"} and {r.label for r in posts} == {
        "real"
    }
    assert {r.kind for r in records if r.cue == "none"} == {"photo", "composite"}
    plural = [r for r in records if r.label == "real" and len(r.extra.get("objects", [])) > 1]
    assert plural, "plausible composites must sometimes hold several objects (count is no tell)"
    assert all(len(set(r.extra["objects"])) == len(r.extra["objects"]) for r in plural)


def test_every_fake_has_its_real_partner(records):
    reals = defaultdict(list)
    for r in records:
        if r.label == "real" and r.post == "none":
            reals[r.scene_id].append(r)
    for r in records:
        if r.post != "none":
            assert r.scene_id in reals
        if r.label != "fake" or r.generator == "dcgan_faces":
            continue
        (partner,) = reals[r.scene_id]
        assert (r.source_id, r.object_id, r.semantic_class, r.scene_class, r.fold) == (
            partner.source_id,
            partner.object_id,
            partner.semantic_class,
            partner.scene_class,
            partner.fold,
        )
        if r.cue == "semantic":  # same background, same stamps: only the cue differs
            assert partner.kind == "composite" and r.extra["objects"] == partner.extra["objects"]


def test_trace_fakes_come_from_photos_and_composites_of_every_split(records):
    for fam, n in SMALL.families.items():
        kinds = [r.kind for r in records if r.generator == fam]
        assert {r.split for r in records if r.generator == fam} == {"train", "val", "test"}
        if fam != "dcgan_faces":
            assert len(kinds) == n and abs(kinds.count("photo") - kinds.count("composite")) <= 1


def test_no_source_or_object_crosses_splits(records):
    by_split = defaultdict(list)
    for r in records:
        by_split[r.split].append(r)
    assert set(by_split) == {"train", "val", "test"}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        check_grouping(by_split[a], by_split[b])


def test_group_folds_and_logo_folds(records):
    folds = group_folds(records)
    assert len(folds) == 10
    assert sorted(i for f in folds for i in f.test) == list(range(len(records)))
    assert len(group_folds(records, splits=("train",), k=3)) == 3
    logo = logo_folds(records)
    assert {f.name for f in logo} == {f"logo-{g}" for g in [*SMALL.families, "paste_implausible"]}
    for fold in logo:
        held = fold.name.removeprefix("logo-")
        test_fakes = {records[i].generator for i in fold.test if records[i].label == "fake"}
        assert test_fakes == {held}
        assert held not in {records[i].generator for i in fold.train if records[i].label == "fake"}
        assert {records[i].split for i in fold.test} == {"test"}


def test_a_leak_is_a_one_line_error(records):
    train = [r for r in records if r.split == "train"]
    with pytest.raises(GroupLeakError, match="source_id photo/") as err:
        check_grouping(train, train[:1])
    assert "\n" not in str(err.value)


def test_semantic_file(built, records, semantic):
    manifest = {r.id: r for r in records}
    assert len({r.id for r in semantic}) == len(semantic)
    for r in semantic:
        assert r.label is None and r.prompt in (OBJECT_PROMPT, SCENE_PROMPT)
        assert "real" not in r.prompt and "fake" not in r.prompt
        expected = r.semantic_class if r.prompt == OBJECT_PROMPT else r.scene_class
        assert r.answer == expected and r.kind in ("photo", "composite") and r.post == "none"
        assert r.prompt == SCENE_PROMPT or r.kind == "composite"
        image_id = r.images[0].removeprefix("images/").removesuffix(".png")
        if image_id.startswith("fmp-"):
            assert r.split == "train" and r.kind == "composite"
        else:
            assert manifest[image_id].label == "real" and manifest[image_id].post == "none"
    pool = {r.images[0] for r in semantic if "fmp-" in r.images[0]}
    assert len(pool) == SMALL.n_semantic_pool


def test_build_json_and_fast_reuse(built):
    start = time.perf_counter()
    again = build_forensic_mini(SMALL, progress=False)
    assert time.perf_counter() - start < 0.5
    assert again.reused and again.manifest_hash == built.manifest_hash == manifest_hash(built.manifest_path)
    counts = again.counts["manifest"]
    assert set(counts) >= {"label", "generator", "cue", "split", "semantic_class"}
    assert set(again.timings) >= {"photos", "cyclegan", "assemble", "total"}
    assert "torch" in again.versions and "deb:tuxpaint-stamps-default" in again.versions


def test_config_round_trip_and_validation(tmp_path):
    SMALL.save(tmp_path / "c.json")
    assert ForensicMiniConfig.load(tmp_path / "c.json") == SMALL
    assert ForensicMiniConfig.from_dict(SMALL.to_dict()).hash == SMALL.hash != ForensicMiniConfig().hash
    for bad in ({"image_size": 30}, {"families": {"biggan": 5}}, {"n_implausible": 10, "n_composites": 5}):
        with pytest.raises(ConfigError):
            ForensicMiniConfig(**bad)
    with pytest.raises(ConfigError, match="unknown"):
        ForensicMiniConfig.from_dict({"n_fotos": 3})


def test_interrupted_rebuild_resumes_and_matches(built, tmp_path):
    class Stop(Exception):
        pass

    def interrupt(stage):
        if stage == "composites":
            raise Stop

    with pytest.raises(Stop):
        build_forensic_mini(SMALL, root=tmp_path, progress=False, on_stage=interrupt)
    assert not (tmp_path / built.path.name).exists()  # the final folder appears only when complete
    seen = []
    report = build_forensic_mini(SMALL, root=tmp_path, progress=False, on_stage=seen.append)
    assert report.timings["photos"]["reused"] and report.timings["composites"]["reused"]
    assert not report.timings["implausible"]["reused"] and not report.timings["cyclegan"]["reused"]
    assert seen[:3] == ["photos", "composites", "implausible"]
    assert report.manifest_hash == built.manifest_hash, "rebuild differs (bump FORMAT_VERSION if intended)"
    assert report.semantic_hash == built.semantic_hash
    assert not any(p.name.endswith(".work") for p in tmp_path.iterdir())


def test_a_family_that_cannot_load_is_skipped_loudly(tmp_path, monkeypatch, capsys):
    from probes.data import forensic_mini
    from probes.errors import UnavailableError

    def unavailable(name, size):
        raise UnavailableError(name, "cannot load: libvulkan.so.1 missing")

    monkeypatch.setattr(forensic_mini.generators, "load_family", unavailable)
    tiny = ForensicMiniConfig(
        n_photos=4, n_composites=4, n_implausible=0, n_semantic_pool=0, families={"cugan": 2}, distractors={}
    )
    report = build_forensic_mini(tiny, root=tmp_path, progress=False)
    assert report.skipped == {"cugan": "cannot load: libvulkan.so.1 missing"}
    assert "forensic-mini: skipped cugan: cannot load: libvulkan.so.1 missing" in capsys.readouterr().err
    assert report.counts["manifest"]["generator"] == {"none": 8}
