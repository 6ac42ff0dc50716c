"""Pixels of forensic-mini's real images, implausible twins and distractors.

A composite starts from a background crop resized exactly like a plain photo crop (Lanczos to the
output size); each stamp is resized (Lanczos, premultiplied alpha), its alpha feathered by the same
half-pixel blur, and alpha-blended in. A plausible composite and its implausible twin go through exactly
this code; only the main object's cue differs.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from probes.data.plan import Crop, Cue, Placement, Scene

LANCZOS = Image.Resampling.LANCZOS
BICUBIC = Image.Resampling.BICUBIC
FEATHER = 0.5  # px of Gaussian blur on the stamp's alpha
GREY_SATURATION = 40  # below this mean HSV saturation (of 255) neither a hue turn nor an inversion shows
DUOTONE = ((20, 90, 0), (255, 60, 230))  # how a near-grey object is dyed: green shadows, magenta lights


def crop_box(size: tuple[int, int], crop: Crop) -> tuple[int, int, int, int]:
    """The crop's pixel box in a source of ``size`` (w, h)."""
    w, h = size
    side = max(1, round(crop.frac * min(w, h)))
    left, top = round(crop.u * (w - side)), round(crop.v * (h - side))
    return left, top, left + side, top + side


def render(scene: Scene, photo: Image.Image, stamps: dict[str, Image.Image], size: int) -> np.ndarray:
    """The scene's pixels, ``size`` x ``size`` x 3 uint8."""
    background = np.asarray(photo.resize((size, size), LANCZOS, box=crop_box(photo.size, scene.crop)))
    if not scene.objects:
        return background
    canvas = background.astype(np.float32)
    for k, placement in enumerate(scene.objects):
        stamp = stamps[placement.stamp]
        if placement.flip:
            stamp = ImageOps.mirror(stamp)
        cue = scene.cue if k == 0 else None
        rgba, centres = _layer(stamp, placement, cue, size)
        for cx, cy in centres:
            _blend(canvas, rgba, cx, cy)
    return np.round(canvas).astype(np.uint8)


def _layer(
    stamp: Image.Image, p: Placement, cue: Cue | None, side: int
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """The object's pixels (its cue applied) and the centres, in px, where they are pasted."""
    centre = [(p.cx * side, p.cy * side)]
    if cue is None:
        return _sized(stamp, p.scale * side), centre
    if cue.kind == "upside_down":
        return _sized(stamp.transpose(Image.Transpose.ROTATE_180), p.scale * side), centre
    if cue.kind == "recolour":
        return _sized(recolour(stamp, cue.hue), p.scale * side), centre
    if cue.kind == "scale":
        return _sized(stamp, cue.scale * side), centre
    rows, cols = cue.grid  # clones: identical copies in a regular grid
    cells = [((c + 0.5) * side / cols, (r + 0.5) * side / rows) for r in range(rows) for c in range(cols)]
    return _sized(stamp, 0.8 * side / max(rows, cols)), cells


def _sized(stamp: Image.Image, long_side: float) -> np.ndarray:
    """Resize so the long side is ``long_side`` px; feather the alpha; float RGBA with alpha in [0, 1]."""
    w, h = stamp.size
    k = long_side / max(w, h)
    img = stamp.resize((max(1, round(w * k)), max(1, round(h * k))), LANCZOS)
    img.putalpha(img.getchannel("A").filter(ImageFilter.GaussianBlur(FEATHER)))
    arr = np.asarray(img, dtype=np.float32)
    arr[..., 3] /= 255.0
    return arr


def _blend(canvas: np.ndarray, rgba: np.ndarray, cx: float, cy: float) -> None:
    """Alpha-blend ``rgba`` centred at ``(cx, cy)`` into ``canvas`` in place, clipped to the canvas."""
    h, w = rgba.shape[:2]
    top, left = round(cy - h / 2), round(cx - w / 2)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, canvas.shape[0]), min(left + w, canvas.shape[1])
    if y0 >= y1 or x0 >= x1:
        return
    part = rgba[y0 - top : y1 - top, x0 - left : x1 - left]
    alpha = part[..., 3:]
    region = canvas[y0:y1, x0:x1]
    region *= 1.0 - alpha
    region += alpha * part[..., :3]


def recolour(stamp: Image.Image, hue: float | None) -> Image.Image:
    """Turn the object's hue by ``hue`` degrees, or invert its colours (``None``).

    A near-grey object shows neither change, so it is dyed in an unnatural duotone instead.
    """
    rgb, alpha = stamp.convert("RGB"), stamp.getchannel("A")
    h, s, v = rgb.convert("HSV").split()
    opaque = np.asarray(alpha) > 127
    if not opaque.any() or np.asarray(s)[opaque].mean() < GREY_SATURATION:
        out = ImageOps.colorize(rgb.convert("L"), black=DUOTONE[0], white=DUOTONE[1])
    elif hue is None:
        out = ImageOps.invert(rgb)
    else:
        turn = round(hue / 360 * 256)
        out = Image.merge("HSV", (h.point(lambda x: (x + turn) % 256), s, v)).convert("RGB")
    out.putalpha(alpha)
    return out


def jpeg_double(pixels: np.ndarray) -> np.ndarray:
    """JPEG at quality 75, then again at 90 (a re-shared photo)."""
    img = Image.fromarray(pixels)
    for quality in (75, 90):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return np.asarray(img)


def resize_roundtrip(pixels: np.ndarray) -> np.ndarray:
    """Bicubic down to half, then back up (a resampled photo; no generator involved)."""
    img = Image.fromarray(pixels)
    w, h = img.size
    return np.asarray(img.resize((w // 2, h // 2), BICUBIC).resize((w, h), BICUBIC))


POSTS = {"jpeg_double": jpeg_double, "resize_roundtrip": resize_roundtrip}
