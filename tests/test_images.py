"""Untrusted image files: refused with a clear message, or decoded the right way up in 8-bit RGB."""

import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import chunk, encoded, png_bomb, progressive
from PIL import Image

from stylize import ImageError, decoding, load_image
from stylize import images as images_module


def write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


GOOD = Image.new("RGB", (64, 48), (10, 120, 200))


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
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
        ("icon.ico", encoded(Image.new("RGB", (32, 32)), "ICO"), "in ICO format"),
    ],
)
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


@pytest.mark.parametrize(
    ("image", "fmt", "expected"),
    [
        (Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", (237, 28, 36)),  # CMYK red, roughly
        (Image.new("L", (32, 32), 128), "PNG", (128, 128, 128)),
        (Image.new("P", (32, 32), 0), "PNG", (0, 0, 0)),
        (Image.new("RGBA", (32, 32), (255, 0, 0, 0)), "PNG", (255, 255, 255)),  # transparent: white
        (Image.new("RGBA", (32, 32), (255, 0, 0, 255)), "WEBP", (255, 0, 0)),
        (Image.new("LA", (32, 32), (0, 255)), "PNG", (0, 0, 0)),
        (Image.new("I;16", (32, 32), 65535 // 2), "PNG", (128, 128, 128)),  # 16-bit: scaled, not clipped
    ],
)
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


def test_a_format_this_app_does_not_take_is_named_without_a_wrong_article(tmp_path):
    for fmt in ("ICO", "TGA"):
        with pytest.raises(ImageError) as error:
            load_image(encoded(Image.new("RGB", (32, 32)), fmt))
        assert f"in {fmt} format" in str(error.value) and f" a {fmt}" not in str(error.value)


@pytest.mark.parametrize("where", ["before the pixels", "after the pixels"])
@pytest.mark.parametrize(
    ("kind", "prefix"), [(b"zTXt", b"Comment\0\0"), (b"iTXt", b"Comment\0\1\0\0\0"), (b"iCCP", b"profile\0\0")]
)
def test_a_metadata_bomb_is_refused_as_metadata_too_large(kind, prefix, where):
    """A compressed text or colour-profile chunk of 200 KB that would inflate to 200 MB."""
    bomb = chunk(kind, prefix + zlib.compress(b"a" * 200_000_000, 9))
    png = encoded(GOOD, "PNG")
    at = 33 if where == "before the pixels" else png.index(b"IEND") - 4  # after IHDR, or before IEND
    with pytest.raises(ImageError, match="metadata .* is too large"):
        load_image(png[:at] + bomb + png[at:])


def test_a_progressive_jpeg_with_thousands_of_scans_is_refused_before_decoding(tmp_path, monkeypatch):
    bomb = progressive((2000, 2000), repeats=5000)  # about 10 s of decoding
    assert len(bomb) < 100_000
    decoded = []
    monkeypatch.setattr(images_module, "decode", lambda *args, **kwargs: decoded.append(args))
    with pytest.raises(ImageError, match=r"5010 scans .* the limit is 100"):
        load_image(write(tmp_path, "bomb.jpg", bomb))
    with pytest.raises(ImageError, match="scans"):
        images_module.image_size(bomb)
    assert not decoded


def test_ordinary_progressive_and_multi_scan_jpegs_load():
    assert load_image(progressive((64, 48))).size == (64, 48)
    assert load_image(progressive((64, 48), repeats=80)).size == (64, 48)  # odd but harmless: under the limit
    cmyk = encoded(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", progressive=True)
    assert load_image(cmyk).size == (32, 32)


def test_a_jpeg_header_without_image_data_is_refused_as_truncated():
    """Pillow decodes a header claiming 6000x6000 followed by the end marker to a flat grey picture."""
    full = encoded(Image.new("RGB", (6000, 6000), (100, 100, 100)), "JPEG", quality=50)
    start = full.index(b"\xff\xda")
    header = full[: start + 2 + int.from_bytes(full[start + 2 : start + 4], "big")]
    for data in (header + b"\xff\xd9", header + b"\x12\x34" * 8 + b"\xff\xd9"):
        assert len(data) < 1000
        with pytest.raises(ImageError, match="truncated or corrupt"):
            load_image(data)


def test_a_large_image_is_shrunk_as_it_is_read(tmp_path):
    path = write(tmp_path, "big.png", encoded(Image.new("RGB", (3000, 1000), (200, 10, 10)), "PNG"))
    small = load_image(path, max_side=300)
    assert small.size == (300, 100) and small.getpixel((150, 50)) == (200, 10, 10)
    assert load_image(path, max_side=5000).size == (3000, 1000)  # never enlarged
    assert images_module.image_size(path) == (3000, 1000)


def test_the_opacity_of_a_painted_layer():
    layer = Image.new("RGBA", (80, 40), (0, 0, 0, 0))
    layer.paste((255, 77, 77, 153), (0, 0, 40, 40))  # the left half, painted at 60 % opacity
    opacity = images_module.load_opacity(encoded(layer, "PNG"), "painted region", (40, 20))
    assert opacity.mode == "L" and opacity.size == (40, 20)
    assert opacity.getpixel((5, 10)) == 255 and opacity.getpixel((35, 10)) == 0


# --- decoding itself is bounded ------------------------------------------------------------------------------


@pytest.fixture
def decoders(monkeypatch):
    """The decoding processes this test starts, in order; a stall that the header checks let through (they race
    the decoder: here they are told to allow any number of scans)."""
    started = []
    take = decoding.DECODERS.take

    def watched():
        started.append(take())
        return started[-1]

    monkeypatch.setattr(decoding.DECODERS, "take", watched)
    monkeypatch.setattr(images_module, "MAX_SCANS", 10**6)
    return started


def limits(pid: int) -> dict[str, str]:
    rows = Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]
    return {row[:26].strip(): row[26:47].strip() for row in rows}


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


STALL = progressive((2000, 2000), repeats=5000)  # about 10 s of decoding, in a few kilobytes


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc")
def test_a_file_that_stalls_the_decoder_is_killed_at_its_deadline(decoders, monkeypatch):
    monkeypatch.setattr(decoding, "DECODE_SECONDS", 1.5)
    seen = {}

    def look():  # the child's own limits once it has read its request, while it decodes
        while not decoders:
            time.sleep(0.01)
        while not gone(decoders[0].pid) and seen.get("Max cpu time", "unlimited") == "unlimited":
            seen.update(limits(decoders[0].pid))
            time.sleep(0.02)

    watcher = threading.Thread(target=look)
    watcher.start()
    started = time.monotonic()
    with pytest.raises(ImageError, match=r"takes too long to decode \(over 1.5 s\)"):
        load_image(STALL, "photo")
    assert time.monotonic() - started < 3
    watcher.join()
    assert seen["Max cpu time"] != "unlimited" and int(seen["Max cpu time"]) <= 4
    assert seen["Max address space"] != "unlimited"
    assert decoders[0].returncode == -9 and gone(decoders[0].pid)  # killed, reaped: no CPU spent after its job


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc")
def test_stopping_a_job_kills_its_decoding_at_once(decoders):
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    with pytest.raises(ImageError, match="Stopped while reading the photo"):
        load_image(STALL, "photo", stop=stop)
    assert decoders[0].returncode == -9 and gone(decoders[0].pid)


def test_a_decoder_past_its_memory_cap_is_refused(decoders, monkeypatch):
    monkeypatch.setattr(decoding, "DECODE_MEMORY", 2**20)
    with pytest.raises(ImageError, match="more time or memory"):
        load_image(encoded(Image.effect_noise((3000, 3000), 50), "PNG"))


def test_ordinary_decoding_costs_little_more_than_decoding_in_process():
    data = encoded(Image.effect_noise((512, 512), 50).convert("RGB"), "PNG")
    load_image(data)  # the first starts a decoder; the next finds one ready
    time.sleep(1)
    started = time.monotonic()
    assert load_image(data).size == (512, 512)
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("mode", ["F", "I"])
def test_32_bit_tiffs_decode_scaled(tmp_path, mode):
    values = np.linspace(0, 200, 64 * 48, dtype=np.float32).reshape(48, 64)
    image = Image.fromarray(values if mode == "F" else values.astype(np.int32))
    assert image.mode == mode
    for source in (encoded(image, "TIFF"), image):  # a file, and a picture already open
        loaded = np.asarray(load_image(source))
        assert loaded.shape == (48, 64, 3) and loaded[0, 0, 0] == 0 and loaded[-1, -1, 0] == 200
