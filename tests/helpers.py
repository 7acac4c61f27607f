"""What the tests share: pictures they make, files that attack the app, a live app and ways to talk to it.

Fixtures are in conftest.py; test modules import helpers from here, never from one another.
"""

from __future__ import annotations

import gc
import http.client
import inspect
import io
import json
import math
import struct
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from stylize import Settings
from stylize.images import to_tensor
from stylize.losses import StyleTarget, gaussian, style_loss
from stylize.vgg import feature_extractor


def photo(width: int = 96, height: int = 72) -> Image.Image:
    """A smooth 'photo': a colour gradient with a bright disc, so it has structure to keep."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / width, y / height, 0.5 + 0 * x], axis=-1) * 0.6 + 0.2
    disc = (x - width * 0.6) ** 2 + (y - height * 0.45) ** 2 < (min(width, height) * 0.25) ** 2
    rgb[disc] = (0.95, 0.9, 0.3)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def artwork(width: int = 96, height: int = 96, period: int = 8) -> Image.Image:
    """A busy 'painting': saturated diagonal stripes with a checker, unlike the photo."""
    y, x = np.mgrid[0:height, 0:width]
    stripes = ((x + y) // (period // 2)) % 2
    checks = ((x // period) + (y // period)) % 2
    rgb = np.where(stripes[..., None], (200, 30, 40), (20, 40, 190)) + checks[..., None] * (0, 90, 0)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def style_distance(a: Image.Image, b: Image.Image) -> float:
    """The style loss (summed over the style layers) of image `a` against image `b`, under untrained VGG19."""
    s = Settings()
    vgg = feature_extractor(s.layers, "untrained", "cpu")
    with torch.no_grad():
        fa, fb = vgg(to_tensor(a)), vgg(to_tensor(b.resize(a.size)))
        return sum(style_loss(fa[n], StyleTarget.of(gaussian(fb[n]))).item() for n in s.style_layers)


@contextmanager
def live_app(
    presets: dict, examples: Path, max_job_seconds: float = math.inf, concurrency: int = 1, **env: str
) -> Iterator:
    """The app launched in-process with the options app.py uses (server-side rendering included, where
    Node allows), every device's presets replaced by `presets` and the environment variables `env` set.
    Jobs may take `max_job_seconds` (the tests' "fine" presets run until they are stopped); `concurrency` runs
    go at once (STYLIZE_CONCURRENCY); the other limits come from `env`, as guard.Limits.from_env reads them."""
    from stylize import guard
    from stylize.jobs import job_clock
    from stylize.settings import PRESETS
    from stylize.ui import build_demo, launch_options

    with pytest.MonkeyPatch.context() as patch:
        for kind in PRESETS:
            for name, preset in presets.items():
                patch.setitem(PRESETS[kind], name, preset)
        for name, value in {"GRADIO_EXAMPLES_CACHE": str(examples), **env}.items():
            patch.setenv(name, value)
        # The limits as the app would read them from this environment when it starts.
        patch.setattr(
            guard, "LIMITS", replace(guard.Limits.from_env(), max_job_seconds=max_job_seconds, concurrency=concurrency)
        )
        demo = build_demo()
        demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, **launch_options())
        assert job_clock().timed.wait(timeout=300)  # its sample transfer is not one of the tests' runs
        try:
            yield demo
        finally:
            demo.close()
            if demo.node_process:  # gradio leaves the server-side rendering process running after close()
                demo.node_process.terminate()
                demo.node_process.wait(timeout=10)


def wait_until(condition: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    """Poll `condition` (a server's state seen from outside has no event to wait on) until true or `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


ROOT = Path(__file__).resolve().parent.parent


SMALL = {"draft": {"size": 64, "steps": 4}, "standard": {"size": 64, "steps": 4}, "fine": {"size": 64, "steps": 5000}}


SECRET = "hf_" + uuid.uuid4().hex  # stands for a token in the server's environment


def file_of(folder: Path, name: str, data: bytes) -> str:
    path = folder / name
    path.write_bytes(data)
    return str(path)


def host_strings() -> list[str]:
    from gradio.utils import get_upload_folder

    return [
        str(ROOT),
        tempfile.gettempdir() + "/",
        get_upload_folder(),
        str(Path.home()) + "/",
        sys.prefix,
        "site-packages",
        "Traceback",
        SECRET,
    ]


def assert_clean(message: str) -> None:
    """A message shown to a user names no host path or secret and carries no traceback."""
    leaked = [s for s in host_strings() if s in message]
    assert not leaked, f"{message!r} reveals {leaked}"


def normal_job(client: Client, good: tuple[str, str]) -> None:
    """The next user's ordinary job: it must still work."""
    picture, status, download = client.predict(
        content=handle_file(good[0]), style=handle_file(good[1]), preset="draft", api_name="/stylize"
    )
    assert "Done" in status and download == picture
    with Image.open(picture) as png:
        assert max(png.size) == SMALL["draft"]["size"]


def refused(client: Client, good: tuple[str, str], message: str, **inputs: Any) -> str:
    """Run /stylize with `inputs` over a normal job's; it must fail with `message`, then a normal job must work."""
    arguments = {"content": handle_file(good[0]), "style": handle_file(good[1]), "preset": "draft", **inputs}
    with pytest.raises(AppError) as error:
        client.predict(**arguments, api_name="/stylize")
    text = str(error.value)
    assert message in text
    assert_clean(text)
    normal_job(client, good)
    return text


def endpoint(base: str) -> tuple[int, list[Any]]:
    """The /stylize function's index and its inputs' default values, read from the app's config."""
    config = httpx.get(f"{base}config", timeout=30).json()
    dependency = next(d for d in config["dependencies"] if d.get("api_name") == "stylize")
    values = {c["id"]: c.get("props", {}).get("value") for c in config["components"]}
    return dependency["id"], [values.get(i) for i in dependency["inputs"]]


def upload(base: str, path: str) -> dict:
    with open(path, "rb") as f:
        response = httpx.post(f"{base}gradio_api/upload", files={"files": (Path(path).name, f)}, timeout=60)
    response.raise_for_status()
    return {"path": response.json()[0], "meta": {"_type": "gradio.FileData"}}


def join(http: httpx.Client, base: str, session: str, **inputs: Any) -> None:
    """Put a /stylize job in the queue as the browser does; `inputs` by parameter name, JSON as sent (NaN too)."""
    import stylize.ui  # here: the engine's tests, which import this module too, run without gradio

    fn_index, data = endpoint(base)
    names = list(inspect.signature(stylize.ui.stylize).parameters)
    for name, value in inputs.items():
        data[names.index(name)] = value
    body = json.dumps({"data": data, "fn_index": fn_index, "session_hash": session, "trigger_id": None})
    response = http.post(f"{base}gradio_api/queue/join", content=body, headers={"content-type": "application/json"})
    response.raise_for_status()


def messages(http: httpx.Client, base: str, session: str):
    with http.stream("GET", f"{base}gradio_api/queue/data", params={"session_hash": session}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                yield json.loads(line[5:])


def browser_run(base: str, **inputs: Any) -> dict:
    """One job through the queue protocol; returns its last message (success and output)."""
    session = uuid.uuid4().hex
    with httpx.Client(timeout=120) as http:
        join(http, base, session, **inputs)
        for message in messages(http, base, session):
            if message["msg"] == "process_completed":
                return message
    raise AssertionError("the stream ended without a result")


def rss() -> int:
    """This process's resident memory: the server runs in it."""
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def get(base: str, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as written: no client-side normalisation of ../ or %2e."""
    host, port = base.removeprefix("http://").rstrip("/").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


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


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def progressive(size: tuple[int, int], repeats: int = 0) -> bytes:
    """A progressive JPEG of a flat colour whose last scan is repeated `repeats` more times: each repeat is a
    few bytes that libjpeg decodes over the whole picture (about 2 ms per scan at 4 megapixels)."""
    data = encoded(Image.new("RGB", size, (120, 130, 140)), "JPEG", progressive=True)
    last = data.rindex(b"\xff\xda")
    scan = data[last:-2]  # the last scan's header and data, up to the end-of-image marker
    return data[:-2] + scan * repeats + data[-2:]


# Small presets so a run takes seconds: "fine" runs until it is stopped.
TEST_PRESETS = {
    "draft": {"size": 64, "steps": 4},
    "standard": {"size": 128, "steps": 20},
    "fine": {"size": 128, "steps": 5000},
}


# --- clips ------------------------------------------------------------------------------------------------------


def texture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth random texture (H, W, 3) uint8: features for optical flow to follow everywhere."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))


def pan(frames: int = 5, size: tuple[int, int] = (80, 64), shift: int = 3) -> list[Image.Image]:
    """A camera panning right across a texture: the content moves `shift` px left each frame."""
    width, height = size
    scene = texture(width + shift * frames, height)
    return [Image.fromarray(np.ascontiguousarray(scene[:, k * shift : k * shift + width])) for k in range(frames)]


def write_clip(
    path: Path, pictures: list[Image.Image], rate: int = 12, audio: bool = False, streams: int = 1, **options: Any
) -> Path:
    """An H.264 clip of `pictures` (`streams` copies of the video track), with a sine tone where `audio`."""
    import av

    with av.open(str(path), "w", **options) as container:
        tracks = [container.add_stream("libx264", rate=rate) for _ in range(streams)]
        for track in tracks:
            track.width, track.height, track.pix_fmt = *pictures[0].size, "yuv420p"
        sound = container.add_stream("aac", rate=8000) if audio else None
        for picture in pictures:
            for track in tracks:
                container.mux(track.encode(av.VideoFrame.from_image(picture)))
        for track in tracks:
            container.mux(track.encode(None))
        if sound is not None:
            t = np.arange(8000 * len(pictures) // rate) / 8000
            frame = av.AudioFrame.from_ndarray(
                (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None], format="flt", layout="mono"
            )
            frame.sample_rate = 8000
            container.mux(sound.encode(frame))
            container.mux(sound.encode(None))
    return path


def hold_clip_runs(monkeypatch: pytest.MonkeyPatch, after: int) -> tuple[threading.Event, threading.Event]:
    """Clip jobs that wait once `after` frames are finished until `released` is set: a Stop pressed while one
    waits lands at a known frame. Returns (`made`, set when they are finished; `released`)."""
    import stylize.jobs

    made, released = threading.Event(), threading.Event()
    real = stylize.jobs.transfer_clip

    def held(*args: Any, **kwargs: Any) -> Iterator[Any]:
        with closing(real(*args, **kwargs)) as stream:
            finished = 0
            for progress in stream:
                yield progress
                finished += progress.final
                if finished == after:
                    made.set()
                    released.wait(60)

    monkeypatch.setattr(stylize.jobs, "transfer_clip", held)
    return made, released
