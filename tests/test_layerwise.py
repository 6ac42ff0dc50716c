"""Layer-wise probing on a synthetic activation store with signal planted at known layers (no model).

Activations ``[N, 6, 8]`` are Gaussian noise; from layer ``START`` on, the object class and the
real/fake label of every composite are added along two fixed directions. Trace fakes carry nothing, so
D2 stays at chance everywhere. Also: the confound probe on file-level features, caching of results, and
the one-line errors of bad input (single class, thin classes, NaN/inf, another provenance).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from probes.cache import ActivationStore
from probes.data.manifest import DEFAULT_PROMPT, Record, swift_messages
from probes.errors import BadInputError, ProvenanceError
from probes.layerwise import LayerwiseConfig, LayerwiseResult, confound_probe, run_layerwise
from probes.tasks import build_task

LAYERS, DIM, START = 6, 8, 3
SPLIT_OF = {0: "train", 1: "val", 2: "test", 3: "test"}
GENERATORS = ("cyclegan", "esrgan")
CONFIG = dict(tasks=("semantic", "d1", "d2"), generators=False, seeds=(0,), n_folds=4, n_boot=200,
              Cs=(1e-3, 1e-2, 1e-1, 1.0))


def rec(id: str, **kw) -> Record:
    kw = {"width": 64, "height": 64, "format": "PNG", "bytes": 1000, "post": "none", **kw}
    for k in ("width", "height", "format", "bytes"):
        kw.setdefault(f"orig_{k}", kw[k])
    return Record(id=id, messages=swift_messages(DEFAULT_PROMPT, kw.get("label")), images=[f"images/{id}.png"], **kw)


def make_records(n_sources: int = 16, object_classes=("bird", "cat"), composites: int = 3) -> list[Record]:
    """Per source photo: a real photo and its trace fakes (D2), composites and their semantic-cue fakes
    (semantic, D1); objects are shared across sources. A quarter of the sources are train rows."""
    out = []
    for s in range(n_sources):
        common = dict(source_id=f"photo/{s:02d}", split=SPLIT_OF[s % 4], scene_class=("beach", "forest")[s % 2])
        photo = dict(kind="photo", scene_id=f"scene-photo-{s}", **common)
        out.append(rec(f"p{s:02d}", label="real", cue="none", generator="none", **photo))
        out += [rec(f"t{s:02d}-{g}", label="fake", cue="trace", generator=g, **photo) for g in GENERATORS]
        for c in range(composites):
            k = (s * composites + c) % 12
            cls = object_classes[k % len(object_classes)]
            comp = dict(kind="composite", object_id=f"stamp/{cls}/{k}", semantic_class=cls,
                        scene_id=f"scene-comp-{s}-{c}", **common)
            out.append(rec(f"c{s:02d}-{c}", label="real", cue="none", generator="none", **comp))
            out.append(rec(f"f{s:02d}-{c}", label="fake", cue="semantic", generator="paste_implausible", **comp))
    return out


def planted(records: list[Record], strength: float = 2.5, seed: int = 0) -> np.ndarray:
    """Noise everywhere; from layer START on, object class and real/fake along two directions (composites)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((len(records), LAYERS, DIM)).astype(np.float32)
    u, v = np.linalg.qr(rng.standard_normal((DIM, 2)))[0].T
    for n, r in enumerate(records):
        if r.kind == "composite":
            X[n, START:] += strength * (1 if r.semantic_class == "bird" else -1) * u
            X[n, START:] += strength * (1 if r.label == "fake" else -1) * v
    return X


def provenance(**changes) -> dict:
    base = {"backbone": {"family": "synthetic", "weights": "w0"}, "prompt": DEFAULT_PROMPT, "positions": ["last"],
            "layers": list(range(LAYERS)), "store_dtype": "float32", "rows": "r0"}
    return {**base, **changes}


def make_store(path, records: list[Record], X: np.ndarray) -> ActivationStore:
    store = ActivationStore.create(provenance(), [r.id for r in records], path=path)
    store.writer(0).commit([r.id for r in records], {"last": X}, {})
    return store


@pytest.fixture(scope="module")
def records() -> list[Record]:
    return make_records()


@pytest.fixture(scope="module")
def store(records, tmp_path_factory) -> ActivationStore:
    return make_store(tmp_path_factory.mktemp("store") / "s", records, planted(records))


@pytest.fixture(scope="module")
def result(store, records) -> LayerwiseResult:
    return run_layerwise(store, records, LayerwiseConfig(**CONFIG), progress=False)


def by_layer(table: pd.DataFrame, task: str, metric: str | None = "accuracy") -> pd.DataFrame:
    t = table[table.task == task]
    if metric is not None:
        t = t[t.metric == metric]
    return t.sort_values("layer").set_index("layer")


# --- curves where the signal is planted ---------------------------------------------------------


@pytest.mark.parametrize("task", ["semantic", "d1"])
def test_curves_rise_where_the_signal_is_planted(result, task):
    acc, auc = by_layer(result.curves, task), by_layer(result.curves, task, "roc_auc")
    assert list(acc.index) == list(range(LAYERS))
    early, late = acc.index < START, acc.index >= START
    assert (acc.estimate[late] >= 0.9).all() and (acc.lo[late] >= 0.8).all()
    assert (acc.estimate[early] <= 0.7).all()
    assert (auc.estimate[late] >= 0.95).all() and (auc.estimate[early] <= 0.75).all()


def test_d2_carries_no_signal_at_any_layer(result):
    auc = by_layer(result.curves, "d2", "roc_auc")
    assert (auc.lo <= 0.5).all()


def test_every_ci_contains_its_estimate(result):
    for table in (result.curves, result.selectivity):
        assert (table.lo <= table.estimate + 1e-12).all() and (table.estimate <= table.hi + 1e-12).all()
        assert (table.n_boot == CONFIG["n_boot"]).all()
    assert set(result.curves.metric) == {"accuracy", "roc_auc", "average_precision"}
    assert set(result.curves.task) == set(result.selectivity.task) == set(CONFIG["tasks"])


@pytest.mark.parametrize("task", ["semantic", "d1", "d2"])
def test_control_sits_at_chance_and_selectivity_clears_zero_only_where_planted(result, task):
    sel = by_layer(result.selectivity, task, None)
    chance = max(result.tasks[task]["counts"].values()) / result.tasks[task]["n"]
    assert (abs(sel.control_value - 0.5) <= 0.2).all() and (sel.control_value <= chance + 0.1).all()
    np.testing.assert_allclose(sel.estimate, sel.task_value - sel.control_value)
    planted_here = (sel.index >= START) if task != "d2" else np.zeros(len(sel), dtype=bool)
    np.testing.assert_array_equal(sel.lo > 0, planted_here)


def test_task_summaries_and_provenance(result, store):
    meta = result.tasks
    assert meta["semantic"]["group_key"] == "object_id" and meta["d1"]["group_key"] == "source_id"
    assert meta["d1"]["counts"] == {"real": 36, "fake": 36}  # held-out only: 12 sources x 3 composites
    assert meta["d2"]["counts"] == {"real": 12, "fake": 24}
    assert all(m["dropped_classes"] == [] and m["n_folds"] == 4 for m in meta.values())
    assert result.provenance["store"]["key"] == store.key
    assert result.provenance["config_hash"] == LayerwiseConfig(**CONFIG).hash
    folds = result.folds
    assert set(folds.columns) >= {"task", "layer", "seed", "fold", "C", "accuracy", "n_train", "n_test"}
    assert len(folds) == len(CONFIG["tasks"]) * LAYERS * 4


def test_results_are_saved_and_reloaded_identically(result, tmp_path):
    result.save(tmp_path / "r")
    again = LayerwiseResult.load(tmp_path / "r")
    for name in ("curves", "selectivity", "folds"):
        pd.testing.assert_frame_equal(getattr(again, name), getattr(result, name), check_exact=True)
    assert again.confound == result.confound
    assert again.tasks == result.tasks
    assert again.provenance["config_hash"] == result.provenance["config_hash"]
    again.save(tmp_path / "r2")  # and a second round trip writes the same bytes
    for f in ("curves.csv", "selectivity.csv", "folds.csv", "layerwise.json"):
        assert (tmp_path / "r" / f).read_bytes() == (tmp_path / "r2" / f).read_bytes()


# --- the confound probe ---------------------------------------------------------------------------


def test_confound_probe_sits_at_chance_on_identically_encoded_data(result):
    c = result.confound
    assert c["task"] == "d2" and c["all_features_constant"] and c["at_chance"]
    assert c["roc_auc"][1] <= 0.5 <= c["roc_auc"][2]
    assert "warning" not in c


def encoded_like_genimage(records: list[Record], root) -> list[Record]:
    """Write each photo row's image (reals JPEG, fakes PNG, as in GenImage) and take the file-level
    columns from the files written."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for r in records:
        if r.kind != "photo":
            out.append(r)
            continue
        fmt = "JPEG" if r.label == "real" else "PNG"
        path = root / "images" / f"{r.id}.{fmt.lower()}"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, format=fmt)
        with Image.open(path) as im:
            size, fmt = im.size, im.format
        files = dict(width=size[0], height=size[1], format=fmt, bytes=path.stat().st_size)
        out.append(Record(**{**vars(r), **files, **{f"orig_{k}": v for k, v in files.items()},
                             "images": [str(path.relative_to(root))]}))
    return out


def test_confound_probe_warns_when_format_and_length_differ_by_class(records, tmp_path):
    leaky = encoded_like_genimage(records, tmp_path)
    config = LayerwiseConfig(**CONFIG)
    out = confound_probe(leaky, build_task("d2", leaky), config)
    assert not out["all_features_constant"] and not out["at_chance"]
    assert out["roc_auc"][1] > 0.5
    assert out["warning"].startswith("CONFOUND:") and "d2" in out["warning"] and "\n" not in out["warning"]
    # ... and a layer-wise run on that data carries the warning in its result
    store = make_store(tmp_path / "s", leaky, planted(leaky))
    result = run_layerwise(store, leaky, LayerwiseConfig(**{**CONFIG, "tasks": ("d2",)}), progress=False)
    assert result.confound["warning"] == out["warning"]


# --- bad input: one-line errors that name the item ---------------------------------------------


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_activations_are_named_by_row_id_and_layer(records, tmp_path, bad):
    X = planted(records)
    row = next(n for n, r in enumerate(records) if r.id == "c05-1")  # a held-out composite: in every task here
    X[row, 4, 2] = bad
    store = make_store(tmp_path / "s", records, X)
    with pytest.raises(BadInputError) as err:
        run_layerwise(store, records, LayerwiseConfig(**{**CONFIG, "tasks": ("semantic",)}), progress=False)
    assert one_line(err).startswith("row 'c05-1' layer 4: non-finite activation")


def test_a_cache_of_another_provenance_is_refused_by_name(store):
    other = provenance(backbone={"family": "synthetic", "weights": "w1"})
    with pytest.raises(ProvenanceError) as err:
        ActivationStore.open(store.path, expect=other)
    text = one_line(err)
    assert text.startswith(str(store.path)) and "backbone.weights differs" in text
    assert ActivationStore.open(store.path, expect=provenance()).key == store.key


def test_a_single_class_label_set_is_refused_with_the_task_name(tmp_path):
    one_class = make_records(object_classes=("bird",))
    store = make_store(tmp_path / "s", one_class, planted(one_class))
    with pytest.raises(BadInputError) as err:
        run_layerwise(store, one_class, LayerwiseConfig(**{**CONFIG, "tasks": ("semantic",)}), progress=False)
    assert one_line(err).startswith("semantic: fewer than two classes")


def test_a_class_held_by_one_group_is_dropped_and_documented(records, tmp_path):
    dogs = [rec(f"dog{i}", label="real", cue="none", generator="none", kind="composite", object_id="stamp/dog/0",
                semantic_class="dog", scene_id=f"scene-dog-{i}", source_id=f"photo/dog{i}", split="test")
            for i in range(4)]  # four images of one object: whole groups go to one fold, so no fold can test it
    rows = records + dogs
    store = make_store(tmp_path / "s", rows, planted(rows))
    result = run_layerwise(store, rows, LayerwiseConfig(**{**CONFIG, "tasks": ("semantic",)}), progress=False)
    meta = result.tasks["semantic"]
    assert meta["dropped_classes"] == ["dog"] and "object_id" in meta["dropped_reason"]
    assert set(meta["counts"]) == {"bird", "cat"}


def test_rows_missing_from_the_store_are_named(records, tmp_path):
    store = make_store(tmp_path / "s", records[:-2], planted(records[:-2]))
    with pytest.raises(BadInputError) as err:
        run_layerwise(store, records, LayerwiseConfig(**{**CONFIG, "tasks": ("d1",)}), progress=False)
    assert one_line(err).startswith(f"{records[-2].id}: not captured in the store")


# --- user data without content-aligned pairs; thin automatic tasks; stale results -----------------------


def test_without_d2_pairs_the_confound_probe_uses_every_labelled_image(records, tmp_path):
    """GenImage-like data: no scene ids, hence no D2 pairs; the confound probe still runs, and warns."""
    leaky = [Record(**{**vars(r), "scene_id": None}) for r in encoded_like_genimage(records, tmp_path)]
    store = make_store(tmp_path / "s", leaky, planted(leaky))
    with pytest.warns(UserWarning, match="CONFOUND"):
        result = run_layerwise(store, leaky, LayerwiseConfig(**{**CONFIG, "tasks": ("fake",)}), progress=False)
    assert result.confound["task"] == "fake" and "warning" in result.confound


def test_an_automatic_generator_task_too_thin_to_probe_is_skipped_with_its_reason(tmp_path):
    records = make_records()
    records = [r for r in records if not (r.generator == "esrgan" and r.source_id not in ("photo/01", "photo/02"))]
    store = make_store(tmp_path / "s", records, planted(records))
    result = run_layerwise(store, records, LayerwiseConfig(**{**CONFIG, "generators": True}), progress=False)
    assert "gen:cyclegan" in set(result.curves.task) and "gen:esrgan" not in set(result.curves.task)
    assert "gen:esrgan" in result.tasks["skipped"] and "groups" in result.tasks["skipped"]["gen:esrgan"]


def test_results_are_keyed_by_the_labels_they_were_fit_on(records):
    from probes.layerwise import labels_hash

    relabelled = [Record(**{**vars(r), "label": "fake"}) if r.id == records[0].id else r for r in records]
    regrouped = [Record(**{**vars(r), "source_id": "photo/99"}) if r.id == records[0].id else r for r in records]
    assert len({labels_hash(records), labels_hash(relabelled), labels_hash(regrouped)}) == 3
    assert labels_hash(records) == labels_hash(list(records))
