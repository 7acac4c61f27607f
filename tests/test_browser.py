"""The web app in a real headless Chromium, used the way a person uses it."""

import io
import json
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from helpers import TEST_PRESETS, hold_clip_runs, pan, write_clip
from PIL import Image

import stylize.engine

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ASSETS = Path(__file__).resolve().parent.parent / "assets"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.e2e,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Chromium at /usr/bin/chromium"),
]


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
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


def test_upload_run_watch_stop_keep_the_picture_so_far_run_again_and_download(app, page, tmp_path):  # noqa: F811
    upload_both(page)
    page.get_by_text("Fine", exact=True).click()  # the test's "fine" preset runs until it is stopped
    page.locator("#run").click()
    pictures = [_picture_changes(page, None)]
    for _ in range(2):  # the picture changes at least twice while it runs
        pictures.append(_picture_changes(page, pictures[-1]))
    assert page.locator("#run").is_disabled() and page.locator("#stop").is_enabled()
    assert "step" in page.locator("#status").inner_text()
    step = int(page.locator("#status progress").get_attribute("value"))  # the page draws a bar from the text
    assert step >= 1 and page.locator("#status progress").get_attribute("max") == str(TEST_PRESETS["fine"]["steps"])
    successes = _success_rate(app)

    page.locator("#stop").click()
    page.wait_for_function("() => !document.querySelector('#run').disabled")
    assert page.locator("#stop").is_disabled()
    status = page.locator("#status").inner_text()
    assert re.search(r"Stopped at step \d+ of 5000", status), status  # not the last time left, frozen
    with _download(page, tmp_path / "stopped.png") as png:  # the picture so far, as a PNG with its settings
        assert png.text["stylize:stopped"] == re.search(r"stopped at step \d+ of \d+", status.lower()).group()
        assert json.loads(png.text["stylize:settings"])["steps"] == TEST_PRESETS["fine"]["steps"]
        stopped_size = png.size
    _gallery_holds(page, 1)  # and in the gallery
    caption = page.locator("#history").inner_text()
    assert "stopp" in caption and f"{stopped_size[0]}×{stopped_size[1]} px" in caption  # its size, not the preset's
    assert _success_rate(app) >= (successes or 1)  # a stopped run is not counted as a failure on the API page

    page.get_by_text("Fast draft", exact=True).click()
    page.locator("#run").click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Done')")
    with _download(page, tmp_path / "result.png") as png:
        assert png.format == "PNG" and max(png.size) == TEST_PRESETS["draft"]["size"]  # set by the preset
        assert json.loads(png.text["stylize:settings"])["steps"] == TEST_PRESETS["draft"]["steps"]
        assert "stylize:stopped" not in png.text
    _gallery_holds(page, 2)  # this session's gallery


def test_the_style_goes_only_where_the_region_is_painted(page):
    upload_both(page)
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


def test_an_example_runs_like_a_stylize_press_with_the_chosen_quality(page, tmp_path):
    page.get_by_text("Fine", exact=True).click()
    page.locator("table tbody tr").first.click()
    pictures = [_picture_changes(page, None)]
    pictures.append(_picture_changes(page, pictures[-1]))  # streamed
    assert page.locator("#content img").count() == 1 and page.locator("#style img").count() == 1  # filled in
    assert page.locator("#stop").is_enabled()  # stoppable
    page.locator("#stop").click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Stopped at step')")
    _gallery_holds(page, 1)
    assert "Fine" in page.locator("#history").inner_text()

    page.get_by_text("Fast draft", exact=True).click()
    page.locator("table tbody tr").nth(1).click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Done')")
    draft = TEST_PRESETS["draft"]
    assert f"{draft['steps']} steps" in page.locator("#status").inner_text()  # what ran, as it ran
    with _download(page, tmp_path / "example.png") as png:
        assert max(png.size) == draft["size"] and json.loads(png.text["stylize:settings"])["steps"] == draft["steps"]
        size = png.size
    _gallery_holds(page, 2)
    assert f"Fast draft, {size[0]}×{size[1]} px" in page.locator("#history").inner_text()


def _gallery_holds(page, count: int) -> None:
    """Wait for the session's gallery to show `count` pictures: it is filled by a step after the run's last one."""
    page.wait_for_function(f"() => document.querySelectorAll('#history img').length === {count}")


def test_a_file_that_is_no_image_as_the_photo_is_named_as_the_photo(page, tmp_path):
    (tmp_path / "notes.jpg").write_text("shopping list")
    page.locator("#content input[type=file]").set_input_files(tmp_path / "notes.jpg")
    page.get_by_text("The photo is not an image this app can read").first.wait_for()  # said on upload
    page.locator("#style input[type=file]").set_input_files(ASSETS / "swirls.jpg")
    page.wait_for_selector("#style img")
    page.locator("#run").click()
    page.get_by_text("The photo is not an image this app can read").first.wait_for()
    # the buttons come back and the status is said by two events after the failure, in either order
    page.wait_for_function(
        "() => !document.querySelector('#run').disabled"
        " && document.querySelector('#status').innerText.includes('Not finished')"
    )
    assert "painted region" not in page.locator("body").inner_text()
    status = page.locator("#status").inner_text()
    assert "Starting" not in status and "queue" not in status


def test_in_queue_shows_only_when_someone_is_ahead_and_stop_works_there_too(app, page):  # noqa: F811
    page.evaluate("""() => { window.statuses = [];
        new MutationObserver(() => window.statuses.push(document.querySelector('#status').innerText))
            .observe(document.querySelector('#status'), {subtree: true, childList: true, characterData: true}); }""")
    upload_both(page)
    page.get_by_text("Fast draft", exact=True).click()
    page.locator("#run").click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Done')")
    statuses = page.evaluate("window.statuses")
    assert any("Starting" in status for status in statuses)
    assert not any("queue" in status for status in statuses)  # nobody was ahead

    other = Client(app.local_url, verbose=False).submit(
        content=handle_file(str(ASSETS / "cat.jpg")),
        style=handle_file(str(ASSETS / "dots.jpg")),
        preset="fine",
        api_name="/stylize",
    )
    next(iter(other))  # someone else's run has the one worker
    page.evaluate("window.statuses = []")
    page.locator("#run").click()
    page.wait_for_function("() => window.statuses.some(s => s.includes('In queue'))")
    page.locator("#stop").click()  # while waiting: the run ends as soon as its turn comes
    assert other.cancel()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Stopped before it started')")
    page.wait_for_function("() => !document.querySelector('#run').disabled")


def test_on_a_phone_the_result_comes_into_view_and_fits_the_picture(browser, app):  # noqa: F811
    phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    phone.set_default_timeout(60_000)
    phone.goto(app.local_url)
    phone.wait_for_selector("#run")
    upload_both(phone)
    phone.get_by_text("Fine", exact=True).tap()
    phone.locator("#run").tap()
    _picture_changes(phone, None)
    in_view = """() => ['#result', '#stop', '#status'].every(id => { const box = document.querySelector(id)
        .getBoundingClientRect(); return box.top >= 0 && box.bottom <= window.innerHeight; })"""
    phone.wait_for_function(in_view)  # scrolled there: after Stylize the result, Stop and the status are in view
    frame = phone.locator("#result .image-container").bounding_box()
    picture = phone.locator("#result img").bounding_box()
    assert picture["width"] > 0.9 * frame["width"]  # the landscape picture fills the box's width...
    assert frame["height"] - picture["height"] < 0.1 * frame["height"]  # ...and the box its height: no bands
    phone.locator("#stop").tap()
    phone.wait_for_function("() => document.querySelector('#status').innerText.includes('Stopped')")
    phone.close()


def test_no_label_is_covered(page):
    upload_both(page)
    page.get_by_text("Advanced").click()
    page.wait_for_selector("#mask button[aria-label=Undo]:not([disabled])")  # the photo is in the editor
    label = page.locator("#mask-label").bounding_box()
    for button in page.locator("#mask button").all():
        box = button.bounding_box()
        if box and box["width"]:
            assert not _overlap(label, box), "the editor's toolbar covers its label"
    assert page.evaluate(
        "() => { const p = document.querySelector('#mask-label p'); return p.scrollWidth <= p.clientWidth; }"
    )  # all of it shown, none cut off

    page.get_by_text("Fast draft", exact=True).click()
    page.locator("#run").click()
    page.wait_for_selector("#history img")
    assert not _overlap(
        page.locator("#history label").first.bounding_box(),
        page.locator("#history .thumbnail-item").first.bounding_box(),
    )


def test_the_extra_styles_gallery_asks_for_style_images(page):
    page.get_by_text("Advanced").click()
    invitation = page.locator("#extra-styles [data-testid=upload-text]")
    assert "Drop style images here" in invitation.evaluate("e => getComputedStyle(e, '::after').content")
    assert invitation.evaluate("e => getComputedStyle(e).fontSize") == "0px"  # gradio's "Drop Media Here" is not shown


def test_a_mistake_shows_what_to_do_and_leaves_the_page_usable(page):
    page.locator("#run").click()
    page.get_by_text("Add a photo and a style artwork first").wait_for()
    page.wait_for_function("() => !document.querySelector('#run').disabled")
    assert page.locator("#stop").is_disabled()


def test_the_page_says_when_it_runs_on_untrained_features(page):
    notice = page.locator("#notice").inner_text()
    assert "untrained" in notice and "STYLIZE_WEIGHTS" in notice


def test_make_it_bigger_refines_the_result_shown(page, tmp_path):
    assert not page.locator("#bigger").is_visible()  # no result yet
    upload_both(page)
    page.get_by_text("Fast draft", exact=True).click()
    page.locator("#run").click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Done')")
    with _download(page, tmp_path / "small.png") as png:
        small = png.convert("RGB")
    page.locator("#bigger").click()
    page.wait_for_function("() => !document.querySelector('#status').innerText.includes('Done')")
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Done')")
    with _download(page, tmp_path / "big.png") as png:
        assert max(png.size) == 2 * TEST_PRESETS["draft"]["size"]
        assert json.loads(png.text["stylize:bigger_from"])["size"] == list(small.size)
        shrunk = np.asarray(png.convert("RGB").resize(small.size, Image.Resampling.BOX), np.float64)
    assert np.abs(shrunk - np.asarray(small, np.float64)).mean() < 12  # of 255: that very picture, bigger
    assert page.locator("#bigger").is_visible()  # and again, from the bigger one
    page.wait_for_function("() => document.querySelectorAll('#history img').length == 2")


def upload_both(page) -> None:
    page.locator("#content input[type=file]").set_input_files(ASSETS / "cat.jpg")
    page.locator("#style input[type=file]").set_input_files(ASSETS / "swirls.jpg")
    page.wait_for_selector("#content img")
    page.wait_for_selector("#style img")


def _download(page, path: Path) -> Image.Image:
    """Press Download PNG and open what it gives."""
    page.wait_for_function("() => !document.querySelector('#download').disabled")
    with page.expect_download() as download:
        page.locator("#download").click()
    assert download.value.suggested_filename == "stylized.png"
    download.value.save_as(path)
    return Image.open(path)


def _success_rate(app) -> float | None:  # noqa: F811
    """What the API page shows for /stylize: gradio's share of its runs that did not fail (None before any)."""
    summary = httpx.get(f"http://127.0.0.1:{app.server_port}/monitoring/summary", timeout=30).json()
    return summary["functions"].get("stylize", {}).get("success_rate")


def _overlap(a: dict, b: dict) -> bool:
    return (
        a["x"] < b["x"] + b["width"]
        and b["x"] < a["x"] + a["width"]
        and a["y"] < b["y"] + b["height"]
        and b["y"] < a["y"] + a["height"]
    )


def _picture_changes(page, previous: str | None) -> str:
    """Wait until the result shows a picture other than `previous`; return its address."""
    page.wait_for_function(
        "previous => { const img = document.querySelector('#result img');"
        " return img && img.src && img.src !== previous; }",
        arg=previous,
    )
    return page.evaluate("() => document.querySelector('#result img').src")


def test_a_clip_streams_its_frames_and_the_result_plays(page, tmp_path, monkeypatch):
    monkeypatch.setattr(stylize.engine, "PREVIEW_SECONDS", 0)  # a preview every step, however fast the machine
    clip = write_clip(tmp_path / "pan.mp4", pan(4), audio=True)
    _clip_chosen(page, clip)
    page.evaluate(  # what the status line and the frame showed while it ran
        """() => { window.seen = {statuses: new Set(), frames: new Set()};
          new MutationObserver(() => {
            seen.statuses.add(document.querySelector('#clip-status').innerText);
            const img = document.querySelector('#clip-frame img'); if (img) seen.frames.add(img.src);
          }).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true}); }"""
    )
    page.locator("#clip-run").click()
    page.wait_for_function("() => document.querySelector('#clip-status').innerText.includes('Done')")
    statuses = page.evaluate("() => [...seen.statuses]")
    assert any("Frame 1 of 4" in s for s in statuses) and any("Frame 4 of 4" in s for s in statuses), statuses
    assert page.evaluate("() => seen.frames.size") >= 2  # the frame being made changed as it streamed
    page.wait_for_function(
        "() => { const v = document.querySelector('#clip-result video'); return v && v.readyState >= 2; }"
    )
    assert page.evaluate("() => document.querySelector('#clip-result video').duration") > 0  # it plays
    page.wait_for_function("() => !document.querySelector('#clip-download').disabled")
    with page.expect_download() as download:
        page.locator("#clip-download").click()
    assert download.value.suggested_filename == "stylized.mp4"


def test_stop_keeps_a_shorter_clip_that_plays(page, tmp_path, monkeypatch):
    made_two, released = hold_clip_runs(monkeypatch, after=2)
    clip = write_clip(tmp_path / "pan.mp4", pan(6))  # no sound: its length would be a whole number of AAC frames
    _clip_chosen(page, clip)
    page.locator("#clip-run").click()
    assert made_two.wait(120)
    page.wait_for_function("() => document.querySelector('#clip-status').innerText.includes('Frame 2 of 6')")
    page.locator("#clip-stop").click()
    page.wait_for_function("() => document.querySelector('#clip-stop').disabled")  # the press has reached the server
    released.set()
    page.wait_for_function("() => document.querySelector('#clip-status').innerText.includes('Stopped at frame 3')")
    page.wait_for_function(
        "() => { const v = document.querySelector('#clip-result video'); return v && v.readyState >= 2; }"
    )
    duration = page.evaluate("() => document.querySelector('#clip-result video').duration")
    assert duration == pytest.approx(2 / 12, abs=0.05)  # the two frames made, not the six asked for
    assert not page.locator("#clip-download").is_disabled()


def _clip_chosen(page, clip: Path) -> None:
    """The Video tab with `clip` and the swirls uploaded, at the draft preset."""
    page.get_by_role("tab", name="Video").click()
    page.locator("#clip input[type=file]").set_input_files(clip)
    page.locator("#clip-style input[type=file]").set_input_files(ASSETS / "swirls.jpg")
    page.wait_for_selector("#clip video")
    page.wait_for_selector("#clip-style img")
    page.locator("#video-tab").get_by_text("Fast draft", exact=True).click()
