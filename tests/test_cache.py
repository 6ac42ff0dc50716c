"""The activation store on its own: commits, ordered views, merge, provenance checks (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from probes.cache import ActivationStore, store_key
from probes.errors import BadInputError, ConfigError, ProvenanceError

LAYERS, HIDDEN = 3, 4


def provenance(**changes):
    base = {
        "backbone": {"family": "qwen2_5_vl", "weights": "w0", "dtype": "float32", "device": "cpu"},
        "prompt": "What is in this image? <image>",
        "positions": ["image_mean", "last"],
        "layers": list(range(LAYERS)),
        "store_dtype": "float32",
        "rows": "r0",
        "library_versions": {"torch": "2.13.0"},
    }
    return {**base, **changes}


def rows(ids):
    """Arrays whose values encode the row number, so order mistakes show."""
    n = np.array([int(i[1:]) for i in ids], dtype=np.float32)
    a = np.broadcast_to(n[:, None, None], (len(ids), LAYERS, HIDDEN)) + np.arange(LAYERS)[None, :, None] / 10
    return {"image_mean": a.copy(), "last": -a}


IDS = [f"r{i}" for i in range(7)]


def test_strided_ranks_read_as_one_view_in_manifest_order(tmp_path):
    store = ActivationStore.create(provenance(), IDS, path=tmp_path / "s")
    for rank in (1, 0):
        mine = IDS[rank::2]
        writer = store.writer(rank)
        writer.commit(mine[:2], rows(mine[:2]), {})
        writer.commit(mine[2:], rows(mine[2:]), {})
    assert store.ids == IDS and store.complete
    assert len(store.shard_names()) == 4
    ids, x = store.load("image_mean")
    assert ids == IDS
    np.testing.assert_array_equal(x, rows(IDS)["image_mean"])
    _, x = store.load("last", layers=[0, 2])
    np.testing.assert_array_equal(x, rows(IDS)["last"][:, [0, 2]])


def test_merge_gives_one_memory_map_and_later_shards_merge_again(tmp_path):
    store = ActivationStore.create(provenance(), IDS, path=tmp_path / "s")
    store.writer(0).commit(IDS[:3], rows(IDS[:3]), {})
    store.writer(1).commit(IDS[3:5], rows(IDS[3:5]), {})
    assert store.merge() and store.shard_names() == ["merged-001"]
    assert not store.merge()  # nothing new
    ids, x = store.load("image_mean")
    assert isinstance(x, np.memmap) and ids == IDS[:5]
    _, view = store.load("image_mean", layers=[1, 2])
    assert isinstance(view, np.memmap)  # a contiguous layer range stays a view
    assert not (tmp_path / "s" / "image_mean").exists()  # merged shards are deleted

    store.writer(0).commit(IDS[5:], rows(IDS[5:]), {})  # a resumed run adds rows; its name is new
    assert store.shard_names() == ["merged-001", "rank00-00001"]
    assert store.merge() and store.shard_names() == ["merged-002"]
    assert not (tmp_path / "s" / "merged-001").exists()
    ids, x = store.load("last")
    assert ids == IDS
    np.testing.assert_array_equal(x, rows(IDS)["last"])


def test_an_existing_store_with_other_key_fields_is_refused(tmp_path):
    ActivationStore.create(provenance(), IDS, path=tmp_path / "s")
    for change, field in [
        ({"backbone": {**provenance()["backbone"], "weights": "w1"}}, "backbone.weights"),
        ({"prompt": "Is this image real or fake? <image>"}, "prompt"),
        ({"store_dtype": "float16"}, "store_dtype"),
        ({"layers": [0, 2]}, "layers"),
    ]:
        with pytest.raises(ProvenanceError, match=f"{field} differs") as err:
            ActivationStore.create(provenance(**change), IDS, path=tmp_path / "s")
        assert "\n" not in str(err.value)
    # Recorded-only fields (library versions) do not split the cache.
    same = ActivationStore.create(provenance(library_versions={"torch": "2.14.0"}), IDS, path=tmp_path / "s")
    assert same.key == store_key(provenance())


def test_the_same_rows_twice_are_an_error(tmp_path):
    store = ActivationStore.create(provenance(), IDS, path=tmp_path / "s")
    store.writer(0).commit(IDS[:2], rows(IDS[:2]), {})
    store.writer(1).commit(IDS[1:3], rows(IDS[1:3]), {})
    with pytest.raises(ProvenanceError, match="'r1' is in both rank00-00000 and rank01-00000"):
        store.load("last")


def test_skips_are_recorded_until_the_row_is_captured(tmp_path):
    store = ActivationStore.create(provenance(), IDS[:3], path=tmp_path / "s")
    writer = store.writer(0)
    writer.commit(IDS[:2], rows(IDS[:2]), {"r2": "empty file"})
    assert store.missing == ["r2"] and store.skipped == [{"id": "r2", "reason": "empty file"}]
    store.writer(0).commit(["r2"], rows(["r2"]), {})
    assert store.complete and store.skipped == []


def test_bad_requests_name_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="positions"):
        ActivationStore.create(provenance(positions=["cls"]), IDS, path=tmp_path / "a")
    with pytest.raises(BadInputError, match="duplicate id"):
        ActivationStore.create(provenance(), ["r0", "r0"], path=tmp_path / "b")
    with pytest.raises(BadInputError, match="not an activation store"):
        ActivationStore.open(tmp_path / "nowhere")
    store = ActivationStore.create(provenance(), IDS, path=tmp_path / "c")
    with pytest.raises(BadInputError, match="no rows captured yet"):
        store.load("last")
    store.writer(0).commit(IDS, rows(IDS), {})
    with pytest.raises(ConfigError, match="not in this store"):
        store.load("image_tokens")
    with pytest.raises(ConfigError, match=r"\[7\] not stored"):
        store.load("last", layers=[7])
