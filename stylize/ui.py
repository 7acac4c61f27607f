"""The web app's page: `build_demo()` returns the Gradio Blocks, `launch_options()` the arguments for its launch().

With stylize.components (the app's gradio components), the only module that imports gradio. Every control takes
its default, range, label and help text from `stylize.settings`; a job's work (its inputs read, the engine run,
the status line, the PNG) is stylize.jobs', gradio-free; the page turns its frames into a picture and a status
line; nothing here knows about tensors.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, contextmanager
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image
from starlette.middleware import Middleware  # gradio's web framework

from . import guard, jobs
from .components import (
    Page,
    Radio,
    RegionEditor,
    Slider,
    clip_input,
    image_input,
    setting_number,
    setting_radio,
    setting_slider,
)
from .images import MAX_BYTES, ImageError, image_size
from .jobs import BIGGER_HELP, PRESET_LABELS, WEIGHTS_TEXT_LENGTH, api_clip_help, api_help, device_kind, job_clock
from .link_preview import ASSETS, DESCRIPTION, TITLE, LinkPreview
from .settings import PRESET_NAMES, PRESETS, Settings, SettingsError, knob
from .ssr import SSR_NODE_MAJOR, ssr_available, ssr_check
from .timing import TimeLeft
from .vgg import UntrainedWeightsWarning, WeightsError, resolve_weights
from .video import MAX_CLIP_BYTES

__all__ = ["SSR_NODE_MAJOR", "build_demo", "device_kind", "launch_options", "ssr_available"]

# The app's own folder for uploads, previews and results, which guard.sweeping empties by age: never one that other
# apps share, as gradio's default is.
os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(tempfile.gettempdir()) / "stylize"))

LOG = logging.getLogger(__name__)
EXAMPLES = [("cat.jpg", "swirls.jpg"), ("coffee.jpg", "stained_glass.jpg"), ("rocket.jpg", "dots.jpg")]
REGION = "Region: paint where the style goes (nothing painted: everywhere)"
HISTORY_LENGTH = 12  # results kept in a browser session's gallery
STOP_FLAGS: dict[str, threading.Event] = {}  # per page session: its Stop sets it, its run ends at its next picture
RUN_QUEUE = "stylize"  # the queue the runs wait in, whichever button started them
# The status line is plain text (what an API caller gets); the page draws a progress bar from its "step N of M".
STATUS_TEMPLATE = (
    '${/step \\d+ of \\d+/.test(value) ? `<progress value="${value.match(/step (\\d+) of/)[1]}" '
    "max=\"${value.match(/step \\d+ of (\\d+)/)[1]}\"></progress>` : value.startsWith('Done') ? "
    "'<progress value=\"1\" max=\"1\"></progress>' : ''}<p>${value}</p>"
)
# A clip's bar counts the frames finished, from its "Frame K of N".
CLIP_STATUS_TEMPLATE = (
    '${/Frame \\d+ of \\d+/.test(value) ? `<progress value="${value.match(/Frame (\\d+) of/)[1] - 1}" '
    "max=\"${value.match(/Frame \\d+ of (\\d+)/)[1]}\"></progress>` : value.startsWith('Done') ? "
    "'<progress value=\"1\" max=\"1\"></progress>' : ''}<p>${value}</p>"
)
# Bring the result into view when a run starts, with the Stop button: on a wide screen the result is at the top
# of the page, on a narrow one (a phone) under the buttons, so the higher of the two goes to the top.
SHOW_RESULT_JS = """() => {
  const result = document.querySelector("#result").getBoundingClientRect();
  if (result.top < 0 || result.bottom > window.innerHeight) {
    const buttons = document.querySelector("#actions").getBoundingClientRect();
    window.scrollBy({top: Math.min(result.top, buttons.top) - 8, behavior: "smooth"});
  }
}"""
PRESS_STYLIZE_JS = "() => document.querySelector('#run').click()"  # an example runs as a Stylize press would


def build_demo() -> gr.Blocks:
    """The whole app: inputs, live result, controls, examples and this session's gallery."""
    kind = device_kind()
    # Said before torch's own "Downloading: ...vgg19..." line, which it prints offline too, just before it fails.
    LOG.info(
        "Loading the VGG19 weights: torch's cache, else a download (548 MB, once; offline it fails at once "
        "and the app runs on untrained features)."
    )
    weights = resolve_weights(Settings().with_weights_from_env().weights)  # downloads here, before any user waits
    if weights.untrained:  # said once, here, and on the page; not again in the log for every run
        LOG.warning("Degraded mode: %s", weights.note)
        warnings.filterwarnings("ignore", category=UntrainedWeightsWarning)
    job_clock()  # times this server in the background: the page is up meanwhile
    gr.set_static_paths([ASSETS])  # served in place, so clearing old files never breaks the examples

    # A size left out means the preset's size, so its default is none.
    with Page(
        api_help=_api_help(),
        api_defaults={"/stylize": {"size": None}, "/bigger": {"size": None}, "/stylize_clip": {"size": None}},
        title=TITLE,
        delete_cache=(guard.LIMITS.sweep_seconds, guard.LIMITS.keep_seconds),
        analytics_enabled=os.environ.get("GRADIO_ANALYTICS_ENABLED", "").lower() == "true",
    ) as demo:
        gr.Markdown(f"# {TITLE}\n{DESCRIPTION} Add both pictures (or click an example below), then press **Stylize**.")
        if weights.untrained:
            gr.Markdown(f"**Degraded mode.** {weights.note}", elem_id="notice")

        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Picture", id="picture", elem_id="picture-tab"):
                with gr.Row():
                    with gr.Column(scale=3):
                        with gr.Row(equal_height=True):
                            content = image_input("Photo", elem_id="content")
                            style = image_input("Style artwork", elem_id="style")
                        preset, size, (style_strength, content_strength), run, stop = _job_controls(kind)
                    with gr.Column(scale=2):
                        result = gr.Image(
                            label="Result", interactive=False, buttons=["download", "fullscreen"], elem_id="result"
                        )
                        status = gr.HTML("", html_template=STATUS_TEMPLATE, label="Status", elem_id="status")
                        download = gr.DownloadButton("Download PNG", interactive=False, elem_id="download")
                        bigger = gr.Button("Make it bigger", visible=False, elem_id="bigger")
                        made = gr.File(
                            visible=False, file_types=[".png"], elem_id="bigger-source"
                        )  # /bigger's `result`

                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        preserve_colors = setting_radio("preserve_colors")
                        optimizer = setting_radio("optimizer")
                    with gr.Row():
                        style_scale = setting_slider("style_scale", step=0.05)
                        smoothing = setting_slider("smoothing", step=0.1)
                        seed = setting_number("seed")
                    with gr.Row():
                        with gr.Column():
                            extra_styles = gr.Gallery(
                                label="More style images, blended with the style artwork",
                                type="filepath",
                                interactive=True,
                                file_types=["image"],
                                columns=4,
                                elem_id="extra-styles",
                            )
                            style_weights = gr.Textbox(
                                "",
                                label=knob("style_weights")["label"],
                                placeholder="e.g. 1, 0.5",
                                max_length=WEIGHTS_TEXT_LENGTH,
                                info=knob("style_weights")["help"] + " The first is the style "
                                "artwork's, then one per extra image, separated by commas.",
                            )
                        with gr.Column():
                            # Said above the editor: its own label floats under its toolbar, which covers a long one.
                            gr.Markdown(f"**{REGION}**", elem_id="mask-label")
                            mask = RegionEditor(
                                {"background": None, "layers": [], "composite": None},
                                elem_id="mask",
                                label=REGION,
                                show_label=False,
                                type="pil",
                                image_mode="RGBA",
                                sources=[],
                                transforms=[],
                                layers=False,
                                brush=gr.Brush(colors=[("#ff4d4d", 0.6)], color_mode="fixed"),
                            )

                examples = gr.Examples(
                    [[_asset(photo), _asset(art)] for photo, art in EXAMPLES],
                    [content, style],
                    label="Examples (click one to run it with the quality chosen above)",
                    api_visibility="private",
                )
                history = gr.State([])  # the page's only: the API's event takes and gives no State (MCP tools cannot)
                gallery = gr.Gallery(
                    label="Your results in this session",
                    columns=6,
                    fit_columns=False,
                    height=260,
                    interactive=False,
                    elem_id="history",
                )

            with gr.Tab("Video", id="video", elem_id="video-tab"):
                with gr.Row():
                    with gr.Column(scale=3):
                        with gr.Row(equal_height=True):
                            clip = clip_input("Video clip (a few seconds)", elem_id="clip")
                            clip_style = image_input("Style artwork", elem_id="clip-style")
                        clip_preset, clip_size, clip_strengths, clip_run, clip_stop = _job_controls(kind, clip=True)
                    with gr.Column(scale=2):
                        clip_frame = gr.Image(
                            label="The frame being made",
                            interactive=False,
                            buttons=["fullscreen"],
                            elem_id="clip-frame",
                        )
                        clip_status = gr.HTML(
                            "", html_template=CLIP_STATUS_TEMPLATE, label="Status", elem_id="clip-status"
                        )
                        clip_result = gr.Video(label="Result", interactive=False, elem_id="clip-result")
                        clip_download = gr.DownloadButton("Download MP4", interactive=False, elem_id="clip-download")

        private = {"queue": False, "api_visibility": "private"}
        content.change(lambda photo: photo, content, mask, **private)
        # Through the queue: a warning reaches the page only as one of the queue's messages.
        content.upload(_said_if_no_image("photo"), content, None, api_visibility="private")
        style.upload(_said_if_no_image("style artwork"), style, None, api_visibility="private")
        # Make it bigger: shown once there is a result (finished or stopped), whose PNG is the bigger one's start.
        download.change(
            lambda png: (gr.DownloadButton(interactive=bool(png)), gr.Button(visible=bool(png))),
            download,
            [download, bigger],
            **private,
        )
        examples.load_input_event.then(None, js=PRESS_STYLIZE_JS, **private)

        def busy(request: gr.Request) -> tuple:  # here, not at module level: it looks at this app's queue
            STOP_FLAGS[request.session_hash] = threading.Event()
            return _busy(_someone_ahead(demo))

        def busy_bigger(history: list, request: gr.Request) -> tuple:  # the latest result: the gallery's first
            return history[0][0] if history else None, *busy(request)

        inputs = [content, style, preset, size, style_strength, content_strength, preserve_colors, style_scale]
        inputs += [extra_styles, style_weights, mask, optimizer, seed, smoothing]
        queued = {"concurrency_limit": guard.LIMITS.concurrency, "concurrency_id": RUN_QUEUE}
        shown = {"show_progress": "minimal", "show_progress_on": result}
        started = run.click(busy, None, [run, stop, download, status, result], js=SHOW_RESULT_JS, **private)
        job = started.then(stylize, inputs, [result, status, download], api_name="stylize", **queued, **shown)
        enlarging = bigger.click(
            busy_bigger, history, [made, run, stop, download, status, result], js=SHOW_RESULT_JS, **private
        )
        enlarged = enlarging.then(
            make_bigger, [made, *inputs], [result, status, download], api_name="bigger", **queued, **shown
        )
        for ran in (job, enlarged):  # buttons back once the run has really ended: after an error too (not .then())
            ran.then(_idle, None, [run, stop], **private)
            ran.then(_remember, [download, preset, history], [gallery, history], **private)
            ran.failure(_failed, None, [run, stop, status], **private)
        stop.click(_request_stop, None, stop, **private)

        # The Video tab: as the picture's, a frame at a time; its Stop keeps the frames made so far as a shorter clip.
        clip_style.upload(_said_if_no_image("style artwork"), clip_style, None, api_visibility="private")
        clip_download.change(
            lambda mp4: gr.DownloadButton(interactive=bool(mp4)), clip_download, clip_download, **private
        )

        def busy_clip(request: gr.Request) -> tuple:
            STOP_FLAGS[_clip_session(request)] = threading.Event()
            return *_busy(_someone_ahead(demo)), None

        clip_inputs = [clip, clip_style, clip_preset, clip_size, *clip_strengths]
        clip_started = clip_run.click(
            busy_clip, None, [clip_run, clip_stop, clip_download, clip_status, clip_frame, clip_result], **private
        )
        clip_job = clip_started.then(
            stylize_clip,
            clip_inputs,
            [clip_frame, clip_status, clip_result, clip_download],
            api_name="stylize_clip",
            **queued,
            show_progress="minimal",
            show_progress_on=clip_frame,
        )
        clip_job.then(_idle, None, [clip_run, clip_stop], **private)
        clip_job.failure(_failed, None, [clip_run, clip_stop, clip_status], **private)
        clip_stop.click(_request_clip_stop, None, clip_stop, **private)
    # api_open=False: no route runs a job around the queue (gradio opens one by default off Spaces).
    return demo.queue(max_size=guard.LIMITS.queue_size, api_open=False)


def _job_controls(kind: str, clip: bool = False) -> tuple[Radio, Slider, list[Slider], gr.Button, gr.Button]:
    """What a tab asks before a run, on a `kind` ("cpu" or "gpu") server: the quality preset and the size it sets,
    the strengths (and a `clip`'s temporal weight), Stylize and Stop (in the Video tab, ids "clip-run"...)."""
    prefix = "clip-" if clip else ""
    with gr.Row():
        preset = Radio(
            [(PRESET_LABELS[name], name) for name in PRESET_NAMES],
            value="standard",
            label="Quality",
            info=" · ".join(
                f"{PRESET_LABELS[name]}: {p['size']} px, {p['steps']} steps" for name, p in PRESETS[kind].items()
            ),
        )
        high = guard.max_size(kind == "gpu")
        size = setting_slider("size", step=32, value=PRESETS[kind]["standard"]["size"], high=high)
    preset.change(lambda name: PRESETS[kind][name]["size"], preset, size, queue=False, api_visibility="private")
    with gr.Row():
        names = ["style_strength", "content_strength"] + (["temporal_weight"] if clip else [])
        strengths = [setting_slider(name, step=0.1) for name in names]
    with gr.Row(elem_id=f"{prefix}actions"):
        run = gr.Button("Stylize", variant="primary", elem_id=f"{prefix}run")
        stop = gr.Button("Stop", variant="stop", interactive=False, elem_id=f"{prefix}stop")
    return preset, size, strengths, run, stop


def launch_options() -> dict[str, Any]:
    """Arguments for `demo.launch()`: the upload cap, the look, link previews, server-side rendering where gradio's
    Node requirement is met (said once in the server's log, with why when it is not), and what a public server
    needs (guard.py): the limits on requests and clients in front of the routes, the sweep of the app's folder,
    and no run history (its routes call the Hub with the host's own token)."""
    ssr, why = ssr_check()
    LOG.info("Server-side rendering: %s", "on" if ssr else f"off ({why})")
    # uvicorn believes any X-Forwarded-For sent from this machine, where gradio's Node server relays every visitor
    # with the header they wrote: the guard would see made-up addresses. It reads the header itself, trusting
    # only STYLIZE_TRUSTED_PROXIES; uvicorn takes its setting from here when launch() starts it.
    os.environ["FORWARDED_ALLOW_IPS"] = ""
    folder = gr.utils.get_upload_folder()
    return {
        "max_file_size": max(MAX_BYTES, MAX_CLIP_BYTES),  # each kind of file has its own limit, checked by the job
        "ssr_mode": ssr,
        "css_paths": [Path(__file__).with_name("page.css")],
        "theme": gr.themes.Soft(primary_hue="indigo"),
        "run_history": False,
        "app_kwargs": {
            "lifespan": guard.sweeping(folder),
            "middleware": [
                Middleware(guard.Guard, folder=folder, clients_in_line=_clients_in_line),
                LinkPreview.middleware(),
            ],
        },
    }


def _clients_in_line(app: Any) -> list[str]:
    """The client (guard.client_of) of each job in gradio's queue, waiting or running. Gradio offers no public view
    of who waits, so this reads its queue's own table of events; test_public checks that this still works."""
    events = list(app.get_blocks()._queue.event_ids_to_events.values())
    return [
        guard.client_of(event.request.client and event.request.client.host, event.request.headers, event.session_hash)
        for event in events
    ]


def _asset(name: str) -> str:
    """A shipped example's path, relative to the working directory where it can be: the page's config, which anyone
    can read, carries it, and an absolute one would show where the app is installed."""
    path = ASSETS / name
    return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)


async def stylize(
    content: str | None,
    style: str | None,
    preset: str,
    size: float | None,
    style_strength: float,
    content_strength: float,
    preserve_colors: str,
    style_scale: float,
    extra_styles: list | None,
    style_weights: str,
    mask: list[str] | None,
    optimizer: str,
    seed: float,
    smoothing: float,
    request: gr.Request | None = None,
    bigger_from: str | None = None,
) -> AsyncIterator[tuple]:
    """Repaint a photo in the style of an artwork. Streams the picture and a status line while it works, then
    gives the result as a PNG that records its settings."""  # `bigger_from`: make_bigger's, never the API's
    # The page's Stop sets its session's flag (busy() made it); an API caller stops a run by cancelling its job.
    stop = STOP_FLAGS.pop(request.session_hash, None) if request else None
    stop = stop or threading.Event()
    if stop.is_set():  # Stop was pressed while this run waited in the queue
        yield None, "Stopped before it started.", None
        return
    if request:
        STOP_FLAGS[request.session_hash] = stop
    frame = None
    try:
        with _said_to_the_user(stop):
            if not content or not style:
                raise ImageError("Add a photo and a style artwork first (upload, paste or take a picture).")
            if bigger_from:
                size = jobs.bigger_size(max(image_size(bigger_from, "result to make bigger")), size)
            settings = Settings.from_preset(
                preset,
                device_kind(),
                **({} if size is None else {"size": size}),
                style_strength=style_strength,
                content_strength=content_strength,
                preserve_colors=preserve_colors,
                style_scale=style_scale,
                style_weights=jobs.numbers(style_weights),
                optimizer=optimizer,
                seed=seed,
                smoothing=smoothing,
            )
            frames = functools.partial(
                jobs.frames, content, style, extra_styles or [], mask or [], settings, preset, result=bigger_from
            )
            time_left = None
            async with aclosing(jobs.in_thread(frames, stop)) as run:
                async for frame in run:  # the engine's last frame is the final picture, unless Stop ends the run first
                    if frame.final or stop.is_set():
                        break
                    time_left = time_left or TimeLeft(job_clock().speed)  # the server's speed as this run starts
                    job_clock().record(time_left.timer, frame.done * frame.work)  # and as it goes
                    yield frame.picture, jobs.running(frame, time_left.update(frame)), gr.skip()
    finally:
        if request and STOP_FLAGS.get(request.session_hash) is stop:
            del STOP_FLAGS[request.session_hash]
    if frame is None:  # stopped while the images were read
        yield None, "Stopped before it started.", None
        return
    png = await asyncio.to_thread(jobs.save, frame, gr.utils.get_upload_folder())
    yield png, jobs.ended(frame), png


async def make_bigger(
    result: str | None,
    content: str | None,
    style: str | None,
    preset: str,
    size: float | None,
    style_strength: float,
    content_strength: float,
    preserve_colors: str,
    style_scale: float,
    extra_styles: list | None,
    style_weights: str,
    mask: list[str] | None,
    optimizer: str,
    seed: float,
    smoothing: float,
    request: gr.Request | None = None,
) -> AsyncIterator[tuple]:
    """Make a result bigger: that very picture is the start, and only the scales above its size are made, so the
    bigger picture is the result's. Streams as /stylize does; the PNG records what it was made bigger from."""
    if not result:
        raise gr.Error("Make a picture first: there is no result to make bigger.", print_exception=False)
    controls = (style_strength, content_strength, preserve_colors, style_scale, extra_styles, style_weights)
    async with aclosing(
        stylize(content, style, preset, size, *controls, mask, optimizer, seed, smoothing, request, result)
    ) as run:
        async for outputs in run:
            yield outputs


@contextmanager
def _said_to_the_user(stop: threading.Event) -> Iterator[None]:
    """A job's failure as a message on the page: a user's mistake as it is said, anything else without the server's
    details. A decoding ended by Stop is no failure."""
    try:
        yield
    except (ImageError, SettingsError) as error:
        if not stop.is_set():  # else: the Stop ended the decoding
            LOG.info("Refused a job: %s", error)  # a user's mistake: one line in the log, no traceback
            raise gr.Error(str(error), print_exception=False) from None
    except WeightsError as error:  # the server's set-up, not the user's doing: no server paths in the message
        raise gr.Error(
            "The server cannot load its VGG19 weights; whoever runs it has to fix STYLIZE_WEIGHTS."
        ) from error
    except Exception as error:  # a failure on the server: its log has the details, the user a way on
        raise gr.Error("Something went wrong on the server. Try again, or try a smaller size.") from error


async def stylize_clip(
    clip: str | None,
    style: str | None,
    preset: str,
    size: float | None,
    style_strength: float,
    content_strength: float,
    temporal_weight: float,
    request: gr.Request | None = None,
) -> AsyncIterator[tuple]:
    """Repaint a short video clip in the style of an artwork, without flicker. Streams the frame being made and a
    status line ("Frame K of N") while it works, then gives the clip as an MP4 (H.264) with its sound."""
    # As /stylize: the page's Stop sets its session's flag (busy_clip made it); an API caller cancels its job.
    session = _clip_session(request) if request else None
    stop = STOP_FLAGS.pop(session, None) if session else None
    stop = stop or threading.Event()
    if stop.is_set():  # Stop was pressed while this run waited in the queue
        yield None, "Stopped before it started.", None, None
        return
    if session:
        STOP_FLAGS[session] = stop
    made = jobs.ClipFile(gr.utils.get_upload_folder())
    try:
        with _said_to_the_user(stop):
            if not clip or not style:
                raise ImageError("Add a video clip and a style artwork first.")
            settings = Settings.from_preset(
                preset,
                device_kind(),
                **({} if size is None else {"size": size}),
                style_strength=style_strength,
                content_strength=content_strength,
                temporal_weight=temporal_weight,
            )
            frames = functools.partial(jobs.clip_frames, clip, style, settings, preset)
            time_left = None
            async with aclosing(jobs.in_thread(frames, stop)) as run:
                async for frame in run:
                    if frame.final:  # a frame finished: into the clip, which a Stop from now on keeps
                        await asyncio.to_thread(made.add, frame)
                    if stop.is_set():
                        break
                    time_left = time_left or TimeLeft(job_clock().speed)  # the server's speed as this run starts
                    job_clock().record(time_left.timer, frame.done * frame.work)  # and as it goes
                    status = jobs.running_clip(frame, time_left.update(frame))
                    yield frame.picture, status, gr.skip(), gr.skip()  # the last frame too: it may be its only one
                    if frame.final and frame.frame == frame.frames:
                        break
    finally:
        if session and STOP_FLAGS.get(session) is stop:
            del STOP_FLAGS[session]
        mp4 = await asyncio.to_thread(made.close)  # a failed job's frames too: no file is left open
    yield gr.skip(), jobs.ended_clip(made, stop.is_set()), mp4, mp4


def _remember(png: str | None, preset: str, history: list) -> tuple[list, list]:
    """The session's gallery with a new result first, captioned with its preset and its real size (a stopped run's
    is smaller than the preset's)."""
    if not png:  # stopped before it started
        return gr.skip(), gr.skip()
    with Image.open(png) as picture:
        width, height = picture.size
        stopped = picture.text.get("stylize:stopped")
    caption = f"{PRESET_LABELS.get(preset, preset)}, {width}×{height} px" + (f", {stopped}" if stopped else "")
    history = [(png, caption)] + history[: HISTORY_LENGTH - 1]
    return history, history


def _said_if_no_image(what: str) -> Callable[[str | None], None]:
    """An upload's check from its header, at once: a file that is no image (a text renamed .jpg) is said when it
    arrives, not only when Stylize is pressed."""

    def check(path: str | None) -> None:
        if path:
            try:
                image_size(path, what)
            except ImageError as error:
                gr.Warning(str(error))

    return check


def _busy(someone_ahead: bool) -> tuple:
    """Buttons, download, status and result as a run is asked for. The last result goes: if this run fails, no
    earlier picture stays under its error badge."""
    waiting = "In queue: others are ahead of you; your place shows on the result." if someone_ahead else "Starting…"
    return gr.Button(interactive=False), gr.Button(interactive=True), None, waiting, None


def _someone_ahead(demo: gr.Blocks) -> bool:
    """Whether a run asked for now would wait: every worker busy, or others already waiting. gradio has no public
    view of its queue, so this reads its internals, here only (tests/test_ui.py fails if they change)."""
    queue = demo._queue.event_queue_per_concurrency_id.get(RUN_QUEUE)
    return queue is not None and (bool(queue.queue) or queue.current_concurrency >= queue.concurrency_limit)


def _idle() -> tuple:
    return gr.Button(interactive=True), gr.Button(interactive=False)


def _failed() -> tuple:
    return *_idle(), "Not finished: the message on the page says why."


def _request_stop(request: gr.Request) -> gr.Button:
    if request.session_hash in STOP_FLAGS:
        STOP_FLAGS[request.session_hash].set()
    return gr.Button(interactive=False)


def _clip_session(request: gr.Request) -> str:
    """The key of a session's clip run in STOP_FLAGS: its own, so each tab's Stop stops its own run."""
    return f"{request.session_hash} clip"


def _request_clip_stop(request: gr.Request) -> gr.Button:
    if _clip_session(request) in STOP_FLAGS:
        STOP_FLAGS[_clip_session(request)].set()
    return gr.Button(interactive=False)


def _api_help() -> dict[str, dict[str, str]]:
    """The /stylize, /bigger and /stylize_clip endpoints' parameter descriptions (jobs.api_help), for the API page and
    gradio_client's view_api(); MCP tools read them from the handlers' docstrings, set here too."""
    helps = api_help(device_kind())
    described = {
        "/stylize": helps,
        "/bigger": {"result": BIGGER_HELP["result"]} | helps | BIGGER_HELP,
        "/stylize_clip": api_clip_help(device_kind()),
    }
    for handler, endpoint in ((stylize, "/stylize"), (make_bigger, "/bigger"), (stylize_clip, "/stylize_clip")):
        args = "".join(f"    {name}: {text}\n" for name, text in described[endpoint].items())
        handler.__doc__ = (handler.__doc__ or "").split("\n\n")[0] + "\n\nArgs:\n" + args
    return described
