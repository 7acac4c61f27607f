"""The web app: `build_demo()` returns the Gradio Blocks, `launch_options()` the arguments for its launch().

This is the only module that imports gradio. Every control takes its default,
range, label and help text from `stylize.settings`; the engine's Progress
records become a picture and a status line; nothing here knows about tensors.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import shutil
import subprocess
import tempfile
from collections import deque
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
from PIL import Image, ImageChops
from starlette.middleware import Middleware

from . import guard
from .engine import Progress, job_work, pick_device, result_metadata, transfer
from .images import MAX_BYTES, ImageError, image_size, load_image, load_opacity, save_png
from .settings import PRESET_NAMES, PRESETS, Settings, SettingsError, brief, knob
from .vgg import WeightsError, resolve_weights

try:  # On a ZeroGPU Space this decorator lends a GPU to each call; elsewhere the package is absent.
    from spaces import GPU
except ImportError:
    def GPU(duration: Any) -> Any:  # the same name as the decorator it stands in for
        return lambda fn: fn

# The app's own folder for uploads, previews and results, which guard.sweeping empties by age: never one that other
# apps share, as gradio's default is.
os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(tempfile.gettempdir()) / "stylize"))

Control = TypeVar("Control", bound=gr.components.Component)
ASSETS = Path(__file__).resolve().parent.parent / "assets"
EXAMPLES = [("cat.jpg", "swirls.jpg"), ("coffee.jpg", "stained_glass.jpg"), ("rocket.jpg", "dots.jpg")]
PRESET_LABELS = {"draft": "Fast draft", "standard": "Standard", "fine": "Fine"}
HISTORY_LENGTH = 12  # results kept in a browser session's gallery
WEIGHTS_TEXT_LENGTH = 200  # characters of style blend weights: room for a weight per style image, several times over
CSS = """
#status progress { width: 100%; height: 0.5rem; appearance: none; border: none; border-radius: 0.25rem;
                   overflow: hidden; background: var(--neutral-200); }
#status progress::-webkit-progress-bar { background: var(--neutral-200); }
#status progress::-webkit-progress-value { background: var(--primary-500); }
#status progress::-moz-progress-bar { background: var(--primary-500); }
#result img { width: 100%; height: 100%; object-fit: contain; }  /* every scale shown at the same size */
#status p { margin: 0.25rem 0 0; font-variant-numeric: tabular-nums; }
#notice { border-left: 4px solid #e8a33d; padding: 0.5rem 0.75rem; background: rgba(232, 163, 61, 0.12); }
"""


@functools.cache
def device_kind() -> str:
    """Which column of the quality presets suits this server: "gpu" or "cpu"."""
    return "cpu" if pick_device().type == "cpu" else "gpu"


def build_demo() -> gr.Blocks:
    """The whole app: inputs, live result, controls, examples and this session's gallery."""
    kind = device_kind()
    weights = resolve_weights(Settings().with_weights_from_env().weights)  # downloads here, before any user waits
    job_clock()  # times this server, before any user waits
    gr.set_static_paths([ASSETS])  # served in place, so clearing old files never breaks the examples

    with gr.Blocks(title="Stylize", delete_cache=(guard.SWEEP_SECONDS, guard.KEEP_SECONDS),
                   analytics_enabled=os.environ.get("GRADIO_ANALYTICS_ENABLED", "").lower() == "true") as demo:
        gr.Markdown("# Stylize\nRepaint a photo in the style of an artwork. Add both pictures "
                    "(or click an example below), then press **Stylize**.")
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
                    size = _slider("size", step=32, value=PRESETS[kind]["standard"]["size"])
                with gr.Row():
                    style_strength = _slider("style_strength", step=0.1)
                    content_strength = _slider("content_strength", step=0.1)
                with gr.Row():
                    run = gr.Button("Stylize", variant="primary", elem_id="run")
                    stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop")
            with gr.Column(scale=2):
                result = gr.Image(label="Result", interactive=False, height=480, buttons=["download", "fullscreen"],
                                  elem_id="result")
                status = gr.HTML(label="Status", elem_id="status")
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
                                              type="filepath", interactive=True, file_types=["image"], columns=4)
                    style_weights = gr.Textbox("", label=knob("style_weights")["label"], placeholder="e.g. 1, 0.5",
                                               max_length=WEIGHTS_TEXT_LENGTH,
                                               info=knob("style_weights")["help"] + " The first is the style "
                                               "artwork's, then one per extra image, separated by commas.")
                mask = _painting(gr.ImageEditor(
                    {"background": None, "layers": [], "composite": None}, elem_id="mask",
                    label="Region: paint where the style goes (nothing painted: everywhere)", type="pil",
                    image_mode="RGBA", sources=[], transforms=[], layers=False,
                    brush=gr.Brush(colors=[("#ff4d4d", 0.6)], color_mode="fixed")))

        gr.Examples([[_asset(photo), _asset(art)] for photo, art in EXAMPLES], [content, style],
                    [result, status, download], fn=example, cache_examples=True, cache_mode="lazy",
                    label="Examples (click one; the first click computes it)")
        history = gr.State([])
        gallery = gr.Gallery(label="Your results in this session", columns=6, fit_columns=False, height=260,
                             interactive=False, elem_id="history")

        private = {"queue": False, "api_visibility": "private"}
        preset.change(lambda name: PRESETS[kind][name]["size"], preset, size, **private)
        content.change(lambda photo: photo, content, mask, **private)
        download.change(lambda png: gr.DownloadButton(interactive=bool(png)), download, download, **private)
        started = run.click(_busy, None, [run, stop, download, status], **private)
        job = started.then(stylize, [content, style, preset, size, style_strength, content_strength, preserve_colors,
                                     style_scale, extra_styles, style_weights, mask, optimizer, seed, smoothing,
                                     history],
                           [result, status, download, gallery, history], api_name="stylize",
                           concurrency_limit=int(os.environ.get("STYLIZE_CONCURRENCY", "1")),
                           show_progress="minimal", show_progress_on=result)
        # Stylize comes back once the run has really ended: after an error too, which .then() skips.
        job.then(_idle, None, [run, stop], **private)
        job.failure(_idle, None, [run, stop], **private)
        stop.click(lambda: gr.Button(interactive=False), None, stop, cancels=[job], **private)
    # api_open=False: no route runs a job around the queue (gradio opens one by default off Spaces).
    return demo.queue(max_size=int(os.environ.get("STYLIZE_QUEUE_SIZE", "32")), api_open=False)


def launch_options() -> dict[str, Any]:
    """Arguments for `demo.launch()`: the upload cap, the look, server-side rendering where Node allows it, and what
    a public server needs (guard.py): the limits on requests and clients in front of the routes, the sweep of the
    app's folder, and no run history (its routes call the Hub with the host's own token)."""
    folder = gr.utils.get_upload_folder()
    return {"max_file_size": MAX_BYTES, "ssr_mode": ssr_available(), "css": CSS,
            "theme": gr.themes.Soft(primary_hue="indigo"), "run_history": False,
            "app_kwargs": {"lifespan": guard.sweeping(folder), "middleware": [
                Middleware(guard.Guard, folder=folder, clients_in_line=_clients_in_line)]}}


@functools.cache
def job_clock() -> guard.JobClock:
    """This server's speed, timed once: what a job will cost before it starts."""
    return guard.JobClock.measured()


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
    """Server-side rendering needs Node 20 or newer; GRADIO_SSR_MODE=false turns it off."""
    node = os.environ.get("GRADIO_NODE_PATH") or shutil.which("node")
    if os.environ.get("GRADIO_SSR_MODE", "").lower() == "false" or not node:
        return False
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout
        return int(version.strip().lstrip("v").split(".")[0]) >= 20
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return False


def stylize(content: str | None, style: str | None, preset: str, size: float, style_strength: float,
            content_strength: float, preserve_colors: str, style_scale: float, extra_styles: list | None,
            style_weights: str, mask: list[str] | None, optimizer: str, seed: float, smoothing: float,
            history: list | None = None) -> Iterator[tuple]:
    """The /stylize endpoint: streams the picture and status line, then adds the result to the gallery."""
    try:
        if not content or not style:
            raise ImageError("Add a photo and a style artwork first (upload, paste or take a picture).")
        settings = Settings.from_preset(
            preset, device_kind(), size=size, style_strength=style_strength, content_strength=content_strength,
            preserve_colors=preserve_colors, style_scale=style_scale, style_weights=_numbers(style_weights),
            optimizer=optimizer, seed=seed, smoothing=smoothing)
        photo, styles, region = _job_images(content, style, extra_styles or [], mask or [], settings, preset)
        with closing(_run(photo, styles, settings, region)) as frames:
            for picture, line in frames:
                if isinstance(picture, Image.Image):
                    yield picture, line, gr.skip(), gr.skip(), gr.skip()
    except (ImageError, SettingsError) as error:
        raise gr.Error(str(error)) from None
    except WeightsError as error:  # the server's set-up, not the user's doing: no server paths in the message
        raise gr.Error("The server cannot load its VGG19 weights; whoever runs it has to fix STYLIZE_WEIGHTS.") \
            from error
    except Exception as error:  # a failure on the server: its log has the details, the user a way on
        raise gr.Error("Something went wrong on the server. Try again, or try a smaller size.") from error
    history = [(picture, f"{PRESET_LABELS[preset]}, {settings.size} px")] + (history or [])[:HISTORY_LENGTH - 1]
    yield picture, line, picture, history, history


def example(content: str, style: str) -> tuple:
    """An example's output, computed with the standard preset on its first click and cached for everyone."""
    frames = _run(load_image(content, "photo"), [load_image(style, "style artwork")],
                  Settings.from_preset("standard", device_kind()), None)
    picture, line = deque(frames, maxlen=1).pop()  # the last frame: the saved result
    return picture, line, picture


def _gpu_seconds(content: Image.Image, styles: list[Image.Image], settings: Settings, mask: Image.Image | None) -> int:
    """A ZeroGPU time slot for one run: start-up plus the steps, which cost more the bigger the image."""
    return round(30 + settings.steps * 0.1 * (settings.size / 1024) ** 2)


@GPU(duration=_gpu_seconds)
def _run(content: Image.Image, styles: list[Image.Image], settings: Settings,
         mask: Image.Image | None) -> Iterator[tuple[Image.Image | str, str]]:
    """Drive the engine: yields (preview, status) while it works, then (path of the result PNG, status)."""
    steps = transfer(content, styles, settings, mask=mask)
    try:
        for progress in steps:
            if progress.final:  # this server's speed, measured again
                job_clock().record(job_work(content.size, settings), progress.elapsed)
            yield (_save(progress, settings) if progress.final else progress.image()), _status(progress)
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


def _status(progress: Progress) -> str:
    width, height = progress.size
    if progress.final:
        text = f"Done in {_duration(progress.elapsed)}: {width}×{height} px, {progress.total} steps."
    else:
        left = progress.elapsed * (1 - progress.done) / progress.done
        text = (f"Scale {progress.scale} of {progress.scales} ({width}×{height} px) · step {progress.step} of "
                f"{progress.total} · {_duration(progress.elapsed)} elapsed · about {_duration(left)} left")
    return f'<progress value="{progress.step}" max="{progress.total}"></progress><p>{text}</p>'


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _save(progress: Progress, settings: Settings) -> str:
    """Write the full-size result as a PNG with its settings embedded, where the server serves it from."""
    folder = Path(gr.utils.get_upload_folder())
    folder.mkdir(parents=True, exist_ok=True)
    # A new folder of its own, made in one step: the sweep (guard.py) removes folders that stand empty.
    path = Path(tempfile.mkdtemp(prefix="result-", dir=folder)) / "stylized.png"
    save_png(progress.image(), path, result_metadata(settings, progress))
    return str(path)


def _job_images(content: str, style: str, extra_styles: list, layers: list[str], settings: Settings,
                preset: str) -> tuple[Image.Image, list[Image.Image], Image.Image | None]:
    """The photo, the style images and the painted region of one job. Their count, each file's header, their
    pixels together and the job's time are checked before any pixel is decoded; then each image is shrunk to what
    the engine uses as soon as it is read, so that a job holds at most one full-size image at a time."""
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
    photo = load_image(content, "photo", settings.size)
    style_side = round(settings.style_scale * settings.size)  # the most of a style the engine looks at
    styles = [load_image(path, what, style_side) for path, what in files[1:2 + len(extra_styles)]]
    return photo, styles, _painted_region(layers, photo.size)


def _painted_region(layers: list[str], size: tuple[int, int]) -> Image.Image | None:
    """White where any painted layer has paint, at the photo's `size`; None where none has (style everywhere)."""
    if not layers:
        return None
    region = functools.reduce(ImageChops.lighter, (load_opacity(path, "painted region", size) for path in layers))
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


def _uploaded(path: str, what: str) -> str:
    """An uploaded file's path, once it is known to be still there: a page left open past the cleanup sends a path
    that is gone, and its user is told to upload again rather than that a file with a random name does not exist."""
    if not Path(path).is_file():
        raise ImageError(f"The {what} is no longer on the server (uploads are deleted after a while). "
                         "Upload it again.")
    return path


def _busy() -> tuple:
    waiting = "<p>Starting… When others are ahead of you, your place in the queue shows on the result.</p>"
    return gr.Button(interactive=False), gr.Button(interactive=True), None, waiting


def _idle() -> tuple:
    return gr.Button(interactive=True), gr.Button(interactive=False)


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


def _slider(name: str, step: float, value: float | None = None) -> gr.Slider:
    info = knob(name)
    return _checked_by_settings(gr.Slider(info["low"], info["high"], value=info["default"] if value is None else value,
                                          step=step, label=info["label"], info=info["help"]))


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
