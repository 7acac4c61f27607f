import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stylize import Settings
from stylize.images import to_tensor
from stylize.losses import StyleTarget, gaussian, style_loss
from stylize.vgg import feature_extractor

# Tests never touch the network: the engine runs on untrained VGG19 features
# unless a test builds its own weights file.
os.environ["STYLIZE_WEIGHTS"] = "untrained"


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


@pytest.fixture
def content_image() -> Image.Image:
    return photo()


@pytest.fixture
def style_image() -> Image.Image:
    return artwork()


def style_distance(a: Image.Image, b: Image.Image) -> float:
    """The style loss (summed over the style layers) of image `a` against image `b`, under untrained VGG19."""
    s = Settings()
    vgg = feature_extractor(s.layers, "untrained", "cpu")
    with torch.no_grad():
        fa, fb = vgg(to_tensor(a)), vgg(to_tensor(b.resize(a.size)))
        return sum(style_loss(fa[n], StyleTarget.of(gaussian(fb[n]))).item() for n in s.style_layers)


@contextmanager
def live_app(presets: dict, examples: Path, max_job_seconds: float = math.inf, concurrency: int = 1,
             **env: str) -> Iterator:
    """The app launched in-process with the options app.py uses (server-side rendering included, where
    Node allows), every device's presets replaced by `presets` and the environment variables `env` set.
    Jobs may take `max_job_seconds` (the tests' "fine" presets run until they are stopped); `concurrency` runs
    go at once (STYLIZE_CONCURRENCY, which the app reads once, when it is imported)."""
    from stylize import guard, ui
    from stylize.settings import PRESETS
    from stylize.ui import build_demo, launch_options

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(guard, "MAX_JOB_SECONDS", max_job_seconds)
        patch.setattr(ui, "CONCURRENCY", concurrency)
        patch.setattr(ui, "RUN_SLOTS", threading.BoundedSemaphore(concurrency))
        for kind in PRESETS:
            for name, preset in presets.items():
                patch.setitem(PRESETS[kind], name, preset)
        for name, value in {"GRADIO_EXAMPLES_CACHE": str(examples), **env}.items():
            patch.setenv(name, value)
        demo = build_demo()
        demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, **launch_options())
        assert ui.job_clock().timed.wait(timeout=300)  # its sample transfer is not one of the tests' runs
        try:
            yield demo
        finally:
            demo.close()
            if demo.node_process:  # gradio leaves the server-side rendering process running after close()
                demo.node_process.terminate()
                demo.node_process.wait(timeout=10)


@pytest.fixture
def engine_runs(monkeypatch):
    """Each engine run the app starts, as {"closed": threading.Event, "steps": int}, in order."""
    import stylize.engine
    import stylize.ui  # imported here, as in live_app: the engine's tests run without gradio

    runs: list[dict] = []
    real = stylize.engine.transfer

    def watched(*args, **kwargs):
        steps = real(*args, **kwargs)  # bad settings raise here, as the real one does
        run = {"closed": threading.Event(), "steps": 0}
        runs.append(run)

        def stream():
            try:
                for progress in steps:
                    run["steps"] = progress.step
                    yield progress
            finally:
                steps.close()
                run["closed"].set()
        return stream()

    monkeypatch.setattr(stylize.ui, "transfer", watched)
    return runs


def wait_until(condition: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    """Poll `condition` (a server's state seen from outside has no event to wait on) until true or `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
