"""Untrusted image files: refused with a clear message, or decoded the right way up in 8-bit RGB."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from stylize import ImageError, load_image
from stylize import images as images_module


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid PNG header claiming a huge greyscale image, with a few KB of compressed zeros."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 64, 9)  # only the first rows: decoding would need 400 MB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


GOOD = Image.new("RGB", (64, 48), (10, 120, 200))


@pytest.mark.parametrize(("name", "data", "message"), [
    ("notes.png", b"just some text, renamed", "not an image"),
    ("page.png", b"<!doctype html><html><body>hi</body></html>", "not an image"),
    ("empty.jpg", b"", "empty"),
    ("cut.jpg", encoded(Image.effect_noise((256, 256), 50).convert("RGB"), "JPEG")[:1500], "truncated or corrupt"),
    ("cut.png", encoded(Image.effect_noise((256, 256), 50).convert("RGB"), "PNG")[:3000], "truncated or corrupt"),
    ("bomb.png", png_bomb(), "megapixels"),
    ("tiny.png", encoded(Image.new("RGB", (1, 1)), "PNG"), "at least 16 pixels"),
    ("small.png", encoded(Image.new("RGB", (8, 8)), "PNG"), "at least 16 pixels"),
    ("thin.png", encoded(Image.new("RGB", (4000, 10)), "PNG"), "at least 16 pixels"),
    ("strip.png", encoded(Image.new("RGB", (4000, 40)), "PNG"), "Crop it"),
    ("icon.ico", encoded(Image.new("RGB", (32, 32)), "ICO"), "ICO file"),
])
def test_bad_files_are_refused_with_a_message_that_says_what_to_do(tmp_path, name, data, message):
    path = write(tmp_path, name, data)
    with pytest.raises(ImageError, match=message):
        load_image(path)
    with pytest.raises(ImageError, match=message):
        load_image(data)


def test_a_bomb_is_refused_before_any_pixel_is_decoded(tmp_path):
    assert len(png_bomb()) < 100_000
    # Between Pillow's own hard limit and ours: refused by our check, from the header alone.
    with pytest.raises(ImageError, match="7000x7000"):
        load_image(write(tmp_path, "bomb.png", png_bomb(7000, 7000)))


def test_files_over_the_byte_limit_are_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(images_module, "MAX_BYTES", 1000)
    path = write(tmp_path, "big.png", encoded(Image.effect_noise((128, 128), 80).convert("RGB"), "PNG"))
    with pytest.raises(ImageError, match="limit is"):
        load_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "nope.jpg")


def rgb(path) -> np.ndarray:
    image = load_image(path)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


@pytest.mark.parametrize(("image", "fmt", "expected"), [
    (Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", (237, 28, 36)),  # CMYK red, roughly
    (Image.new("L", (32, 32), 128), "PNG", (128, 128, 128)),
    (Image.new("P", (32, 32), 0), "PNG", (0, 0, 0)),
    (Image.new("RGBA", (32, 32), (255, 0, 0, 0)), "PNG", (255, 255, 255)),  # transparent: white
    (Image.new("RGBA", (32, 32), (255, 0, 0, 255)), "WEBP", (255, 0, 0)),
    (Image.new("LA", (32, 32), (0, 255)), "PNG", (0, 0, 0)),
    (Image.new("I;16", (32, 32), 65535 // 2), "PNG", (128, 128, 128)),  # 16-bit: scaled, not clipped
])
def test_unusual_modes_decode_to_sensible_rgb(tmp_path, image, fmt, expected):
    pixels = rgb(write(tmp_path, f"x.{fmt.lower()}", encoded(image, fmt)))
    assert np.abs(pixels.reshape(-1, 3).mean(0) - expected).max() < 40


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animations_give_their_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (32, 32), colour) for colour in [(250, 0, 0), (0, 0, 250), (0, 250, 0)]]
    data = encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    pixels = rgb(write(tmp_path, f"anim.{fmt.lower()}", data))
    assert pixels[..., 0].mean() > 200 and pixels[..., 2].mean() < 50


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 30), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 30, 30))  # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    loaded = load_image(write(tmp_path, "rotated.jpg", encoded(image, "JPEG", exif=exif.tobytes())))
    assert loaded.size == (30, 60)
    top, bottom = np.asarray(loaded)[:30].mean(), np.asarray(loaded)[30:].mean()
    assert top > 200 and bottom < 50  # the white left half is now on top


def test_a_good_image_loads_unchanged(tmp_path):
    assert np.array_equal(rgb(write(tmp_path, "good.png", encoded(GOOD, "PNG"))), np.asarray(GOOD))
