"""The real pictures behind forensic-mini: 71 packaged photos and 227 photo cut-outs ("stamps").

Photos come from scikit-image, scikit-learn and four Debian packages, with the hand-made coarse class
table of the data survey (``/work/shared/research/data.md`` section 1.6; skimage's ``page`` and ``text``
and plasma's painted ``Autumn`` are left out). Stamps are the RGBA photo cut-outs of Debian
``tuxpaint-stamps-default``: the folder is the class, ``*/cartoon/*`` drawings and ``*/toys/*`` (a teddy
bear filed under mammals) are left out.

A photo or stamp that cannot be had is skipped with a one-line reason; the build report lists it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from probes.data.images import open_image, to_rgb
from probes.errors import BadInputError

SCENE_CLASSES = (
    "animal",
    "plant",
    "food",
    "landscape",
    "building",
    "object",
    "person",
    "vehicle",
    "texture",
    "science",
)
OBJECT_CLASSES = (
    "mammal",
    "bird",
    "fish",
    "insect",
    "fruit",
    "vegetable",
    "flower",
    "tree",
    "vehicle",
    "tool",
)
SOURCE_SIDE = 384  # photos are shrunk (never enlarged) to this short side once: crops stay cheap, and
# the smallest crop (0.35) keeps 134 px, more than the 128 px output
STAMP_SIDE = 192  # stamps to this long side: the largest object (1.5 x a 128 px image) needs no more

_CV = "opencv-doc:usr/share/doc/opencv-doc/examples/"
_MATE = "mate-backgrounds:usr/share/backgrounds/mate/nature/"
_KDE = "plasma-workspace-wallpapers:usr/share/wallpapers/"
_PAL = "palapeli-data:usr/share/palapeli/collection/"


def _kde(name: str) -> str:
    return f"{_KDE}{name}/contents/images/2560x1600.jpg"


# photo id -> (scene class, where: "skimage:<function>", "sklearn:<file>" or "<package>:<path>")
PHOTOS: dict[str, tuple[str, str]] = {
    "photo/chelsea": ("animal", "skimage:chelsea"),
    "photo/cv_baboon": ("animal", _CV + "data/baboon.jpg"),
    "photo/cv_butterfly": ("animal", _CV + "data/butterfly.jpg"),
    "photo/cv_chicky_512": ("animal", _CV + "data/chicky_512.png"),
    "photo/cv_hfs000": ("animal", _CV + "hfs/data/000.jpg"),
    "photo/cv_squirrel_cls": ("animal", _CV + "data/squirrel_cls.jpg"),
    "photo/mate_LadyBird": ("animal", _MATE + "LadyBird.jpg"),
    "photo/pal_european-honey-bee": ("animal", _PAL + "european-honey-bee.jpg"),
    "photo/pal_panther-chameleon": ("animal", _PAL + "panther-chameleon-female.jpg"),
    "photo/cv_aloeL": ("plant", _CV + "data/aloeL.jpg"),
    "photo/sklearn_flower": ("plant", "sklearn:flower.jpg"),
    "photo/kde_FallenLeaf": ("plant", _kde("FallenLeaf")),
    "photo/kde_OneStandsOut": ("plant", _kde("OneStandsOut")),
    "photo/mate_Blinds": ("plant", _MATE + "Blinds.jpg"),
    "photo/mate_FreshFlower": ("plant", _MATE + "FreshFlower.jpg"),
    "photo/mate_Garden": ("plant", _MATE + "Garden.jpg"),
    "photo/mate_GreenMeadow": ("plant", _MATE + "GreenMeadow.jpg"),
    "photo/mate_RainDrops": ("plant", _MATE + "RainDrops.jpg"),
    "photo/mate_TwoWings": ("plant", _MATE + "TwoWings.jpg"),
    "photo/mate_YellowFlower": ("plant", _MATE + "YellowFlower.jpg"),
    "photo/coffee": ("food", "skimage:coffee"),
    "photo/cv_apple": ("food", _CV + "data/apple.jpg"),
    "photo/cv_fruits": ("food", _CV + "data/fruits.jpg"),
    "photo/cv_orange": ("food", _CV + "data/orange.jpg"),
    "photo/cv_smarties": ("food", _CV + "data/smarties.png"),
    "photo/pal_citrus-fruits": ("food", _PAL + "citrus-fruits.jpg"),
    "photo/cv_hfs001": ("landscape", _CV + "hfs/data/001.jpg"),
    "photo/cv_hfs002": ("landscape", _CV + "hfs/data/002.jpg"),
    "photo/kde_BytheWater": ("landscape", _kde("BytheWater")),
    "photo/kde_ColdRipple": ("landscape", _kde("ColdRipple")),
    "photo/kde_DarkestHour": ("landscape", _kde("DarkestHour")),
    "photo/kde_EveningGlow": ("landscape", _kde("EveningGlow")),
    "photo/kde_Path": ("landscape", _kde("Path")),
    "photo/mate_Dune": ("landscape", _MATE + "Dune.jpg"),
    "photo/mate_Storm": ("landscape", _MATE + "Storm.jpg"),
    "photo/cv_aero1": ("landscape", _CV + "data/aero1.jpg"),
    "photo/cv_aero3": ("landscape", _CV + "data/aero3.jpg"),
    "photo/sklearn_china": ("building", "sklearn:china.jpg"),
    "photo/cv_building": ("building", _CV + "data/building.jpg"),
    "photo/cv_graf1": ("building", _CV + "data/graf1.png"),
    "photo/cv_leuvenA": ("building", _CV + "data/leuvenA.jpg"),
    "photo/kde_Grey": ("building", _kde("Grey")),
    "photo/pal_castle-maintenon": ("building", _PAL + "castle-maintenon.jpg"),
    "photo/pal_cincinnati-bridge": ("building", _PAL + "cincinnati-bridge.jpg"),
    "photo/clock": ("object", "skimage:clock"),
    "photo/coins": ("object", "skimage:coins"),
    "photo/cv_board": ("object", _CV + "data/board.jpg"),
    "photo/cv_box_in_scene": ("object", _CV + "data/box_in_scene.png"),
    "photo/cv_home": ("object", _CV + "data/home.jpg"),
    "photo/cv_pca_test1": ("object", _CV + "data/pca_test1.jpg"),
    "photo/cv_rubberwhale1": ("object", _CV + "data/rubberwhale1.png"),
    "photo/cv_stuff": ("object", _CV + "data/stuff.jpg"),
    "photo/kde_ColorfulCups": ("object", _kde("ColorfulCups")),
    "photo/kde_Kite": ("object", _kde("Kite")),
    "photo/astronaut": ("person", "skimage:astronaut"),
    "photo/camera": ("person", "skimage:camera"),
    "photo/cv_basketball1": ("person", _CV + "data/basketball1.png"),
    "photo/cv_messi5": ("person", _CV + "data/messi5.jpg"),
    "photo/motorcycle": ("vehicle", "skimage:stereo_motorcycle"),
    "photo/rocket": ("vehicle", "skimage:rocket"),
    "photo/cv_licenseplate_motion": ("vehicle", _CV + "data/licenseplate_motion.jpg"),
    "photo/brick": ("texture", "skimage:brick"),
    "photo/grass": ("texture", "skimage:grass"),
    "photo/gravel": ("texture", "skimage:gravel"),
    "photo/mate_Wood": ("texture", _MATE + "Wood.jpg"),
    "photo/mate_Aqua": ("texture", _MATE + "Aqua.jpg"),
    "photo/cell": ("science", "skimage:cell"),
    "photo/hubble": ("science", "skimage:hubble_deep_field"),
    "photo/immunohistochemistry": ("science", "skimage:immunohistochemistry"),
    "photo/moon": ("science", "skimage:moon"),
    "photo/retina": ("science", "skimage:retina"),
}

STAMP_PACKAGE = "tuxpaint-stamps-default"
_STAMPS = "usr/share/tuxpaint/stamps/"
# object class -> stamp folder (its sub-folders included)
STAMP_FOLDERS = {
    "mammal": "animals/mammals",
    "bird": "animals/birds",
    "fish": "animals/fish",
    "insect": "animals/insects",
    "fruit": "food/fruit",
    "vegetable": "food/vegetables",
    "flower": "plants/flowers",
    "tree": "plants/trees",
    "vehicle": "vehicles",
    "tool": "household/tools",
}
_EXCLUDED = ("cartoon", "toys")


@dataclass(frozen=True)
class Item:
    """A photo or a stamp: its id, class and file (``None`` for a photo scikit-image gives as an array)."""

    id: str
    cls: str
    path: Path | None


def debian_members() -> dict[str, list[str]]:
    """The members each Debian package must give (tar wildcards)."""
    wanted: dict[str, list[str]] = {}
    for _, where in PHOTOS.values():
        pkg, _, path = where.partition(":")
        if pkg not in ("skimage", "sklearn"):  # the others are Debian packages
            wanted.setdefault(pkg, []).append(path)
    wanted[STAMP_PACKAGE] = [f"{_STAMPS}{folder}/*.png" for folder in STAMP_FOLDERS.values()]
    return wanted


def find_items(roots: dict[str, Path]) -> tuple[list[Item], list[Item], dict[str, str]]:
    """``(photos, stamps, skipped)`` given the unpacked package folders; sorted by id."""
    skipped: dict[str, str] = {}
    photos = []
    for pid, (cls, where) in PHOTOS.items():
        pkg, _, path = where.partition(":")
        if pkg == "skimage":
            photos.append(Item(pid, cls, None))
            continue
        if pkg == "sklearn":  # read the file: importing scikit-learn costs a second
            file = package_dir("sklearn") / "datasets" / "images" / path
        elif pkg in roots:
            file = roots[pkg] / path
        else:
            skipped[pid] = f"package {pkg} is unavailable"
            continue
        if file.is_file():
            photos.append(Item(pid, cls, file))
        else:
            skipped[pid] = f"{path} is not in package {pkg}"
    if STAMP_PACKAGE not in roots:
        skipped[STAMP_PACKAGE] = "no stamps: the package is unavailable"
    stamps = _find_stamps(roots[STAMP_PACKAGE]) if STAMP_PACKAGE in roots else []
    return sorted(photos, key=lambda i: i.id), stamps, skipped


def _find_stamps(root: Path) -> list[Item]:
    stamps = []
    for cls, folder in STAMP_FOLDERS.items():
        for png in (root / _STAMPS / folder).rglob("*.png"):
            if not set(png.relative_to(root).parts) & set(_EXCLUDED):
                stamps.append(Item(f"stamp/{cls}/{png.stem}", cls, png))
    return sorted(stamps, key=lambda i: i.id)


def load_photo(item: Item) -> Image.Image:
    """The photo as RGB, shrunk to a short side of at most ``SOURCE_SIDE`` (Lanczos)."""
    if item.path is not None:
        img = to_rgb(open_image(item.path, draft_side=SOURCE_SIDE)[0], item.path)
    else:
        img = _from_array(_skimage(PHOTOS[item.id][1].partition(":")[2]), item.id)
    return _shrink(img, SOURCE_SIDE, min(img.size))


def package_dir(name: str) -> Path:
    """The folder of an installed Python package, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {name} is not installed")
    return Path(spec.submodule_search_locations[0])


def _skimage(name: str) -> np.ndarray:
    import skimage.data

    arr = getattr(skimage.data, name)()
    return arr[0] if isinstance(arr, tuple) else arr  # stereo_motorcycle gives (left, right, disparity)


def _from_array(arr: np.ndarray, where: str) -> Image.Image:
    if arr.dtype != np.uint8:
        raise BadInputError(where, f"expected uint8 pixels, got {arr.dtype}")
    return to_rgb(Image.fromarray(arr), where)


def load_stamp(item: Item) -> Image.Image:
    """The cut-out as RGBA, cropped to its opaque part, at most ``STAMP_SIDE`` on its long side."""
    rgba = open_image(item.path)[0].convert("RGBA")
    rgba = rgba.crop(rgba.getchannel("A").getbbox())
    return _shrink(rgba, STAMP_SIDE, max(rgba.size))


def _shrink(img: Image.Image, limit: int, side: int) -> Image.Image:
    if side <= limit:
        return img
    w, h = img.size
    return img.resize(
        (max(1, round(w * limit / side)), max(1, round(h * limit / side))), Image.Resampling.LANCZOS
    )
