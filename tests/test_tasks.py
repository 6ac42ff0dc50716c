"""Probe tasks from manifest rows: grouping, held-out splits, real/fake partners, thin classes, controls.

A synthetic manifest (no images needed: tasks read the manifest alone). Per source photo ``s``: a real
photo, one trace fake per generator of it (same ``scene_id``), a post-processed real distractor, and
``COMPOSITES`` real composites each with its semantic-cue fake. Objects are reused across sources, so
grouping by source and grouping by object differ.
"""

from __future__ import annotations

import inspect
from collections import defaultdict

import numpy as np
import pytest

from probes import linear, tasks
from probes.data.manifest import DEFAULT_PROMPT, Record, swift_messages
from probes.errors import BadInputError, ConfigError
from probes.linear import grouped_folds, sweep
from probes.tasks import HELD_OUT, build_task, confound_features, generator_tasks

SPLIT_OF = {0: "train", 1: "val", 2: "test", 3: "test"}  # by source photo
OBJECT_CLASSES = ("bird", "cat")
GENERATORS = ("cyclegan", "esrgan")
COMPOSITES, N_OBJECTS = 3, 12
ALL_TASKS = ("semantic", "scene", "d1", "d2", *(f"gen:{g}" for g in GENERATORS))


def rec(id: str, **kw) -> Record:
    """A row with one stored/original encoding for every image unless ``kw`` says otherwise."""
    kw = {"width": 64, "height": 64, "format": "PNG", "bytes": 1000, "post": "none", **kw}
    for k in ("width", "height", "format", "bytes"):
        kw.setdefault(f"orig_{k}", kw[k])
    return Record(id=id, messages=swift_messages(DEFAULT_PROMPT, kw.get("label")), images=[f"images/{id}.png"], **kw)


def make_records(n_sources: int = 16, object_classes=OBJECT_CLASSES) -> list[Record]:
    out = []
    for s in range(n_sources):
        scene_class = ("beach", "forest")[s % 2]
        common = dict(source_id=f"photo/{s:02d}", split=SPLIT_OF[s % 4], scene_class=scene_class)
        photo = dict(kind="photo", scene_id=f"scene-photo-{s}", semantic_class=scene_class, **common)
        out.append(rec(f"p{s:02d}", label="real", cue="none", generator="none", **photo))
        out += [rec(f"t{s:02d}-{g}", label="fake", cue="trace", generator=g, **photo) for g in GENERATORS]
        out.append(rec(f"j{s:02d}", label="real", cue="none", generator="none", post="jpeg_double", **photo))
        for c in range(COMPOSITES):
            k = (s * COMPOSITES + c) % N_OBJECTS
            cls = object_classes[k % len(object_classes)]
            comp = dict(kind="composite", object_id=f"stamp/{cls}/{k}", semantic_class=cls,
                        scene_id=f"scene-comp-{s}-{c}", **common)
            out.append(rec(f"c{s:02d}-{c}", label="real", cue="none", generator="none", **comp))
            out.append(rec(f"f{s:02d}-{c}", label="fake", cue="semantic", generator="paste_implausible",
                           d1_kind="scale", **comp))
    return out


@pytest.fixture(scope="module")
def records() -> list[Record]:
    return make_records()


def picked(task, records) -> list[Record]:
    return [records[i] for i in task.rows]


# --- grouping -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_TASKS)
def test_no_group_on_both_sides_of_any_fold(records, name):
    task = build_task(name, records)
    expected_key = "object_id" if name == "semantic" else "source_id"
    assert task.group_key == expected_key
    values = np.array([getattr(r, expected_key) for r in picked(task, records)])
    np.testing.assert_array_equal(task.groups, values)
    for seed in range(5):
        for n_folds in (2, 3, 4):
            folds = grouped_folds(task.labels, task.groups, n_folds, seed)
            fold_of = defaultdict(set)
            for g, f in zip(values, folds):
                fold_of[g].add(int(f))
            assert all(len(f) == 1 for f in fold_of.values()), f"{name} seed {seed}: a group straddles folds"
            assert set(folds.tolist()) == set(range(n_folds))


@pytest.mark.parametrize("name", ["semantic", "d1", "d2"])
def test_sweep_folds_keep_groups_whole_for_every_seed(records, name):
    """What the layer-wise run uses: the folds sweep deals, for several seeds."""
    task = build_task(name, records)
    X = np.random.default_rng(0).standard_normal((len(task), 1, 3)).astype(np.float32)
    result = sweep(X, task.labels, task.groups, n_folds=3, inner_folds=2, seeds=(0, 1, 2), Cs=(1.0,))
    for folds in result.folds:
        for g in np.unique(task.groups):
            assert len(np.unique(folds[task.groups == g])) == 1


def test_semantic_groups_by_object_not_by_source(records):
    """An object appears in composites of several source photos: they all share one group."""
    task = build_task("semantic", records)
    sources_per_object = defaultdict(set)
    for r in picked(task, records):
        sources_per_object[r.object_id].add(r.source_id)
    assert max(len(s) for s in sources_per_object.values()) > 1  # the data make the difference matter
    assert len(set(task.groups)) == len(sources_per_object)


def test_the_api_offers_no_row_level_split(records):
    # Every fold-making entry point needs groups; none takes only rows.
    for fn in (sweep, grouped_folds):
        param = inspect.signature(fn).parameters["groups"]
        assert param.default is inspect.Parameter.empty
    X = np.zeros((6, 1, 2), dtype=np.float32)
    with pytest.raises(BadInputError, match="groups"):
        sweep(X, np.array([0, 1] * 3), None)
    # No scikit-learn row splitter is imported by the probe modules, and a Task has no split method.
    names = {*vars(linear), *vars(tasks)}
    for splitter in ("KFold", "StratifiedKFold", "train_test_split", "ShuffleSplit", "LeaveOneOut"):
        assert splitter not in names
    assert not any("split" in a for a in dir(build_task("d1", records)))


# --- held-out splits ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_TASKS)
def test_tasks_keep_held_out_splits_by_default(records, name):
    held_out = build_task(name, records)
    assert {r.split for r in picked(held_out, records)} <= set(HELD_OUT)
    everything = build_task(name, records, splits=None)
    assert "train" in {r.split for r in picked(everything, records)}
    assert set(held_out.rows) < set(everything.rows)
    train = build_task(name, records, splits=("train",))
    assert {r.split for r in picked(train, records)} == {"train"}


def test_generator_tasks_follow_the_splits(records):
    assert generator_tasks(records) == [f"gen:{g}" for g in GENERATORS]
    only_cyclegan_held_out = [r for r in records if not (r.generator == "esrgan" and r.split != "train")]
    assert generator_tasks(only_cyclegan_held_out) == ["gen:cyclegan"]
    assert generator_tasks(only_cyclegan_held_out, splits=None) == [f"gen:{g}" for g in GENERATORS]


# --- real/fake partners ---------------------------------------------------------------------------


def _check_partners(task, records, fake_rule, real_kind):
    rows = picked(task, records)
    fakes = [r for r in rows if r.label == "fake"]
    reals = [r for r in rows if r.label == "real"]
    assert fakes and reals and task.classes == ("real", "fake")
    assert all(fake_rule(r) for r in fakes)
    assert all(r.post == "none" and r.kind == real_kind and r.cue == "none" for r in reals)
    labels = dict(zip((r.id for r in rows), task.labels))
    assert all(labels[r.id] == 1 for r in fakes) and all(labels[r.id] == 0 for r in reals)
    # Every fake comes with the real image(s) of its scene, and every real is some fake's partner,
    # in the same group (so a pair never straddles folds).
    real_scenes = {(r.scene_id, r.source_id) for r in reals}
    assert all((r.scene_id, r.source_id) in real_scenes for r in fakes)
    assert {r.scene_id for r in reals} == {r.scene_id for r in fakes}
    # The task holds every held-out real partner of its fakes, and nothing else.
    wanted = {r.id for r in records if r.split in HELD_OUT and r.label == "real" and r.post == "none"
              and r.scene_id in {f.scene_id for f in fakes}}
    assert {r.id for r in reals} == wanted


def test_d1_pairs_semantic_cue_fakes_with_their_plausible_twins(records):
    task = build_task("d1", records)
    _check_partners(task, records, lambda r: r.cue == "semantic", "composite")
    assert task.counts == {"real": 36, "fake": 36}  # 12 held-out sources x 3 composites


def test_d2_pairs_trace_fakes_with_the_reals_they_re_render(records):
    task = build_task("d2", records)
    _check_partners(task, records, lambda r: r.cue == "trace", "photo")
    assert task.counts == {"real": 12, "fake": 24}
    assert not any(r.id.startswith("j") for r in picked(task, records))  # distractors stay out


@pytest.mark.parametrize("generator", GENERATORS)
def test_generator_task_holds_one_family_and_its_partners(records, generator):
    task = build_task(f"gen:{generator}", records)
    _check_partners(task, records, lambda r: r.generator == generator, "photo")
    assert set(task.generator) == {generator, "none"}


def test_d2_leaves_out_trace_fakes_without_a_scene(records):
    orphans = records + [rec("orphan", label="fake", cue="trace", generator="cyclegan", source_id="photo/x",
                             split="test", kind="photo")]
    assert "orphan" not in {r.id for r in picked(build_task("d2", orphans), orphans)}


# --- thin and single classes ----------------------------------------------------------------------


def test_thin_classes_are_dropped_and_named(records):
    extra = [rec(f"dog{i}", label="real", cue="none", generator="none", kind="composite", object_id="stamp/dog/0",
                 semantic_class="dog", scene_id=f"scene-dog-{i}", source_id=f"photo/dog{i}", split="test")
             for i in range(3)]  # three images, but one object: one group
    task = build_task("semantic", records + extra)
    assert task.classes == ("bird", "cat", "dog")
    assert task.groups_per_class()["dog"] == 1  # the reason
    kept, dropped = task.without_thin_classes(4)
    assert dropped == ["dog"]
    assert kept.classes == ("bird", "cat") and set(kept.labels) == {0, 1}
    assert kept.counts == {c: task.counts[c] for c in ("bird", "cat")}
    assert not {r.id for r in picked(kept, records + extra)} & {r.id for r in extra}
    same, none_dropped = build_task("semantic", records).without_thin_classes(4)
    assert none_dropped == [] and len(same) == len(build_task("semantic", records))


def test_too_few_classes_left_is_a_one_line_error_naming_the_task(records):
    with pytest.raises(BadInputError) as err:
        build_task("semantic", records).without_thin_classes(100)
    assert err.value.item == "semantic" and "\n" not in str(err.value)
    assert "groups per class" in str(err.value)


def test_a_single_class_task_is_refused_with_its_name():
    one_class = make_records(object_classes=("bird",))
    task = build_task("semantic", one_class)
    assert task.classes == ("bird",)
    with pytest.raises(BadInputError, match=r"^semantic: .*two classes") as err:
        task.without_thin_classes(4)
    assert "\n" not in str(err.value)


def test_bad_task_names_and_empty_tasks_are_named(records):
    with pytest.raises(ConfigError, match="task=colour"):
        build_task("colour", records)
    with pytest.raises(BadInputError, match="^d1: no rows"):
        build_task("d1", [r for r in records if r.cue != "semantic"])
    no_source = records + [rec("loose", label="fake", cue="semantic", generator="paste_implausible",
                               kind="composite", scene_id="scene-comp-1-0", split="val")]
    with pytest.raises(BadInputError, match="^loose: no source_id"):
        build_task("d1", no_source)


# --- control task ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["semantic", "d2"])
def test_control_labels_keep_the_balance_and_are_drawn_per_image(records, name):
    task = build_task(name, records)
    control = task.control(seed=0)
    assert control.name == f"control:{name}"
    np.testing.assert_array_equal(control.rows, task.rows)
    np.testing.assert_array_equal(control.groups, task.groups)
    assert control.counts == task.counts
    assert not np.array_equal(control.labels, task.labels)
    # per image, not per group: some group gets mixed labels
    assert any(len(set(control.labels[task.groups == g])) > 1 for g in np.unique(task.groups))
    assert np.array_equal(task.control(seed=0).labels, control.labels)
    assert not np.array_equal(task.control(seed=1).labels, control.labels)


# --- confound features ----------------------------------------------------------------------------


def test_confound_features_are_constant_on_identically_encoded_data(records):
    task = build_task("d2", records)
    feats = confound_features(records, task.rows)
    assert feats.shape[:2] == (len(task), 1)
    assert np.ptp(feats[:, 0], axis=0).max() == 0


def test_confound_features_see_format_and_length_differences(records):
    reencoded = [rec(r.id, **{**{k: v for k, v in vars(r).items() if k not in ("id", "messages", "images", "extra")},
                              "format": "JPEG", "bytes": 700, "orig_format": "JPEG", "orig_bytes": 700})
                 if r.label == "real" else r for r in records]
    task = build_task("d2", reencoded)
    feats = confound_features(reencoded, task.rows)[:, 0]
    varying = np.flatnonzero(np.ptp(feats, axis=0) > 0)
    assert len(varying) == 6  # bytes, orig_bytes, and the JPEG/PNG one-hots of format and orig_format
    for j in varying:  # each one separates the classes perfectly
        assert len(set(feats[task.labels == 0, j])) == 1 and len(set(feats[task.labels == 1, j])) == 1
        assert feats[task.labels == 0, j][0] != feats[task.labels == 1, j][0]
