"""Safe loading and the one normalisation: bad input gets a one-line error naming the file."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from probes.data.images import encode_png, file_info, load_normalised, open_image
from probes.errors import BadInputError


def _png_header_only(path, width, height):
    """A PNG that claims width x height in its header and holds almost no data."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )
    return path


def _truncated_jpeg(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        path, quality=90
    )
    path.write_bytes(path.read_bytes()[:800])
    return path


BAD = {
    "missing": (lambda p: p / "nope.png", "no such file"),
    "folder": (lambda p: p, "not a file"),
    "zero-byte": (lambda p: (p / "empty.png").write_bytes(b"") and None or p / "empty.png", "empty file"),
    "not an image": (
        lambda p: (p / "notes.jpg").write_text("hello") and None or p / "notes.jpg",
        "not an image",
    ),
    "truncated": (lambda p: _truncated_jpeg(p / "cut.jpg"), "truncated or corrupt"),
    "1x1": (lambda p: Image.new("RGB", (1, 1)).save(p / "dot.png") or p / "dot.png", "too small"),
    "bomb": (lambda p: _png_header_only(p / "bomb.png", 100_000, 100_000), "decompression-bomb"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_one_line_error_naming_the_file(tmp_path, case):
    make, reason = BAD[case]
    path = make(tmp_path)
    with pytest.raises(BadInputError) as err:
        load_normalised(path, 32)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message
    assert reason in message


def test_pixel_cap_is_checked_before_decoding(tmp_path):
    Image.new("RGB", (200, 200)).save(tmp_path / "big.png")
    with pytest.raises(BadInputError, match="decompression-bomb"):
        open_image(tmp_path / "big.png", max_pixels=10_000)


def _normalised(tmp_path, img, name="x.png", size=16, **save):
    path = tmp_path / name
    img.save(path, **save)
    return load_normalised(path, size)[0]


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[:, :10] = (255, 0, 0, 255)  # left half opaque red, right half transparent black
    out = _normalised(tmp_path, Image.fromarray(rgba, "RGBA"), size=20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert tuple(out[10, 2]) == (255, 0, 0)
    assert tuple(out[10, 17]) == (255, 255, 255)


def test_palette_with_transparency_and_grey_alpha(tmp_path):
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0])
    pal.putpixel((0, 0), 1)
    out = _normalised(tmp_path, pal, transparency=0)
    assert tuple(out[8, 8]) == (255, 255, 255) and tuple(out[0, 0]) == (0, 255, 0)
    la = Image.new("LA", (16, 16), (0, 0))
    assert tuple(_normalised(tmp_path, la, "la.png")[3, 3]) == (255, 255, 255)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    grey = np.full((16, 16), 65535, np.uint16)
    grey[:8] = 257 * 100
    out = _normalised(tmp_path, Image.fromarray(grey))
    assert tuple(out[12, 0]) == (255, 255, 255)
    assert tuple(out[2, 0]) == (100, 100, 100)


def test_sixteen_bit_colour_png(tmp_path):
    cv2 = pytest.importorskip("cv2")
    bgr = np.zeros((16, 16, 3), np.uint16)
    bgr[..., 2], bgr[..., 1] = 65535, 257 * 100
    cv2.imwrite(str(tmp_path / "rgb16.png"), bgr)
    assert tuple(load_normalised(tmp_path / "rgb16.png", 8)[0][0, 0]) == (255, 100, 0)


def test_cmyk_greyscale_and_bilevel_become_rgb(tmp_path):
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    assert tuple(_normalised(tmp_path, cmyk, "c.jpg", quality=100)[8, 8]) == pytest.approx((255, 0, 0), abs=3)
    assert tuple(_normalised(tmp_path, Image.new("L", (16, 16), 77), "l.png")[0, 0]) == (77, 77, 77)
    assert tuple(_normalised(tmp_path, Image.new("1", (16, 16), 1), "b.png")[0, 0]) == (255, 255, 255)


def test_center_square_crop_and_resize(tmp_path):
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = 255  # the center square is white, the sides black
    out = _normalised(tmp_path, Image.fromarray(wide), size=10)
    assert out.shape == (10, 10, 3)
    assert out[:, 1:-1].min() >= 250 and out.min() > 200  # Lanczos reaches a little past the box edge


def test_one_encoding_one_length(tmp_path):
    rng = np.random.default_rng(0)
    lengths = {len(encode_png(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))) for _ in range(3)}
    lengths.add(len(encode_png(np.zeros((128, 128, 3), np.uint8))))
    assert len(lengths) == 1
    (tmp_path / "a.png").write_bytes(encode_png(np.zeros((128, 128, 3), np.uint8)))
    info = file_info(tmp_path / "a.png")
    assert (info.width, info.height, info.format, info.bytes) == (128, 128, "PNG", lengths.pop())
