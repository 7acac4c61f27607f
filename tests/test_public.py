"""The app as a public page: no visitor can stall the worker, fill the queue, memory or disk, or use the host's secrets.

One server for the module, launched in-process as app.py launches it, with the default time limit per job and a
token in its environment, attacked through gradio_client, the browser's own protocol and raw HTTP. Each attack
is refused or bounded with a message that says what to do, and the next normal job still runs.
"""

from __future__ import annotations

import io
import json
import math
import threading
import time
import uuid
import zlib
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from helpers import (
    ROOT,
    SECRET,
    SMALL,
    artwork,
    assert_clean,
    browser_run,
    chunk,
    encoded,
    endpoint,
    file_of,
    get,
    join,
    live_app,
    messages,
    normal_job,
    photo,
    png_bomb,
    progressive,
    refused,
    rss,
    upload,
    wait_until,
)
from PIL import Image

import stylize.jobs
import stylize.ui
from stylize import Settings, guard
from stylize.plan import job_work
from stylize.timing import StepSpeed

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with live_app(
        SMALL, tmp_path_factory.mktemp("examples"), max_job_seconds=guard.LIMITS.max_job_seconds, HF_TOKEN=SECRET
    ) as demo:
        yield demo


def cache() -> Path:
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder())


# --- files that would stall the worker or lie about themselves ------------------------------------------------


def metadata_bomb() -> bytes:
    png = encoded(photo(), "PNG")
    bomb = chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"a" * 200_000_000, 9))
    return png[:33] + bomb + png[33:]


def jpeg_header() -> bytes:
    """A JPEG's header claiming 6000x6000 pixels, and its end marker: no image data at all."""
    full = encoded(Image.new("RGB", (6000, 6000), (100, 100, 100)), "JPEG", quality=50)
    start = full.index(b"\xff\xda")
    return full[: start + 2 + int.from_bytes(full[start + 2 : start + 4], "big")] + b"\xff\xd9"


FILES = [
    (
        "scans.jpg",
        lambda: progressive((2000, 2000), repeats=5000),
        "content",
        "The photo is a JPEG in 5010 scans (progressive layers); the limit is 100.",
    ),
    ("comment.png", metadata_bomb, "style", "The style artwork's metadata (text or colour profile) is too large"),
    ("header.jpg", jpeg_header, "content", "The photo file is truncated or corrupt"),
    ("icon.ico", lambda: encoded(Image.new("RGB", (32, 32)), "ICO"), "style", "The style artwork is in ICO format."),
]


@pytest.mark.parametrize(("name", "make", "field", "message"), FILES, ids=[case[0] for case in FILES])
def test_files_that_would_stall_or_fool_the_decoder_are_refused(
    client, good, folder, engine_runs, name, make, field, message
):
    refused(client, good, message, **{field: handle_file(file_of(folder, name, make()))})
    assert len(engine_runs) == 1  # the normal job after it; the refused one never started


def test_a_scan_bomb_as_a_painted_layer_is_refused_too(client, good, folder):
    bomb = file_of(folder, "layer.jpg", progressive((2000, 2000), repeats=5000))
    editor = {"background": handle_file(good[0]), "layers": [handle_file(bomb)], "composite": None}
    refused(client, good, "scans", mask=editor)


# --- one job's size: time, images, pixels ---------------------------------------------------------------------


def test_a_job_over_the_time_limit_is_refused_naming_the_size_that_fits(client, good, engine_runs, monkeypatch):
    with Image.open(good[0]) as image:
        size = image.size
    draft = SMALL["draft"]["steps"]
    # This server's speed as if a 512 px draft took just under the limit.
    per_pixel = guard.LIMITS.max_job_seconds / job_work(size, Settings(size=512, steps=draft)) * 0.999
    monkeypatch.setattr(stylize.jobs.job_clock(), "speed", StepSpeed(fixed=0, per_pixel=per_pixel))
    monkeypatch.setattr(stylize.jobs.job_clock(), "least_work", 0)  # these tiny presets are lighter than its sample
    text = refused(client, good, "A 1024 px picture with the Fast draft preset would take about", size=1024)
    assert "the limit is 5 min. Choose 512 px or less." in text
    assert len(engine_runs) == 1  # only the normal job after it ran


def test_too_many_extra_style_images_or_painted_layers_are_refused_unread(client, good, folder):
    tiny = handle_file(file_of(folder, "tiny.png", encoded(artwork(32, 32), "PNG")))
    refused(client, good, "Use at most 8 more style images; 9 were given.", extra_styles=[{"image": tiny}] * 9)
    refused(
        client,
        good,
        "The painted region may have at most 8 layers; 9 were given.",
        mask={"background": handle_file(good[0]), "layers": [tiny] * 9, "composite": None},
    )


def test_images_with_too_many_pixels_together_are_refused_unread(client, good, folder):
    """Four headers of 6000x6000 pixels, each under the limit for one image, in a few KB each."""
    big = handle_file(file_of(folder, "big.png", png_bomb(6000, 6000)))
    refused(
        client,
        good,
        "These images have 144 megapixels together; one picture may use at most 120.",
        content=big,
        style=big,
        extra_styles=[{"image": big}] * 2,
    )


def vm(field: str) -> int:
    return next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith(field + ":")
    )


def test_large_images_are_shrunk_as_they_are_read_and_memory_returns(client, good, folder, capsys):
    """A job within the limits, with eight 12-megapixel images: each is shrunk as soon as it is decoded, so the
    job never holds them all at full size (8 x 36 MB), and the server's memory returns to its level."""
    flat = file_of(folder, "flat.png", encoded(Image.new("RGB", (4000, 3000), (40, 90, 160)), "PNG"))
    layer = Image.new("RGBA", (4000, 3000), (0, 0, 0, 0))
    layer.paste((255, 77, 77, 153), (0, 0, 2000, 3000))
    painted = file_of(folder, "painted.png", encoded(layer, "PNG"))
    inputs = {
        "content": handle_file(flat),
        "style": handle_file(flat),
        "extra_styles": [{"image": handle_file(flat)}] * 5,
        "mask": {"background": handle_file(flat), "layers": [handle_file(painted)], "composite": None},
    }
    normal_job(client, good)  # warm-up
    before = rss()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the present
    picture, status, *_ = client.predict(**inputs, preset="draft", api_name="/stylize")
    assert "Done" in status
    peak = vm("VmHWM") - before
    after = rss()
    with capsys.disabled():
        print(
            f"\n8 images of 12 megapixels: server memory {before / 2**20:.0f} MB, peak +{peak / 2**20:.0f} MB, "
            f"after {after / 2**20:.0f} MB ({(after - before) / 2**20:+.1f} MB)"
        )
    assert peak < 200 * 2**20  # all eight at full size would be 290 MB
    assert after - before < 32 * 2**20


# --- the queue: one client may not fill it ----------------------------------------------------------------------


@pytest.fixture
def gate(monkeypatch):
    """Jobs start, then wait at the gate until it opens: so they stay in line for as long as a test needs."""
    opened = threading.Event()
    real = stylize.engine.transfer

    def gated(*args, **kwargs):
        steps = real(*args, **kwargs)

        def stream():
            assert opened.wait(timeout=120)
            try:
                yield from steps
            finally:
                steps.close()

        return stream()

    monkeypatch.setattr(stylize.jobs, "transfer", gated)
    yield opened
    opened.set()


def raw_join(base: str, session: str, client_address: str, content: dict, style: dict) -> httpx.Response:
    fn_index, data = endpoint(base)
    data[0], data[1], data[2] = content, style, "draft"
    return httpx.post(
        f"{base}gradio_api/queue/join",
        timeout=60,
        headers={"x-forwarded-for": client_address},
        json={"data": data, "fn_index": fn_index, "session_hash": session, "trigger_id": None},
    )


def test_one_client_may_not_fill_the_queue(app, good, gate, monkeypatch):
    # as if a proxy here told visitors apart
    monkeypatch.setattr(guard, "LIMITS", replace(guard.LIMITS, trusted_proxies="127.0.0.1"))
    base, visitor, neighbour = app.local_url, "151.101.1.1", "151.101.2.2"
    photo_file, art_file = upload(base, good[0]), upload(base, good[1])
    mine = Client(base, verbose=False, headers={"X-Forwarded-For": visitor})
    jobs = [
        mine.submit(content=handle_file(good[0]), style=handle_file(good[1]), preset="draft", api_name="/stylize")
        for _ in range(guard.LIMITS.jobs_per_client)
    ]
    wait_until(
        lambda: stylize.ui._clients_in_line(app.app).count(visitor) == guard.LIMITS.jobs_per_client,
        what="the visitor's jobs to be in line",
    )

    for session in (mine.session_hash, uuid.uuid4().hex):  # the same page, or a new session from the same address
        response = raw_join(base, session, visitor, photo_file, art_file)
        assert response.status_code == 429
        assert response.json()["detail"] == (
            f"You have {guard.LIMITS.jobs_per_client} pictures waiting or being made, "
            "the most one visitor may have; wait for one to finish."
        )
    other = Client(base, verbose=False, headers={"X-Forwarded-For": neighbour})
    theirs = other.submit(content=handle_file(good[0]), style=handle_file(good[1]), preset="draft", api_name="/stylize")
    wait_until(lambda: neighbour in stylize.ui._clients_in_line(app.app), what="the neighbour's job in line")

    gate.set()
    for job in [*jobs, theirs]:
        assert "Done" in job.result(timeout=120)[1]
    session = uuid.uuid4().hex
    assert raw_join(base, session, visitor, photo_file, art_file).status_code == 200  # room again
    with httpx.Client(timeout=120) as http:
        assert any(message["msg"] == "process_completed" for message in messages(http, base, session))


def test_no_route_runs_a_job_around_the_queue(app, good, engine_runs):
    base = app.local_url
    fn_index, data = endpoint(base)
    data[0], data[1], data[2] = upload(base, good[0]), upload(base, good[1]), "draft"
    for route in ("run/stylize", "api/stylize", f"run/predict?fn_index={fn_index}"):
        response = httpx.post(f"{base}gradio_api/{route}", json={"data": data, "fn_index": fn_index}, timeout=60)
        assert response.status_code in (400, 404, 422), (route, response.status_code)
    assert not engine_runs


# --- text and numbers of any length ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            {"style_weights": "1, " + "9" * 300},
            "Style blend weights must be a short text of numbers separated by commas, like 1, 0.5; got '1, 9999",
        ),
        ({"style_weights": "junk " * 50}, "got 'junk junk"),
        ({"size": int("9" * 400)}, "size must be between 64 and"),
        ({"content_strength": 1e308}, "content_strength must be between 0 and 10; got 1e+308."),
    ],
    ids=["weights 300 digits", "weights junk", "size 400 digits", "1e308"],
)
def test_long_values_get_their_own_message_cut_short(client, good, inputs, message):
    text = refused(client, good, message, **inputs)
    assert len(text) < 200


def test_a_huge_request_is_refused_unread(app, client, good):
    fn_index, data = endpoint(app.local_url)
    data[9] = "x" * 40 * 2**20  # 40 MB of style weights
    response = httpx.post(
        f"{app.local_url}gradio_api/queue/join",
        timeout=120,
        json={"data": data, "fn_index": fn_index, "session_hash": uuid.uuid4().hex},
    )
    assert response.status_code == 413 and len(response.content) < 200
    normal_job(client, good)


# --- uploads and the disk ----------------------------------------------------------------------------------------


def files_named(prefix: str) -> list[Path]:
    return [path for path in cache().rglob(f"{prefix}*") if path.is_file()]


def test_one_upload_may_not_carry_a_thousand_files(app, client, good):
    marker = uuid.uuid4().hex[:8]
    files = [("files", (f"{marker}-{i}.png", io.BytesIO(b"x" * 100))) for i in range(1000)]
    response = httpx.post(f"{app.local_url}gradio_api/upload", files=files, timeout=120)
    assert response.status_code == 413 and response.json()["detail"] == "Upload at most 8 files at once."
    assert not files_named(marker)  # none kept
    normal_job(client, good)


def test_what_one_client_uploads_is_bounded(app, client, good, monkeypatch):
    noise = encoded(Image.effect_noise((200, 160), 80).convert("RGB"), "PNG")  # about 100 KB
    monkeypatch.setattr(guard, "LIMITS", replace(guard.LIMITS, client_storage=int(len(noise) * 2.5)))  # room for two
    # as if a proxy here told visitors apart
    monkeypatch.setattr(guard, "LIMITS", replace(guard.LIMITS, trusted_proxies="127.0.0.1"))

    def send(address: str) -> httpx.Response:
        return httpx.post(
            f"{app.local_url}gradio_api/upload",
            files={"files": ("noise.png", noise)},
            timeout=60,
            headers={"x-forwarded-for": address},
        )

    assert [send("151.101.3.3").status_code for _ in range(4)] == [200, 200, 429, 429]
    refusal = send("151.101.3.3").json()["detail"]
    assert refusal.startswith("You have uploaded 0.2 MB in the last ") and "the most one visitor may store" in refusal
    assert send("151.101.4.4").status_code == 200  # another visitor's allowance is their own
    # the default: nobody's X-Forwarded-For is believed
    monkeypatch.setattr(guard, "LIMITS", replace(guard.LIMITS, trusted_proxies=""))
    # Made-up addresses share one allowance (which this module's earlier uploads from here may have used up).
    assert [send(f"151.101.5.{i}").status_code for i in range(4)][2:] == [429, 429]
    monkeypatch.undo()  # this test's uploads from here have used more than that already
    normal_job(client, good)


def test_an_upload_without_a_file_name_or_length_gets_a_clear_refusal(app, client, good):
    for base in sorted({app.local_url, f"http://127.0.0.1:{app.server_port}/"}):  # through Node, and behind it
        nameless = httpx.post(f"{base}gradio_api/upload", files={"files": ("", b"abc")}, timeout=60)
        assert nameless.status_code == 400 and "file part" in nameless.json()["detail"]

        def chunks():
            yield b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\nabc\r\n--x--\r\n'

        chunked = httpx.post(
            f"{base}gradio_api/upload",
            content=chunks(),
            timeout=60,
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
        assert chunked.status_code == 411
    normal_job(client, good)


# --- the host's secrets and paths ----------------------------------------------------------------------------------


def test_no_route_acts_with_the_hosts_hugging_face_token(app, monkeypatch):
    """Gradio reads the host's own token in two places; no route of this app may reach either, whatever Host it
    claims, through the Node server or straight to Python (where gradio's run history would)."""
    import gradio.oauth
    import gradio.workflow

    used = []
    for module, name in ((gradio.workflow, "hf_get_token"), (gradio.oauth, "get_token")):
        monkeypatch.setattr(module, name, lambda *args, **kwargs: used.append(1) or SECRET)
    paths = sorted(
        {
            route.path.replace("{", "").replace("}", "").replace(":path", "")
            for route in app.app.routes
            if hasattr(route, "methods")
        }
    )
    assert not [path for path in paths if "history" in path or path.endswith("/runs")]
    for base in sorted({app.local_url, f"http://127.0.0.1:{app.server_port}/"}):
        for path in [*paths, "/gradio_api/run-history/buckets", "/gradio_api/run-history/records?bucket=me/runs"]:
            for method in ("GET", "POST"):
                try:
                    with httpx.stream(
                        method,
                        base.rstrip("/") + path,
                        headers={"Host": "localhost"},
                        timeout=3,
                        json={} if method == "POST" else None,
                    ) as response:
                        body = next(response.iter_bytes(), b"")
                except httpx.TimeoutException:  # an event stream that waits for events
                    continue
                assert SECRET.encode() not in body, path
    assert not used


def test_the_config_shows_no_install_path_and_analytics_are_off(app):
    config = httpx.get(f"{app.local_url}config", timeout=30)
    assert str(ROOT) not in config.text
    assert config.json()["analytics_enabled"] is False


def test_a_result_records_the_weights_kind_and_no_server_path(app, good):
    done = browser_run(app.local_url, content=upload(app.local_url, good[0]), style=upload(app.local_url, good[1]))
    status, result = get(app.local_url, "/gradio_api/file=" + done["output"]["data"][0]["path"])
    assert status == 200
    with Image.open(io.BytesIO(result)) as png:
        assert json.loads(png.text["stylize:settings"])["weights"] == "auto"
        assert png.text["stylize:weights"] == "untrained"
        assert_clean(" ".join(png.text.values()))


# --- identities nobody can forge ----------------------------------------------------------------------------------


def bases(app) -> list[str]:
    """Through gradio's Node server (with server-side rendering on) and straight to the Python server."""
    return sorted({app.local_url, f"http://127.0.0.1:{app.server_port}/"})


def test_made_up_forwarded_addresses_do_not_make_new_visitors(app, good, gate):
    """With no proxy trusted (the default), a visitor who writes a new X-Forwarded-For on each join is still one
    visitor: the session's (gradio's Node server relays everyone from 127.0.0.1), not one per made-up address."""
    for base in bases(app):
        photo_file, art_file = upload(base, good[0]), upload(base, good[1])
        session = uuid.uuid4().hex
        statuses = [
            raw_join(base, session, f"151.101.7.{i}", photo_file, art_file).status_code
            for i in range(guard.LIMITS.jobs_per_client + 2)
        ]
        assert statuses == [200] * guard.LIMITS.jobs_per_client + [429, 429], base
    gate.set()
    wait_until(lambda: not stylize.ui._clients_in_line(app.app), timeout=180, what="the jobs to finish")


# --- requests gradio's routes would answer with a 500 ----------------------------------------------------------


def test_deeply_nested_json_and_many_ranges_get_an_answer_not_a_500(app, good, capfd):
    uploaded = upload(app.local_url, good[0])["path"]
    for base in bases(app):
        deep = httpx.post(
            f"{base}gradio_api/queue/join",
            content=b"[" * 100_000 + b"]" * 100_000,
            timeout=60,
            headers={"content-type": "application/json"},
        )
        assert deep.status_code == 400 and deep.json()["detail"] == "The request's JSON is nested too deeply."
        ranges = "bytes=" + ",".join(f"{i * 10}-{i * 10 + 5}" for i in range(150))
        whole = httpx.get(f"{base}gradio_api/file={uploaded}", headers={"range": ranges}, timeout=60)
        assert whole.status_code == 200 and whole.content == Path(good[0]).read_bytes()
        one = httpx.get(f"{base}gradio_api/file={uploaded}", headers={"range": "bytes=0-9"}, timeout=60)
        assert one.status_code == 206 and one.content == Path(good[0]).read_bytes()[:10]
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("content", "junk", "The photo or the style artwork sent is not in the form this app takes"),
        ("content", {"path": 5}, "The photo or the style artwork sent"),
        ("extra_styles", "junk", "The extra style images sent"),
        ("extra_styles", [{"bad": 1}], "The extra style images sent"),
        ("mask", "junk", "The painted region sent"),
        ("mask", {"layers": [5]}, "The painted region sent"),
    ],
)
def test_a_malformed_image_gallery_or_region_gets_a_message(app, good, field, value, message):
    base = app.local_url
    session = uuid.uuid4().hex
    with httpx.Client(timeout=120) as http:
        inputs = {"content": upload(base, good[0]), "style": upload(base, good[1]), "preset": "draft", field: value}
        join(http, base, session, **inputs)
        done = next(m for m in messages(http, base, session) if m["msg"] == "process_completed")
    assert done["success"] is False and done["output"]["error"].startswith(message)


# --- decoding and stopping are bounded ----------------------------------------------------------------------------


@pytest.fixture
def decoders(monkeypatch):
    """Each decoding process the app starts; and a file that stalls the decoder gets past the header checks
    (they race the decoder: here they allow any number of scans)."""
    import stylize.decoding
    import stylize.images

    started = []
    take = stylize.decoding.DECODERS.take
    monkeypatch.setattr(stylize.decoding.DECODERS, "take", lambda: started.append(take()) or started[-1])
    monkeypatch.setattr(stylize.images, "MAX_SCANS", 10**6)
    return started


def test_a_file_that_stalls_the_decoder_is_cut_off_and_the_next_job_runs(client, good, folder, decoders, monkeypatch):
    import stylize.decoding

    monkeypatch.setattr(stylize.decoding, "DECODE_SECONDS", 1.5)
    stall = file_of(folder, "stall.jpg", progressive((2000, 2000), repeats=5000))  # 10 s of decoding
    refused(client, good, "The photo takes too long to decode (over 1.5 s)", content=handle_file(stall))
    assert decoders[0].returncode == -9  # killed at its deadline


def test_stop_while_a_file_is_decoded_kills_the_decoder_at_once(client, good, folder, decoders):
    stall = file_of(folder, "stall.jpg", progressive((2000, 2000), repeats=5000))
    job = client.submit(content=handle_file(stall), style=handle_file(good[1]), preset="draft", api_name="/stylize")
    wait_until(lambda: decoders and decoders[0].poll() is None, what="the photo's decoding")
    started = time.monotonic()
    assert job.cancel()
    wait_until(lambda: decoders[0].poll() is not None, timeout=2, what="the decoder to be killed")
    assert time.monotonic() - started < 2 and decoders[0].returncode == -9
    normal_job(client, good)


def test_stop_during_a_long_step_answers_at_once(client, good, engine_runs, monkeypatch):
    """A step of a big job can take many seconds; cancelling the job answers before it ends (gradio_client gives a
    cancel 5 s), and the engine stops at the end of that step."""
    step = threading.Event()
    real = stylize.jobs.transfer

    def slow(*args, **kwargs):
        steps = real(*args, **kwargs)

        def stream():
            try:
                yield next(steps)
                assert step.wait(timeout=120)  # a long step: until the test ends it
                yield from steps
            finally:
                steps.close()

        return stream()

    monkeypatch.setattr(stylize.jobs, "transfer", slow)
    # the fine preset's 5000 steps: minutes, here
    monkeypatch.setattr(guard, "LIMITS", replace(guard.LIMITS, max_job_seconds=math.inf))
    job = client.submit(content=handle_file(good[0]), style=handle_file(good[1]), preset="fine", api_name="/stylize")
    next(iter(job))  # its first picture: the long step has begun
    started = time.monotonic()
    assert job.cancel()
    assert time.monotonic() - started < 2
    step.set()
    assert engine_runs[0]["closed"].wait(timeout=30)
    assert engine_runs[0]["steps"] < SMALL["fine"]["steps"]
    monkeypatch.undo()
    normal_job(client, good)
