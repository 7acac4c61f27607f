"""The app in public: bad input, many users, memory, out-of-memory, file routes, cleanup, and the CLI's part.

One server for the module, launched in-process as app.py launches it (on 127.0.0.1, two jobs at once,
room for two more in the queue), driven through gradio_client and, where a browser's own requests
matter, through plain HTTP. Every refusal asserts the message the user gets, that it holds no host
path or secret, and that the next normal job still succeeds. Every file is made here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError, Status
from helpers import (
    ROOT,
    SECRET,
    SMALL,
    artwork,
    assert_clean,
    browser_run,
    encoded,
    file_of,
    get,
    join,
    live_app,
    messages,
    normal_job,
    photo,
    png_bomb,
    refused,
    rss,
    upload,
    wait_until,
)
from PIL import Image

import stylize.engine
import stylize.jobs
import stylize.objective
import stylize.plan
import stylize.ui
from stylize.cli import main as cli_main
from stylize.vgg import WeightsError

pytestmark = pytest.mark.e2e  # live servers: left out with -m "not e2e"
MEMORY_BOUND = 32 * 2**20  # what 20 jobs may add to the server's resident memory


# --- the server and its inputs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """Two jobs at once, room for two more in the queue, tiny presets, a token in the environment."""
    with live_app(
        SMALL, tmp_path_factory.mktemp("examples"), concurrency=2, STYLIZE_QUEUE_SIZE="2", HF_TOKEN=SECRET
    ) as demo:
        yield demo


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A 'photo' of one dominant colour with a lighter disc, so it has some structure."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.empty((height, width, 3), np.float64)
    pixels[:] = colour
    pixels[(x - width * 0.6) ** 2 + (y - height * 0.45) ** 2 < (height / 4) ** 2] *= 1.15
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def mean_colour(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), np.float64).reshape(-1, 3).mean(0)


# --- what every answer must satisfy --------------------------------------------------------------

# --- the browser's own protocol, for what gradio_client cannot send -------------------------------

# --- bad files ------------------------------------------------------------------------------------


def noise(size: tuple[int, int]) -> Image.Image:
    return Image.effect_noise(size, 60).convert("RGB")


def corrupt_png() -> bytes:
    data = bytearray(encoded(noise((128, 128)), "PNG"))
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # a damaged middle: the checksum no longer matches
    return bytes(data)


BAD_FILES = [
    ("notes.png", lambda: b"shopping list: eggs, flour", "content", "The photo is not an image this app can read"),
    (
        "page.png",
        lambda: b"<!doctype html><html><body><script>alert(1)</script></body></html>",
        "style",
        "The style artwork is not an image this app can read",
    ),
    ("empty.jpg", lambda: b"", "content", "The photo file is empty"),
    ("cut.jpg", lambda: encoded(noise((256, 256)), "JPEG")[:1500], "content", "truncated or corrupt"),
    ("cut.png", lambda: encoded(noise((256, 256)), "PNG")[:3000], "content", "truncated or corrupt"),
    ("damaged.png", corrupt_png, "style", "truncated or corrupt"),
    ("bomb.png", png_bomb, "content", "too many pixels; the limit is 40 megapixels"),
    ("big.png", lambda: png_bomb(7000, 7000), "style", "is 7000x7000 pixels; the limit is 40 megapixels"),
    ("dot.png", lambda: encoded(Image.new("RGB", (1, 1)), "PNG"), "content", "only 1x1 pixels"),
    ("icon.png", lambda: encoded(Image.new("RGB", (8, 8)), "PNG"), "style", "only 8x8 pixels"),
    ("line.png", lambda: encoded(Image.new("RGB", (4000, 10)), "PNG"), "content", "only 4000x10 pixels"),
    ("strip.png", lambda: encoded(Image.new("RGB", (4000, 40)), "PNG"), "content", "Crop it to a less extreme"),
]


@pytest.mark.parametrize(("name", "make", "field", "message"), BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_files_get_a_message_and_the_next_job_runs(client, good, folder, name, make, field, message):
    refused(client, good, message, **{field: handle_file(file_of(folder, name, make()))})


def test_a_bad_extra_style_image_is_named_in_the_message(client, good, folder):
    empty = file_of(folder, "blank.webp", b"")
    refused(client, good, "The extra style image 1 file is empty", extra_styles=[{"image": handle_file(empty)}])


def test_a_bomb_as_the_painted_region_is_refused_before_decoding(client, good, folder):
    bomb = file_of(folder, "layer.png", png_bomb())
    editor = {"background": handle_file(good[0]), "layers": [handle_file(bomb)], "composite": None}
    refused(client, good, "too many pixels", mask=editor)


def exif_rotated() -> bytes:
    image = Image.new("RGB", (64, 32), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 32, 32))  # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the white half belongs on top
    return encoded(image, "JPEG", exif=exif.tobytes())


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (48, 48), colour) for colour in [(240, 20, 20), (20, 20, 240), (20, 240, 20)]]
    return encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def palette_with_transparency() -> bytes:
    image = Image.new("P", (48, 48), 0)
    image.putpalette([30, 160, 90] * 256)
    return encoded(image, "PNG", transparency=0)


UNUSUAL = [
    ("cmyk.jpg", lambda: encoded(Image.new("CMYK", (48, 48), (0, 255, 255, 0)), "JPEG"), (237, 28, 36)),
    ("grey.png", lambda: encoded(Image.new("L", (48, 48), 128), "PNG"), (128, 128, 128)),
    ("palette.png", lambda: encoded(Image.new("RGB", (48, 48), (30, 160, 90)).convert("P"), "PNG"), (30, 160, 90)),
    ("clear_palette.png", palette_with_transparency, (255, 255, 255)),  # transparent: shown on white
    ("deep.png", lambda: encoded(Image.new("I;16", (48, 48), 65535 // 2), "PNG"), (128, 128, 128)),
    ("alpha.png", lambda: encoded(Image.new("RGBA", (48, 48), (255, 0, 0, 0)), "PNG"), (255, 255, 255)),
    ("half_alpha.webp", lambda: encoded(Image.new("RGBA", (48, 48), (0, 0, 255, 128)), "WEBP"), (127, 127, 255)),
    ("animated.gif", lambda: animated("GIF"), (240, 20, 20)),  # the first frame
    ("animated.webp", lambda: animated("WEBP"), (240, 20, 20)),
]


@pytest.mark.parametrize(("name", "make", "colour"), UNUSUAL, ids=[case[0] for case in UNUSUAL])
def test_unusual_images_are_used_as_they_look(client, folder, good, name, make, colour):
    path = file_of(folder, name, make())
    picture, status, *_ = client.predict(
        content=handle_file(path),
        style=handle_file(good[1]),
        preset="draft",
        style_strength=0,
        smoothing=0,
        api_name="/stylize",
    )  # keep the photo
    assert "Done" in status
    assert np.abs(mean_colour(picture) - colour).max() < 40


def test_an_exif_rotated_photo_comes_out_the_right_way_up(client, folder, good):
    path = file_of(folder, "rotated.jpg", exif_rotated())
    picture, status, *_ = client.predict(
        content=handle_file(path),
        style=handle_file(good[1]),
        preset="draft",
        style_strength=0,
        smoothing=0,
        api_name="/stylize",
    )
    with Image.open(picture) as png:
        pixels = np.asarray(png.convert("L"), np.float64)
    assert pixels.shape == (64, 32)  # upright: portrait
    assert pixels[:28].mean() > 200 and pixels[36:].mean() < 50  # the white half on top


# --- numbers through the API ----------------------------------------------------------------------

NUMBERS = [
    ({"size": 32}, "size must be between 64 and 8192; got 32"),
    ({"size": 100_000}, "size must be between 64 and 8192; got 100000"),
    ({"size": -64}, "size must be between 64 and 8192; got -64"),
    ({"size": "huge"}, "size must be a number, got 'huge'"),
    ({"size": [512]}, "size must be a number, got [512]"),  # left out (None), size is the preset's
    ({"style_strength": -1}, "style_strength must be between 0 and 10; got -1"),
    ({"content_strength": 1e308}, "content_strength must be between 0 and 10"),
    ({"smoothing": True}, "smoothing must be a finite number, got True"),
    ({"style_scale": 50}, "style_scale must be between 0.25 and 2; got 50"),
    ({"seed": -1}, "seed must be between 0 and"),  # its top is shown as 2.14748e+09, see settings.format_number
    ({"seed": 2.5}, "seed must be a whole number, got 2.5"),
    ({"preset": "ultra"}, "preset must be one of draft, standard, fine; got 'ultra'"),
    ({"optimizer": "sgd"}, "optimizer must be one of lbfgs, adam; got 'sgd'"),
    ({"preserve_colors": "all"}, "preserve_colors must be one of off, luminance, histogram; got 'all'"),
    ({"style_weights": "1, 500"}, "style_weights must be between 0 and 100; got 500"),
]


@pytest.mark.parametrize(("inputs", "message"), NUMBERS, ids=[f"{k}={v!r}" for i, _ in NUMBERS for k, v in i.items()])
def test_out_of_range_numbers_get_a_message_naming_the_setting(client, good, inputs, message):
    refused(client, good, message, **inputs)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("style_strength", float("nan"), "style_strength must be a finite number, got nan"),
        ("content_strength", float("inf"), "content_strength must be a finite number, got inf"),
        ("size", float("-inf"), "size must be a finite number, got -inf"),
    ],
)
def test_nan_and_infinity_get_a_message(app, client, good, name, value, message):
    """gradio_client cannot send NaN (JSON has none); a browser or a script can: json.dumps writes it."""
    result = browser_run(
        app.local_url, content=upload(app.local_url, good[0]), style=upload(app.local_url, good[1]), **{name: value}
    )
    assert not result["success"]
    assert message in result["output"]["error"]
    assert_clean(result["output"]["error"])
    normal_job(client, good)


def test_a_size_too_small_for_the_photos_shape(client, good, folder):
    panorama = file_of(folder, "panorama.png", encoded(solid((90, 140, 200), (512, 64)), "PNG"))
    refused(client, good, "choose at least 256 px", content=handle_file(panorama), size=64)


# --- many users -----------------------------------------------------------------------------------

COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 220), (230, 210, 40), (200, 60, 210)]


def test_simultaneous_users_each_get_their_own_picture_or_are_told_to_wait(app, good, folder, monkeypatch):
    """Two jobs run at once, two wait in line (and are told their place), a fifth finds the queue full;
    one waiting job is cancelled and never runs; the rest complete, each with its own picture."""
    gate, started = threading.Event(), []
    lock = threading.Condition()
    real = stylize.engine.transfer

    def gated(content, *args, **kwargs):
        steps = real(content, *args, **kwargs)

        def stream():
            with lock:
                started.append(np.asarray(content, np.float64).reshape(-1, 3).mean(0))
                lock.notify_all()
            assert gate.wait(timeout=120)
            try:
                yield from steps
            finally:
                steps.close()

        return stream()

    monkeypatch.setattr(stylize.jobs, "transfer", gated)
    photos = [file_of(folder, f"user{i}.png", encoded(solid(c), "PNG")) for i, c in enumerate(COLOURS)]
    users = [Client(app.local_url, verbose=False) for _ in COLOURS]

    def submit(i: int):
        return users[i].submit(
            content=handle_file(photos[i]), style=handle_file(good[1]), preset="draft", api_name="/stylize"
        )

    try:
        jobs = {0: submit(0), 1: submit(1)}
        with lock:
            assert lock.wait_for(lambda: len(started) == 2, timeout=60)  # both running at once
        jobs[2], jobs[3] = submit(2), submit(3)
        wait_until(lambda: all(jobs[i].status().code == Status.IN_QUEUE for i in (2, 3)), what="two waiting")
        assert sorted(jobs[i].status().rank for i in (2, 3)) == [0, 1]  # told their place in line

        with pytest.raises(QueueError, match="Queue is full"):
            submit(4).result(timeout=60)
        assert jobs[3].cancel()  # leaving the line frees a place
        wait_until(lambda: jobs[3].status().code == Status.CANCELLED, what="cancelled")
        jobs[4] = submit(4)
        wait_until(lambda: jobs[4].status().code == Status.IN_QUEUE, what="fifth waiting")
    finally:
        gate.set()

    for i in (0, 1, 2, 4):
        picture, status, download = jobs[i].result(timeout=120)
        assert "Done" in status
        own = np.linalg.norm(np.array(COLOURS, np.float64) - mean_colour(picture), axis=1)
        assert own.argmin() == i, f"user {i} got a picture nearest user {own.argmin()}'s colour"
    assert len(started) == 4  # the cancelled job never ran
    ran = np.array(started)
    assert all(np.linalg.norm(ran - np.array(COLOURS[3]), axis=1) > 60)


def test_closing_the_tab_frees_the_worker(app, client, good, engine_runs):
    """A browser that goes away mid-run (its event stream and heartbeat close) stops its job at once."""
    base, session = app.local_url, uuid.uuid4().hex
    with httpx.Client(timeout=60) as http:
        heartbeat = http.send(http.build_request("GET", f"{base}gradio_api/heartbeat/{session}"), stream=True)
        join(http, base, session, content=upload(base, good[0]), style=upload(base, good[1]), preset="fine")
        for message in messages(http, base, session):
            if message["msg"] == "process_generating":
                break  # a preview arrived: the run is under way; now the tab closes
        heartbeat.close()
    assert engine_runs and engine_runs[0]["closed"].wait(timeout=60), "the run went on after its page closed"
    assert engine_runs[0]["steps"] < SMALL["fine"]["steps"]
    normal_job(client, good)


# --- memory ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_twenty_jobs_leave_memory_where_it_started(client, good, capsys):
    normal_job(client, good)  # warm-up: models, caches and thread pools exist from here on
    before = rss()
    for seed in range(20):
        picture, status, *_ = client.predict(
            content=handle_file(good[0]), style=handle_file(good[1]), preset="draft", seed=seed, api_name="/stylize"
        )
        assert "Done" in status
    growth = rss() - before
    with capsys.disabled():
        print(
            f"\n20 jobs: server memory {before / 2**20:.0f} MB -> {(before + growth) / 2**20:.0f} MB "
            f"({growth / 2**20:+.1f} MB; bound {MEMORY_BOUND / 2**20:.0f} MB)"
        )
    assert growth < MEMORY_BOUND


# --- out of memory and other failures -------------------------------------------------------------


def test_a_size_too_large_for_free_memory_is_refused_and_smaller_ones_still_run(client, good, monkeypatch):
    monkeypatch.setattr(stylize.plan, "free_memory", lambda device: 2**27)  # 128 MiB free: not even tiles fit
    refused(client, good, "choose a smaller size", size=2048)  # the normal job inside runs under the same limit


def failing_on_second_step(error: BaseException) -> Callable:
    calls = []

    def tv_loss(image):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real(image)

    real = stylize.objective.tv_loss
    return tv_loss


MID_RUN = [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "Ran out of CPU memory at"),
    (
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
            "allocate 4831838208 bytes. Error code 12 (Cannot allocate memory)"
        ),
        "Ran out of CPU memory at",
    ),
    (MemoryError(), "Ran out of CPU memory at"),
    (RuntimeError(f"cannot read {ROOT}/stylize/engine.py with token {SECRET}"), "Try again"),
]


@pytest.mark.parametrize(("error", "message"), MID_RUN, ids=["torch_oom", "cpu_allocator", "memory_error", "bug"])
def test_a_failure_mid_run_gives_a_message_and_frees_the_worker(client, good, engine_runs, monkeypatch, error, message):
    monkeypatch.setattr(stylize.objective, "tv_loss", failing_on_second_step(error))
    with pytest.raises(AppError) as raised:
        client.predict(content=handle_file(good[0]), style=handle_file(good[1]), preset="draft", api_name="/stylize")
    assert message in str(raised.value)
    assert_clean(str(raised.value))
    assert engine_runs[0]["closed"].wait(timeout=30)
    monkeypatch.undo()
    normal_job(client, good)


def test_a_weights_problem_on_the_server_shows_no_server_path(client, good, monkeypatch):
    def broken(*args, **kwargs):
        raise WeightsError(f"Weights file not found: {ROOT}/weights/vgg19.pth. Give a VGG19 .pth file.")

    monkeypatch.setattr(stylize.jobs, "transfer", broken)
    with pytest.raises(AppError) as raised:
        client.predict(content=handle_file(good[0]), style=handle_file(good[1]), preset="draft", api_name="/stylize")
    assert "server" in str(raised.value)
    assert_clean(str(raised.value))
    monkeypatch.undo()
    normal_job(client, good)


def test_nothing_can_park_data_in_server_memory_through_the_mask_editor(app, client, good):
    """The editor's blob route would keep whatever anyone posts, in memory, until a run with its id:
    the page sends painted layers as files, so the route answers no one (components.RegionEditor). The blob is
    small, under the request-size guard, so that the refusal is the editor's own."""
    config = httpx.get(f"{app.local_url}config", timeout=30).json()
    editor = next(c["id"] for c in config["components"] if c["type"] == "imageeditor")
    for session in (client.session_hash, uuid.uuid4().hex):  # a session that has run jobs, and a new one
        response = httpx.post(
            f"{app.local_url}gradio_api/component_server",
            timeout=60,
            files={"file": ("blob.png", encoded(solid((255, 0, 0), (8, 8)), "PNG"), "image/png")},
            data={
                "session_hash": session,
                "component_id": str(editor),
                "fn_name": "accept_blobs",
                "id": uuid.uuid4().hex,
                "type": "background",
                "index": "null",
            },
        )
        assert response.status_code == 404, response.text  # no such function on the component
        assert response.json()["detail"] == "Function not found."
    assert not any(getattr(block, "blob_storage", None) for block in app.blocks.values())
    normal_job(client, good)


# --- files on the server --------------------------------------------------------------------------

TRAVERSALS = [
    "/gradio_api/file=/etc/passwd",
    "/gradio_api/file={secret}",
    "/gradio_api/file=../../../../../../../../etc/passwd",
    "/gradio_api/file=%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/gradio_api/file=..%2f..%2f..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/gradio_api/file=%252e%252e%252f%252e%252e%252f%252e%252e%252fetc%252fpasswd",
    "/gradio_api/file={cache}/../../../../../../../etc/passwd",
    "/gradio_api/file={cache}/..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/gradio_api/file={assets}/../stylize/ui.py",
    "/gradio_api/file={assets}/..%2fapp.py",
    "/gradio_api/file={root}/app.py",
    "/gradio_api/file=app.py",
    "/gradio_api/file=stylize/vgg.py",
    "/gradio_api/file=/proc/self/environ",
    "/gradio_api/file=/proc/self/cwd/app.py",
    "/gradio_api/file=file:///etc/passwd",
    "/gradio_api/file={cache}",
    "/gradio_api/file/etc/passwd",
    "/gradio_api/file//etc/passwd",
    "/gradio_api/file=http://127.0.0.1:{port}/gradio_api/file=/etc/passwd",
    "/gradio_api/proxy=http://127.0.0.1:{port}/gradio_api/file=/etc/passwd",
    "/file=/etc/passwd",
    "/static/../../../../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/assets/..%2f..%2f..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/assets/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc/passwd",
    "/svelte/..%2f..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/_app/..%2f..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/_app/immutable/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/gradio_api/custom_component/x/client/..%2f..%2f..%2f..%2fetc/passwd",
]


def test_the_file_routes_serve_nothing_outside_the_cache_and_assets(app, good, tmp_path):
    from gradio.utils import get_upload_folder

    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    done = browser_run(app.local_url, content=upload(app.local_url, good[0]), style=upload(app.local_url, good[1]))
    picture = done["output"]["data"][0]["path"]  # where the server keeps the result
    # Both doors: the one users knock on (the Node server when it renders pages) and the Python server behind it.
    bases = sorted({app.local_url, f"http://127.0.0.1:{app.server_port}/"})
    markers = [b"root:x:0:0", SECRET.encode(), b"import gradio", b"from __future__", b"HF_TOKEN"]
    for base in bases:
        assert get(base, f"/gradio_api/file={picture}")[0] == 200  # the app's own cache is served...
        assert get(base, f"/gradio_api/file={ROOT / 'assets' / 'cat.jpg'}")[0] == 200  # ...and its assets
        for template in TRAVERSALS:
            path = template.format(
                secret=secret, cache=get_upload_folder(), assets=ROOT / "assets", root=ROOT, port=app.server_port
            )
            status, body = get(base, path)
            assert status != 200 or not any(m in body for m in markers), f"{base}{path} served {body[:80]!r}"
            assert status in (400, 403, 404) or path.startswith("/_app/"), f"{base}{path}: {status}"


@pytest.mark.parametrize(
    "where", ["/etc/passwd", "{private}", "{cache}/../../../../../..{private}", "{assets}/cat.jpg"]
)
def test_a_job_cannot_read_a_server_file_that_was_not_uploaded(app, client, good, tmp_path, where):
    from gradio.utils import get_upload_folder

    private = tmp_path / "private.png"
    solid((10, 200, 10)).save(private)
    path = where.format(private=private, cache=get_upload_folder(), assets=ROOT / "assets")
    result = browser_run(
        app.local_url,
        content={"path": path, "meta": {"_type": "gradio.FileData"}},
        style=upload(app.local_url, good[1]),
    )
    if where.startswith("{assets}"):
        assert result["success"]  # the shipped examples are public; they may be used
    else:
        assert not result["success"]
        assert_clean(str(result["output"]))
    normal_job(client, good)


# --- configured limits and the cache cleanup, through app.py itself -------------------------------

SERVE_APP = """
import runpy, sys
sys.path.insert(0, {root!r})
from stylize.settings import PRESETS
for presets in PRESETS.values():
    presets.update({small!r})
runpy.run_path({app!r}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def configured(tmp_path_factory):
    """app.py in its own process with small limits from the environment: images of 1 MB and 1 megapixel, clips of
    2 MB (the upload cap: the larger), files kept 8 s."""
    folder = tmp_path_factory.mktemp("configured")
    env = {
        **os.environ,
        "STYLIZE_MAX_UPLOAD_MB": "1",
        "STYLIZE_MAX_CLIP_MB": "2",
        "STYLIZE_MAX_MEGAPIXELS": "1",
        "STYLIZE_KEEP_FILES_SECONDS": "8",
        "STYLIZE_MAX_JOB_SECONDS": "inf",
        "GRADIO_TEMP_DIR": str(folder / "cache"),
        "GRADIO_SSR_MODE": "false",
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_EXAMPLES_CACHE": str(folder / "examples"),
    }
    log = folder / "server.log"
    code = SERVE_APP.format(root=str(ROOT), small=SMALL, app=str(ROOT / "app.py"))
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        url = None

        def started() -> bool:
            nonlocal url
            assert server.poll() is None, log.read_text()
            url = next(
                (
                    line.split("URL:")[1].strip()
                    for line in log.read_text().splitlines()
                    if "Running on local URL:" in line
                ),
                None,
            )
            return url is not None

        wait_until(started, timeout=120, what="app.py to start")
        yield url.rstrip("/") + "/", folder / "cache"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_configured_byte_and_pixel_limits(configured, good, folder):
    url, _ = configured
    client = Client(url, verbose=False)
    heavy = file_of(folder, "heavy.png", encoded(noise((700, 700)), "PNG"))  # about 1.4 MB of noise
    assert 2**20 < Path(heavy).stat().st_size < 2 * 2**20
    refused(client, good, "the limit is 1 MB", content=handle_file(heavy))  # uploaded as a clip may be; not decoded
    huge = file_of(folder, "huge.png", encoded(noise((1100, 1100)), "PNG"))  # over any file's limit
    assert Path(huge).stat().st_size > 2 * 2**20
    with pytest.raises(ValueError, match="exceeds the maximum file size of 2097152 bytes"):
        client.predict(content=handle_file(huge), style=handle_file(good[1]), api_name="/stylize")
    with open(huge, "rb") as f:  # a client that does not check first: refused on arrival
        response = httpx.post(f"{url}gradio_api/upload", files={"files": ("huge.png", f)}, timeout=60)
    assert response.status_code == 413 and "2097152 bytes" in response.text

    wide = file_of(folder, "wide.png", encoded(Image.new("RGB", (1200, 1000), (90, 90, 90)), "PNG"))
    refused(client, good, "is 1200x1000 pixels; the limit is 1 megapixels", content=handle_file(wide))


def test_uploads_and_results_are_deleted_after_the_configured_time(configured, good, capsys):
    url, cache = configured
    photo_upload, art_upload = upload(url, good[0]), upload(url, good[1])
    done = browser_run(url, content=photo_upload, style=art_upload)
    assert done["success"]
    files = [Path(photo_upload["path"]), Path(art_upload["path"]), Path(done["output"]["data"][0]["path"])]
    assert all(path.is_relative_to(cache) and path.is_file() for path in files)  # kept while they are needed
    for _ in range(30):  # uploads that no job uses
        response = httpx.post(
            f"{url}gradio_api/upload", timeout=60, files={"files": ("noise.bin", os.urandom(100_000), "image/png")}
        )
        assert response.status_code == 200
    entries = list(cache.rglob("*"))
    size = sum(path.stat().st_size for path in entries if path.is_file())

    wait_until(lambda: not any(p.exists() for p in files), timeout=60, what="the files to be deleted")
    again = browser_run(url, content=photo_upload, style=art_upload)  # a page left open past the cleanup
    assert not again["success"] and "no longer on the server" in again["output"]["error"]
    assert_clean(again["output"]["error"])
    normal_job(Client(url, verbose=False), good)
    # Gradio deletes the files it made; the sweep the folders it made for them (one per file), so the disk
    # comes back to where it started.
    wait_until(lambda: not any(cache.iterdir()), timeout=90, what="the app's folder to be empty")
    with capsys.disabled():
        print(f"\napp's folder: {len(entries)} files and folders, {size / 2**20:.1f} MB -> empty")


# --- the command line -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    photo().save(folder / "photo.jpg")
    artwork().save(folder / "art.png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "cut.jpg").write_bytes(encoded(noise((256, 256)), "JPEG")[:1500])
    (folder / "bomb.png").write_bytes(png_bomb())
    Image.new("RGB", (1, 1)).save(folder / "dot.png")
    Image.new("RGB", (4000, 10)).save(folder / "line.png")
    Image.new("RGB", (4000, 40)).save(folder / "strip.png")
    solid((90, 140, 200), (512, 64)).save(folder / "panorama.png")
    return folder


CLI_CASES = [
    (["{d}/empty.jpg", "{d}/art.png"], "content image file is empty"),
    (["{d}/cut.jpg", "{d}/art.png"], "truncated or corrupt"),
    (["{d}/photo.jpg", "{d}/bomb.png"], "too many pixels"),
    (["{d}/dot.png", "{d}/art.png"], "only 1x1 pixels"),
    (["{d}/line.png", "{d}/art.png"], "only 4000x10 pixels"),
    (["{d}/photo.jpg", "{d}/strip.png"], "Crop it"),
    (["{d}/photo.jpg", "{d}/art.png", "--steps", "-3"], "steps must be between 1 and 5000; got -3"),
    (["{d}/photo.jpg", "{d}/art.png", "--size", "100000"], "size must be between 64 and 8192; got 100000"),
    (["{d}/panorama.png", "{d}/art.png", "--size", "64"], "choose at least 256 px"),
    (["{d}/photo.jpg", "{d}/art.png", "--content-strength", "inf"], "finite"),
]


@pytest.mark.parametrize(("args", "message"), CLI_CASES, ids=[" ".join(a[2:]) or a[0][4:] for a, _ in CLI_CASES])
def test_cli_bad_input_gives_one_line_then_a_normal_run_works(cli_inputs, tmp_path, capsys, args, message):
    out = tmp_path / "out.png"
    assert cli_main([*[a.format(d=cli_inputs) for a in args], "-o", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert not out.exists()
    assert (
        cli_main(
            [str(cli_inputs / "photo.jpg"), str(cli_inputs / "art.png"), "-o", str(out), "--size", "64", "--steps", "2"]
        )
        == 0
    )


def test_cli_out_of_memory_gives_one_line(cli_inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(stylize.plan, "free_memory", lambda device: 2**27)
    out = tmp_path / "big.png"
    assert cli_main([str(cli_inputs / "photo.jpg"), str(cli_inputs / "art.png"), "-o", str(out), "--size", "2048"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "choose a smaller size" in lines[0], lines
    assert not out.exists()
    assert (
        cli_main(
            [str(cli_inputs / "photo.jpg"), str(cli_inputs / "art.png"), "-o", str(out), "--size", "64", "--steps", "2"]
        )
        == 0
    )  # a size that fits, under the same limit


@pytest.mark.parametrize(
    ("variable", "image", "message"),
    [
        ("STYLIZE_MAX_UPLOAD_MB", lambda: noise((700, 700)), "the limit is 1 MB"),
        ("STYLIZE_MAX_MEGAPIXELS", lambda: Image.new("RGB", (1200, 1000), (90, 90, 90)), "the limit is 1 megapixels"),
    ],
)
def test_cli_limits_come_from_the_environment(cli_inputs, variable, image, message):
    path = cli_inputs / f"{variable}.png"
    image().save(path)
    command = [
        sys.executable,
        "-m",
        "stylize",
        str(path),
        str(cli_inputs / "art.png"),
        "-o",
        str(cli_inputs / "never.png"),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, variable: "1"}
    )
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert f"raise the limit: {variable}=" in result.stderr  # on the command line, the files are the user's own


# --- the load test --------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_load_test_completes_every_job_with_bounded_memory(capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import load_test

    with capsys.disabled():
        result = load_test.run(load_test.parser().parse_args(["--clients", "4", "--jobs", "5", "--timeout", "400"]))
    assert result["completed"] == result["jobs"] and result["errors"] == 0 and result["wrong_image"] == 0
    assert result["server_alive"]
    # New sessions and allocator pools for four threads take a one-off step; after that, memory must stay flat.
    by_job = result["rss_by_job"]
    assert result["rss_after"] - result["rss_before"] < 2 * MEMORY_BOUND
    assert max(by_job[len(by_job) // 4 :]) - by_job[len(by_job) // 4] < MEMORY_BOUND, by_job
