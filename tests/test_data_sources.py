"""Sources, block assignment and the Debian fetch's failure message (no build needed)."""

from collections import Counter

import pytest

from probes.data import debian
from probes.data.plan import assign_blocks, block_splits
from probes.data.sources import OBJECT_CLASSES, PHOTOS, SCENE_CLASSES, Item
from probes.errors import UnavailableError


def test_photo_table_matches_the_survey():
    counts = Counter(cls for cls, _ in PHOTOS.values())
    assert counts == {
        "animal": 9,
        "plant": 11,
        "food": 6,
        "landscape": 11,
        "building": 7,
        "object": 10,
        "person": 4,
        "vehicle": 3,
        "texture": 5,
        "science": 5,
    }
    assert set(counts) == set(SCENE_CLASSES)


def test_blocks_are_stratified_and_balanced():
    items = [
        Item(f"x/{c}/{i}", c, None)
        for c, n in zip(OBJECT_CLASSES, (64, 35, 11, 9, 26, 18, 25, 7, 19, 13))
        for i in range(n)
    ]
    blocks = assign_blocks(items, 10, seed=0)
    assert blocks == assign_blocks(list(reversed(items)), 10, seed=0)  # order does not matter
    splits = block_splits(10)
    assert splits == ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    sizes = Counter(blocks.values())
    assert max(sizes.values()) - min(sizes.values()) <= 2
    for cls in OBJECT_CLASSES:  # even the 7 trees reach every split
        assert {splits[blocks[i.id]] for i in items if i.cls == cls} == {"train", "val", "test"}
    mixed = Counter((blocks[i.id], i.cls) for i in items)
    assert all(len({c for (b, c) in mixed if b == block}) >= 5 for block in range(10))


def test_missing_apt_lists_give_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(debian, "debian_dir", lambda: tmp_path)
    monkeypatch.setattr(debian, "APT_LISTS", tmp_path / "lists")
    monkeypatch.setattr(debian.shutil, "which", lambda name: f"/usr/bin/{name}")
    with pytest.raises(UnavailableError, match="run `apt-get update`") as err:
        debian.fetch({"opencv-doc": ["usr/share/doc/x.jpg"]})
    assert "\n" not in str(err.value)
