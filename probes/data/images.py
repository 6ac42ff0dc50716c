"""Safe image loading, and the one normalisation every image of the toolkit goes through.

Every image a model sees -- the embedded data set's and the user's -- is RGB uint8, ``size`` x ``size``,
stored as PNG with ``compress_level=0`` and no metadata chunks (IHDR, IDAT, IEND only). Stored zlib blocks
make the file length a function of the pixel size alone, so neither pixel size, colour mode, format nor
byte length can leak the label.

Conversions (``to_rgb``):

- greyscale, bilevel, palette, CMYK, YCbCr: Pillow's conversion to RGB;
- 16-bit (``I;16*``, 32-bit ``I`` holding 16-bit data): the full 0..65535 range scaled to 0..255 (x / 257);
- alpha (RGBA, LA, PA, a palette or grey image with a transparent colour): composited over a fixed white
  background. Alpha is not dropped, because dropping it exposes whatever colour the transparent pixels
  happen to hold;
- the EXIF orientation is applied.

Refused with a one-line :class:`BadInputError` naming the file: a missing path, a folder, a zero-byte file,
a file Pillow cannot identify, truncated or corrupt data, an image with a side under ``min_side`` pixels,
more than ``max_pixels`` pixels (a decompression-bomb guard, checked from the header before decoding),
floating-point images, and modes Pillow cannot turn into RGB.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from probes.errors import BadInputError
from probes.storage import hash_bytes, write_bytes

MIN_SIDE = 8
MAX_PIXELS = 1 << 26  # 67 Mpx: any camera photo passes, a crafted 100k x 100k header does not
BACKGROUND = (255, 255, 255)  # what transparent pixels become
PNG_OPTIONS = {"format": "PNG", "compress_level": 0}
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
T = TypeVar("T")


@dataclass(frozen=True)
class ImageInfo:
    """What the original file was: the ``orig_*`` columns of a manifest row."""

    width: int
    height: int
    format: str
    bytes: int
    sha256: str


def open_image(
    path: str | Path, *, min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS, draft_side: int | None = None
) -> tuple[Image.Image, ImageInfo]:
    """Open and fully decode one image file; refuse bad input with a one-line error naming ``path``.

    ``draft_side`` lets a JPEG decoder shrink by 1/2 to 1/8 (DCT scaling, much faster than decoding in
    full) while the short side stays at least ``draft_side``. The info is always the original's.
    """
    data = _read(Path(path))
    img = _guarded(path, lambda: Image.open(io.BytesIO(data)))
    w, h = img.size
    if w * h > max_pixels:  # checked from the header, before any pixel is decoded
        raise BadInputError(path, f"{w}x{h} px is over the {max_pixels} px limit (decompression-bomb guard)")
    if draft_side is not None and min(w, h) > draft_side:
        scale = draft_side / min(w, h)
        img.draft("RGB", (round(w * scale), round(h * scale)))
    _guarded(path, img.load)
    if min(w, h) < min_side:
        raise BadInputError(path, f"{w}x{h} px is too small (the minimum side is {min_side} px)")
    return img, ImageInfo(w, h, str(img.format), len(data), hash_bytes(data))


def file_info(path: str | Path) -> ImageInfo:
    """The file's size, format, length and hash from its header alone (nothing decoded, no limits)."""
    data = _read(Path(path))
    with _guarded(path, lambda: Image.open(io.BytesIO(data))) as img:
        return ImageInfo(img.width, img.height, str(img.format), len(data), hash_bytes(data))


def _guarded(path: str | Path, step: Callable[[], T]) -> T:
    """Run one Pillow step; its failures become one-line errors naming ``path``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return step()
    except UnidentifiedImageError:
        raise BadInputError(path, "not an image file Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadInputError(path, f"decompression-bomb guard: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadInputError(path, f"truncated or corrupt image data ({e})") from None


def _read(path: Path) -> bytes:
    if not path.exists():
        raise BadInputError(path, "no such file")
    if not path.is_file():
        raise BadInputError(path, "not a file")
    data = path.read_bytes()
    if not data:
        raise BadInputError(path, "empty file (0 bytes)")
    return data


def to_rgb(img: Image.Image, where: str | Path = "image") -> Image.Image:
    """An RGB image of any input mode (see the module docstring for each conversion)."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "F":
        raise BadInputError(where, "floating-point image (mode F) is not supported")
    if img.mode in _SIXTEEN_BIT:
        grey = np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257.0
        return Image.fromarray(np.round(grey).astype(np.uint8)).convert("RGB")
    try:
        if img.mode in _ALPHA or "transparency" in img.info:
            rgba = img.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND), rgba).convert("RGB")
        return img.convert("RGB")
    except ValueError as e:
        raise BadInputError(where, f"cannot convert mode {img.mode} to RGB ({e})") from None


def square(img: Image.Image, size: int) -> Image.Image:
    """Center square crop, then Lanczos resize to ``size`` x ``size``."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))


def load_normalised(path: str | Path, size: int, **limits: int) -> tuple[np.ndarray, ImageInfo]:
    """Open ``path`` safely; return its normalised pixels (``size`` x ``size`` x 3 uint8) and the original's info."""
    img, info = open_image(path, **limits)
    return np.asarray(square(to_rgb(img, path), size)), info


def encode_png(pixels: np.ndarray) -> bytes:
    """The one encoding: PNG, stored zlib blocks, no metadata."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected H x W x 3 uint8 pixels, got {pixels.shape} {pixels.dtype}")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, **PNG_OPTIONS)
    return buf.getvalue()


def write_png(path: str | Path, pixels: np.ndarray) -> ImageInfo:
    """Encode and write atomically; return the written file's info."""
    data = encode_png(pixels)
    write_bytes(path, data)
    h, w = pixels.shape[:2]
    return ImageInfo(w, h, "PNG", len(data), hash_bytes(data))


def read_png(path: str | Path) -> np.ndarray:
    """Pixels of a PNG this module wrote (trusted input: no guards)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))
