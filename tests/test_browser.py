"""The web app in a real headless Chromium, used the way a person uses it."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_ui import TEST_PRESETS, app  # noqa: F401 (the launched app is a fixture)

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ASSETS = Path(__file__).resolve().parent.parent / "assets"

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Chromium at /usr/bin/chromium")]


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app):  # noqa: F811
    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page.set_default_timeout(60_000)
    page.goto(app.local_url)
    page.wait_for_selector("#run")
    yield page
    page.close()


def test_upload_run_watch_stop_run_again_and_download(page, tmp_path):
    page.locator("#content input[type=file]").set_input_files(ASSETS / "cat.jpg")
    page.locator("#style input[type=file]").set_input_files(ASSETS / "swirls.jpg")
    page.wait_for_selector("#content img")
    page.wait_for_selector("#style img")

    page.get_by_text("Fine", exact=True).click()  # the test's "fine" preset runs until it is stopped
    page.locator("#run").click()
    pictures = [_picture_changes(page, None)]
    for _ in range(2):  # the picture changes at least twice while it runs
        pictures.append(_picture_changes(page, pictures[-1]))
    assert page.locator("#run").is_disabled() and page.locator("#stop").is_enabled()
    assert "step" in page.locator("#status").inner_text()

    page.locator("#stop").click()
    page.wait_for_function("() => !document.querySelector('#run').disabled")
    assert page.locator("#stop").is_disabled()
    assert page.locator("#result img").get_attribute("src")  # the last picture stays on the page
    assert "Done" not in page.locator("#status").inner_text()
    assert page.locator("#download").is_disabled()

    page.get_by_text("Fast draft", exact=True).click()
    page.locator("#run").click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Done')")
    with page.expect_download() as download:
        page.locator("#download").click()
    assert download.value.suggested_filename == "stylized.png"
    download.value.save_as(tmp_path / "result.png")
    with Image.open(tmp_path / "result.png") as png:
        assert png.format == "PNG" and max(png.size) == TEST_PRESETS["draft"]["size"]  # set by the preset
        assert json.loads(png.text["stylize:settings"])["steps"] == TEST_PRESETS["draft"]["steps"]
    assert page.locator("#history img").count() == 1  # this session's gallery


def test_the_style_goes_only_where_the_region_is_painted(page):
    page.locator("#content input[type=file]").set_input_files(ASSETS / "cat.jpg")
    page.locator("#style input[type=file]").set_input_files(ASSETS / "swirls.jpg")
    page.wait_for_selector("#content img")
    page.get_by_text("Advanced").click()
    page.wait_for_selector("#mask button[aria-label=Undo]:not([disabled])")  # the photo is in the editor
    page.locator("#mask button[aria-label=Brush]").click()
    box = page.locator("#mask canvas").first.bounding_box()  # the photo fills its middle three quarters
    page.mouse.move(box["x"] + box["width"] * 0.15, box["y"] + box["height"] * 0.15)
    page.mouse.down()
    for x in (0.15, 0.2, 0.25, 0.3):  # zigzag over the left part of the photo
        page.mouse.move(box["x"] + box["width"] * x, box["y"] + box["height"] * 0.85)
        page.mouse.move(box["x"] + box["width"] * (x + 0.025), box["y"] + box["height"] * 0.15)
    page.mouse.up()

    page.get_by_text("Fast draft", exact=True).click()
    page.locator("#run").click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Done')")
    result = page.request.get(page.evaluate("() => document.querySelector('#result img').src")).body()
    with Image.open(io.BytesIO(result)) as png, Image.open(ASSETS / "cat.jpg") as photo:
        result = np.asarray(png.convert("RGB"), float)
        photo = np.asarray(photo.convert("RGB").resize(png.size, Image.Resampling.LANCZOS), float)
    change = np.abs(result - photo).mean(axis=(0, 2))  # per column
    third = len(change) // 3
    assert change[-third:].max() < 1  # unpainted: the photo itself
    assert change[:third].mean() > 3  # painted: restyled


def test_an_example_works_with_one_click(page):
    page.locator("table tbody tr").first.click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Done')")
    assert page.locator("#result img").count() == 1
    assert page.locator("#content img").count() == 1 and page.locator("#style img").count() == 1
    page.wait_for_function("() => !document.querySelector('#download').disabled")  # it holds the result


def test_a_mistake_shows_what_to_do_and_leaves_the_page_usable(page):
    page.locator("#run").click()
    page.get_by_text("Add a photo and a style artwork first").wait_for()
    page.wait_for_function("() => !document.querySelector('#run').disabled")
    assert page.locator("#stop").is_disabled()


def test_the_page_says_when_it_runs_on_untrained_features(page):
    notice = page.locator("#notice").inner_text()
    assert "untrained" in notice and "STYLIZE_WEIGHTS" in notice


def _picture_changes(page, previous: str | None) -> str:
    """Wait until the result shows a picture other than `previous`; return its address."""
    page.wait_for_function("previous => { const img = document.querySelector('#result img');"
                           " return img && img.src && img.src !== previous; }", arg=previous)
    return page.evaluate("() => document.querySelector('#result img').src")
