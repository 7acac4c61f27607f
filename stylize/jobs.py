"""One web job, without gradio: its inputs checked and read, Settings, the engine run on a device, the frames it
yields, the status line and the PNG.

`stylize.ui` turns a page's or an API caller's inputs into a call here and each Frame into a picture and a status
line; `stylize.guard` says what a job may cost. The pictures are read in bounded processes (stylize.decoding),
the engine runs in a thread of its own (`in_thread`), one run at a time per worker slot (`run_slots`).
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import ctypes.util
import functools
import itertools
import tempfile
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageChops

from . import guard
from .device import gpu_names, pick_device
from .engine import Progress, transfer, transfer_clip
from .images import bigger_metadata, load_image, load_opacity, png_metadata, result_metadata, save_png
from .plan import job_scales, later_frame_scales
from .settings import PRESETS, Settings, SettingsError, brief, knob
from .timing import GPU_SPEED, SAMPLE, SAMPLE_PHOTO, JobClock, StepSpeed, StepTimer
from .video import Clip, ClipWriter, read_frames

try:  # On a ZeroGPU Space this decorator lends a GPU to each call; elsewhere it leaves the function as it is.
    from spaces import GPU
except ImportError:  # the package is only there on Hugging Face Spaces (and where the tests install it)

    def GPU(duration: Any) -> Any:  # the same name as the decorator it stands in for
        return lambda fn: fn


PRESET_LABELS = {"draft": "Fast draft", "standard": "Standard", "fine": "Fine"}
PREVIEW_SIDE = 1024  # the long side previews are shrunk to: print sizes are too big to stream several a second
WEIGHTS_TEXT_LENGTH = 200  # characters of style blend weights: room for a weight per style image, several times over
STOP_POLL_SECONDS = 0.1  # how soon a waiting job sees Stop pressed


@functools.cache
def device_kind() -> str:
    """Which column of the quality presets suits this server: "gpu" or "cpu"."""
    return "cpu" if pick_device().type == "cpu" else "gpu"


@functools.cache
def job_clock() -> JobClock:
    """This server's speed: what a job will cost before it starts. Timed in the background on a CPU; on a GPU,
    which the app's own process may not touch (ZeroGPU lends one to each run only), a guess until the first job
    measures it. Every job measures it again as it runs."""
    if device_kind() == "gpu":
        return JobClock(GPU_SPEED)
    clock = JobClock()
    clock.time_in_background(functools.partial(sample_speed, SAMPLE_PHOTO, Settings(**SAMPLE)))
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


def _job_images(
    content: str,
    style: str,
    extra_styles: list,
    layers: list[str],
    settings: Settings,
    preset: str,
    halt: threading.Event,
    result: str | None,
) -> tuple[Image.Image, list[Image.Image], Image.Image | None, Image.Image | None]:
    """The photo, the style images, the painted region and the result to make bigger (`result`, where given) of
    one job. The picture's size, the images' count, each file's header, their pixels together and the job's time
    are checked before any pixel is decoded; then each image is shrunk to what the engine uses as soon as it is
    read, so that a job holds at most one full-size image at a time. Each is decoded in a bounded process of its
    own (stylize.decoding), which `halt` ends."""
    files = [
        (content, "photo"),
        (style, "style artwork"),
        *[(path, f"extra style image {i}") for i, (path, _) in enumerate(extra_styles, start=1)],
        *[(path, "painted region") for path in layers],
    ]
    guard.admit(
        settings,
        files,
        len(extra_styles),
        len(layers),
        gpu=device_kind() == "gpu",
        clock=job_clock(),
        preset=PRESET_LABELS[preset],
        result=result,
    )
    photo = load_image(content, "photo", settings.size, halt)
    style_side = round(settings.style_scale * settings.size)  # the most of a style the engine looks at
    styles = [load_image(path, what, style_side, halt) for path, what in files[1 : 2 + len(extra_styles)]]
    start = load_image(result, "result to make bigger", settings.size, halt) if result else None
    return photo, styles, _painted_region(layers, photo.size, halt), start


def _painted_region(layers: list[str], size: tuple[int, int], halt: threading.Event) -> Image.Image | None:
    """White where any painted layer has paint, at the photo's `size`; None where none has (style everywhere)."""
    if not layers:
        return None
    region = functools.reduce(ImageChops.lighter, (load_opacity(path, "painted region", size, halt) for path in layers))
    return region if region.getbbox() else None


def bigger_size(side: int, size: float | None) -> int:
    """The size a result `side` px long is made bigger to: `size` where that is larger, else twice the result's, up
    to the largest this server makes."""
    largest = guard.max_size(device_kind() == "gpu")
    if size is not None and size > side:
        return int(size)
    if side >= largest:
        raise SettingsError(
            f"This picture is {side} px long, the largest this server makes; make print sizes with the command "
            f"line (stylize PHOTO STYLE --from RESULT.png --bigger --size {2 * side})."
        )
    return min(2 * side, largest)


def numbers(text: str | None) -> tuple[float, ...]:
    text = "" if text is None else text
    if not isinstance(text, str) or len(text) > WEIGHTS_TEXT_LENGTH:
        raise SettingsError(
            f"Style blend weights must be a short text of numbers separated by commas, like 1, 0.5; got {brief(text)}."
        )
    try:
        return tuple(float(item) for item in text.replace(",", " ").split())
    except ValueError:
        raise SettingsError(
            f"Style blend weights must be numbers separated by commas, like 1, 0.5; got {brief(text)}."
        ) from None


_SLOTS: dict[int, threading.BoundedSemaphore] = {}  # by the number of runs that go at once
_SLOTS_LOCK = threading.Lock()


def run_slots(concurrency: int) -> threading.BoundedSemaphore:
    """The slots of the runs that go at once (guard.LIMITS.concurrency): a run's thread holds one while its engine
    runs, so that a stopped run's step ends before the next run's begins."""
    with _SLOTS_LOCK:
        return _SLOTS.setdefault(concurrency, threading.BoundedSemaphore(concurrency))


def frames(
    content: str,
    style: str,
    extra_styles: list,
    layers: list[str],
    settings: Settings,
    preset: str,
    halt: threading.Event,
    result: str | None = None,
) -> Iterator[Frame]:
    """One job's blocking work: its images read, then the engine's frames, until `halt` is set; `result`, a PNG
    to make bigger from. One run at a time per worker (run_slots): a stopped run's thread ends its step after its
    job has ended, before the next run."""
    photo, styles, region, start = _job_images(content, style, extra_styles, layers, settings, preset, halt, result)
    made_from = {} if start is None else bigger_metadata(start.size, png_metadata(result))
    with run_slots(guard.LIMITS.concurrency):
        if halt.is_set():
            return
        with GPUS.device() as device:
            run = _run(photo, styles, replace(settings, device=device), region, start, made_from)
            with closing(run):
                yield from run


def clip_frames(clip: str, style: str, settings: Settings, preset: str, halt: threading.Event) -> Iterator[Frame]:
    """One clip job's blocking work, as `frames` is a picture's: the clip checked from its container and the style
    artwork read, then the engine's frames, frame after frame, until `halt` is set."""
    declared = guard.admit_clip(
        settings, clip, style, gpu=device_kind() == "gpu", clock=job_clock(), preset=PRESET_LABELS[preset]
    )
    style_side = round(settings.style_scale * settings.size)  # the most of a style the engine looks at
    artwork = load_image(style, "style artwork", style_side, halt)
    with run_slots(guard.LIMITS.concurrency):
        if halt.is_set():
            return
        with GPUS.device() as device:
            run = _run_clip(declared, artwork, replace(settings, device=device))
            with closing(run):
                yield from run


async def in_thread(make: Callable[[threading.Event], Iterator[Frame]], stop: threading.Event) -> AsyncIterator[Frame]:
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
            with closing(make(halt)) as made:
                for frame in made:
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
    work: int  # the run's whole work, a clip's every frame's (plan.work_done)
    final: bool
    device: str  # where it runs, "cpu" or "cuda:0", and in what number format, "bf16"
    precision: str
    metadata: dict[str, str]  # the PNG's text chunks: settings, weights, warning
    frame: int = 0  # a clip's: the frame being made (1-based) of `frames`, and the steps of each frame after the
    frames: int = 0  # first; `final` then says this frame is finished, `picture` is it at full size
    later_steps: int = 0
    clip: Clip | None = None  # the clip as its container declares it: its rate and sound, for the MP4

    @property
    def steps_left(self) -> int:
        """Steps of the whole job still to come: this picture's or frame's, and a clip's later frames'."""
        return self.total - self.step + (self.frames - self.frame) * self.later_steps


def _gpu_seconds(
    content: Image.Image,
    styles: list[Image.Image],
    settings: Settings,
    mask: Image.Image | None,
    start: Image.Image | None,
    made_from: dict[str, str],
) -> int:
    """A ZeroGPU time slot for one run: start-up plus the steps, which cost more the bigger the image."""
    return round(30 + settings.steps * 0.1 * (settings.size / 1024) ** 2)


@GPU(duration=_gpu_seconds)
def _run(
    content: Image.Image,
    styles: list[Image.Image],
    settings: Settings,
    mask: Image.Image | None,
    start: Image.Image | None,
    made_from: dict[str, str],
) -> Iterator[Frame]:
    """Drive the engine: a Frame for each preview, then the final one at full size. `start`, a result to make
    bigger, and `made_from`, what its PNG is to record of it."""
    steps = transfer(content, styles, settings, mask=mask, bigger_from=start)
    yield from _frames(steps, lambda progress: result_metadata(settings, progress) | made_from)


def _clip_gpu_seconds(clip: Clip, style: Image.Image, settings: Settings) -> int:
    """A ZeroGPU time slot for one clip: start-up plus a picture's steps for the first frame and each later one's."""
    frames = 1 + (clip.frames - 1) * settings.later_frames
    return round(30 + frames * settings.steps * 0.1 * (settings.size / 1024) ** 2)


@GPU(duration=_clip_gpu_seconds)
def _run_clip(clip: Clip, style: Image.Image, settings: Settings) -> Iterator[Frame]:
    """Drive the clip engine over the clip's frames, decoded one at a time: a Frame for each preview, and each
    frame once finished, at full size."""
    pictures = read_frames(clip)
    steps = transfer_clip(pictures, style, settings, count=clip.frames)
    later_steps = later_frame_scales(job_scales(clip.size, settings), settings)[0].steps
    try:
        yield from _frames(steps, lambda progress: {}, later_steps, clip)
    finally:
        pictures.close()


def _frames(
    steps: Iterator[Progress],
    metadata: Callable[[Progress], dict[str, str]],
    later_steps: int = 0,
    clip: Clip | None = None,
) -> Iterator[Frame]:
    """The engine's progress as Frames, a preview's picture shrunk to PREVIEW_SIDE; `metadata` a finished
    picture's PNG text."""
    try:
        for progress in steps:
            yield Frame(
                progress.image(None if progress.final else PREVIEW_SIDE),
                progress.size,
                progress.step,
                progress.total,
                progress.scale,
                progress.scales,
                progress.tile,
                progress.tiles,
                progress.elapsed,
                progress.done,
                progress.work,
                progress.final,
                progress.device,
                progress.precision,
                metadata(progress),
                progress.frame,
                progress.frames,
                later_steps,
                clip,
            )
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


def save(frame: Frame, folder: str) -> str:
    """Write the picture as a PNG with its settings embedded, in `folder`: where the server serves it from."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    # A new folder of its own, made in one step: the sweep (guard.py) removes folders that stand empty.
    path = Path(tempfile.mkdtemp(prefix="result-", dir=folder)) / "stylized.png"
    stopped = {} if frame.final else {"stylize:stopped": _stopped_at(frame)}
    save_png(frame.picture, path, {**frame.metadata, **stopped})
    return str(path)


class ClipFile:
    """A clip job's MP4, in a new folder of its own under `folder` (as `save` puts a PNG): each finished frame is
    added as it comes, so that a stopped job's file holds the frames made so far, its sound cut to their length."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.writer: ClipWriter | None = None
        self.last: Frame | None = None  # the last frame added

    def add(self, frame: Frame) -> None:
        if self.writer is None:
            Path(self.folder).mkdir(parents=True, exist_ok=True)
            path = Path(tempfile.mkdtemp(prefix="result-", dir=self.folder)) / "stylized.mp4"
            self.writer = ClipWriter(path, frame.clip.rate, audio_from=frame.clip)
        self.writer.add(frame.picture)
        self.last = frame

    @property
    def frames(self) -> int:
        return 0 if self.writer is None else self.writer.frames

    def close(self) -> str | None:
        """The MP4's path; None where no frame was finished."""
        if self.writer is None:
            return None
        self.writer.close()
        return str(self.writer.path)


def running(frame: Frame, left: float | None) -> str:
    width, height = frame.size
    estimate = "estimating the time left" if left is None else f"about {_duration(5 * round(left / 5))} left"
    tile = f", tile {frame.tile} of {frame.tiles}" if frame.tiles else ""
    return (
        f"Scale {frame.scale} of {frame.scales} ({width}×{height} px{tile}) · step {frame.step} of "
        f"{frame.total} · {_duration(frame.elapsed)} elapsed · {estimate} · {_hardware(frame)}"
    )


def ended(frame: Frame) -> str:
    width, height = frame.picture.size
    if frame.final:
        return f"Done in {_duration(frame.elapsed)}: {width}×{height} px, {frame.total} steps · {_hardware(frame)}."
    return (
        f"{_stopped_at(frame).capitalize()} after {_duration(frame.elapsed)}: the picture so far, "
        f"{width}×{height} px · {_hardware(frame)}."
    )


def running_clip(frame: Frame, left: float | None) -> str:
    width, height = frame.size
    estimate = "estimating the time left" if left is None else f"about {_duration(5 * round(left / 5))} left"
    return (
        f"Frame {frame.frame} of {frame.frames} ({width}×{height} px) · step {frame.step} of {frame.total} · "
        f"{_duration(frame.elapsed)} elapsed · {estimate} · {_hardware(frame)}"
    )


def ended_clip(made: ClipFile, stopped: bool) -> str:
    """The status line of a clip job that made `made`, finished or `stopped`."""
    frame = made.last
    if frame is None:
        return "Stopped before the first frame was finished: no clip."
    width, height = frame.picture.size
    seconds = f"{float(made.frames / frame.clip.rate):.1f} s"
    if not stopped and made.frames == frame.frames:
        return (
            f"Done in {_duration(frame.elapsed)}: {made.frames} frames ({seconds}), {width}×{height} px · "
            f"{_hardware(frame)}."
        )
    return (
        f"Stopped at frame {made.frames + 1} of {frame.frames} after {_duration(frame.elapsed)}: the "
        f"{made.frames} frames made so far ({seconds}), {width}×{height} px · {_hardware(frame)}."
    )


def _hardware(frame: Frame) -> str:
    """Where a run runs and in what number format, e.g. "CPU, bf16" or "CUDA:1, fp16"."""
    return f"{frame.device.upper()}, {frame.precision}"


def _stopped_at(frame: Frame) -> str:
    return f"stopped at step {frame.step} of {frame.total}"


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


# /bigger's own parameters, and what its `size` means there.
BIGGER_HELP = {
    "result": "The result PNG to make bigger (from /stylize or /bigger): the start of the bigger picture.",
    "size": "Long side of the bigger picture in px, where larger than the result's; left out (or not larger): "
    "twice the result's, up to the largest this server makes.",
}


def api_help(kind: str) -> dict[str, str]:
    """The /stylize endpoint's parameters, described with the same help texts as the page's controls, for a
    `kind` ("cpu" or "gpu") server's presets."""
    helps = {
        name: knob(name)["help"]
        for name in (
            "style_strength",
            "content_strength",
            "preserve_colors",
            "style_scale",
            "optimizer",
            "seed",
            "smoothing",
        )
    }
    helps |= {
        "content": "The photo to repaint (JPEG, PNG or WebP).",
        "style": "The artwork whose style is painted onto the photo.",
        "preset": "Quality: "
        + "; ".join(f"{name}: {p['size']} px, {p['steps']} steps" for name, p in PRESETS[kind].items())
        + ".",
        "size": knob("size")["help"] + " Left out: the preset's size.",
        "extra_styles": "More style images, blended with the style artwork.",
        "style_weights": knob("style_weights")["help"] + " The first is the style artwork's, then one per extra "
        "image, separated by commas.",
        "mask": "Where the style goes: the painted layers of an image editor value (nothing painted: everywhere).",
    }
    return helps


def api_clip_help(kind: str) -> dict[str, str]:
    """The /stylize_clip endpoint's parameters: the clip, and /stylize's help for what they share."""
    helps = api_help(kind)
    return {
        "clip": "The video clip to repaint (MP4, MOV, WebM; a few seconds): its sound is carried over.",
        "style": helps["style"],
        "preset": helps["preset"],
        "size": knob("size")["help"] + " Of each frame; left out: the preset's size.",
        "style_strength": helps["style_strength"],
        "content_strength": helps["content_strength"],
        "temporal_weight": knob("temporal_weight")["help"],
    }
