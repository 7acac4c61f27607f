"""The tests' fixtures; what they share besides (pictures, a live app, ways to talk to it) is in helpers.py."""

import os
import threading
from pathlib import Path

import pytest
from gradio_client import Client
from helpers import TEST_PRESETS, artwork, live_app, photo
from PIL import Image

# Tests never touch the network: the engine runs on untrained VGG19 features
# unless a test builds its own weights file.
os.environ["STYLIZE_WEIGHTS"] = "untrained"


@pytest.fixture
def content_image() -> Image.Image:
    return photo()


@pytest.fixture
def style_image() -> Image.Image:
    return artwork()


@pytest.fixture
def engine_runs(monkeypatch):
    """Each engine run the app starts, as {"closed": threading.Event, "steps": int}, in order."""
    import stylize.engine
    import stylize.jobs  # imported here, as in live_app

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

    monkeypatch.setattr(stylize.jobs, "transfer", watched)
    return runs


# --- a live app: test modules that need one with other presets or limits define their own `app` ---------------


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with live_app(TEST_PRESETS, tmp_path_factory.mktemp("examples")) as demo:
        yield demo


@pytest.fixture(scope="module")
def client(app):
    return Client(app.local_url, verbose=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("inputs")


@pytest.fixture(scope="module")
def good(folder):
    """A normal photo and style artwork, uploaded fresh with each job."""
    photo(128, 96).save(folder / "photo.png")
    artwork().save(folder / "art.png")
    return str(folder / "photo.png"), str(folder / "art.png")
