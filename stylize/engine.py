"""The optimization: coarse-to-fine scales, tiles past memory, a stream of Progress records.

The output image is optimized directly so that its VGG19 activations match the photo's at a deep layer and
the Gaussian statistics of the style images' activations at several layers (losses.py). It starts small
(about 128 px on the long side), where steps are cheap and the layout forms, and is upsampled by about
sqrt(2) per scale up to the requested size, with fewer steps at each larger scale. A scale too big to
optimize at once (or bigger than `tile_size`) is optimized tile by tile as the one picture it is (tiles.py):
the whole picture's statistics gathered each sweep, one optimizer state for the whole picture, each tile's
gradient the whole picture's. A result can be made bigger from itself: it is the start, and only the scales
above its size are made.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import time
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from . import flow, images, tiles
from .device import pick_device, pick_precision
from .losses import (
    BALANCES,
    StyleTarget,
    mixture,
    style_layer_weights,
    tiled_gaussians,
)
from .objective import Objective
from .plan import SCHEDULE, Scale, Schedule, fit_in_memory, later_frame_scales, plan, work_done
from .settings import Settings, SettingsError
from .vgg import UntrainedWeightsWarning, Weights, feature_extractor, resolve_weights

PREVIEW_SECONDS = 0.25  # at most one preview per this long, after the first step's
STYLE_MAX_SIDE = 2048  # the style image is never seen larger than this
# Clips are made with Adam whatever settings.optimizer says: from the warped start L-BFGS's larger steps took a
# frame further from its own picture (bench/video.py's pan: 1.19 of its objective, against 1.08 with Adam).
CLIP_OPTIMIZER = "adam"


@dataclass
class Progress:
    """One point of a running transfer; `image()` gives the picture at that point."""

    step: int
    total: int
    scale: int  # 1-based index of the current scale
    scales: int
    size: tuple[int, int]  # (width, height) of the current scale
    elapsed: float  # seconds since the transfer started
    done: float  # share of the work done, 0 to 1 (a step costs the pixels it optimizes)
    work: int  # the run's whole work (plan.work_done), a clip's every frame's
    losses: dict[str, float]
    weights: str  # "imagenet", "caffe" or "untrained"
    device: str  # where it runs: "cpu", "cuda:0", "mps"
    precision: str  # the network's number format: "fp32", "bf16" or "fp16"
    note: str  # a warning for the user ("" when there is none), e.g. untrained weights
    tile: int  # 1-based index of the tile last optimized at a tiled scale; 0 where the scale is whole
    tiles: int  # tiles per sweep at the current scale; 0 where the scale is whole
    final: bool  # the picture is finished (in a clip: this frame is)
    pixels: torch.Tensor = field(repr=False)  # (1, 3, H, W) in [0, 1], on the engine's device
    frame: int = 0  # 1-based frame of a clip; 0 for a picture
    frames: int = 0  # frames in the clip; 0 for a picture

    def image(self, max_side: int | None = None) -> Image.Image:
        """The picture; no longer than `max_side` on its long side, where given (previews of big pictures)."""
        width, height = self.pixels.shape[-1], self.pixels.shape[-2]
        if max_side is not None and max(width, height) > max_side:
            return images.to_image(images.resize(self.pixels, images.fit((width, height), max_side)))
        return images.to_image(self.pixels)


def transfer(
    content: Image.Image,
    style: Image.Image | Sequence[Image.Image],
    settings: Settings,
    *,
    mask: Image.Image | None = None,
    init_image: Image.Image | None = None,
    bigger_from: Image.Image | None = None,
    schedule: Schedule = SCHEDULE,
) -> Iterator[Progress]:
    """Stylize `content` with one or more `style` images; yields previews, then the final image.

    `mask` (greyscale, over the content) limits the style to its white parts;
    `init_image` (e.g. a previous result) replaces `settings.init` as the start;
    `bigger_from`, a result, is made bigger: it is the start, and only the scales above its size are made;
    `schedule` is the engine's own (benches compare others).
    Bad settings raise here, before the first record; closing the generator stops the work at once.
    """
    above = 0 if bigger_from is None else max(bigger_from.size)
    job = _Job.of(content.size, style, settings, schedule, above)
    # Everything above raises now, at the call; the work itself starts at the first next().
    return _optimize(content, mask, bigger_from or init_image, job, schedule)


def transfer_clip(
    frames: Iterable[Image.Image],
    style: Image.Image | Sequence[Image.Image],
    settings: Settings,
    *,
    count: int | None = None,
    schedule: Schedule = SCHEDULE,
) -> Iterator[Progress]:
    """Stylize a clip's `frames` (all of one size) without flicker; yields each frame's previews, then that frame
    finished (`final`), frame after frame. Records say which frame they are of how many (`frame`, `frames`).

    The first frame is made as a picture is; each later one starts from the previous result moved along the
    optical flow between the two input frames, and is refined at full size with `settings.later_frames` of the
    first frame's work and a temporal loss (`settings.temporal_weight`) that keeps it close to that start where
    the flow is reliable (Ruder, Dosovitskiy and Brox 2016). The style's statistics are computed once per clip.
    `count` is how many frames there are (default: `len(frames)`); no more are taken.
    Bad settings raise here, before the first record; closing the generator stops the work at once.
    """
    count = len(frames) if count is None else count  # type: ignore[arg-type]
    frames = iter(frames)
    first = next(frames, None) if count > 0 else None
    if first is None:
        raise SettingsError("The clip has no frames.")
    job = _Job.of(first.size, style, settings, schedule)
    return _optimize_clip(first, itertools.islice(frames, count - 1), count, job, schedule)


@dataclass(frozen=True)
class _Job:
    """What a transfer runs with, checked before any work: bad settings raise in `of`."""

    settings: Settings
    styles: list[Image.Image]
    blend: Sequence[float]
    scales: list[Scale]
    device: torch.device
    precision: str
    weights: Weights

    @classmethod
    def of(
        cls,
        content_size: tuple[int, int],
        style: Image.Image | Sequence[Image.Image],
        settings: Settings,
        schedule: Schedule,
        above: int = 0,
    ) -> _Job:
        settings = settings.with_weights_from_env()
        styles = [style] if isinstance(style, Image.Image) else list(style)
        blend = settings.style_weights or (1.0,) * len(styles)
        if not styles or len(blend) != len(styles):
            raise SettingsError(
                f"Give one style weight per style image: {len(styles)} image(s), {len(blend)} weight(s)."
            )
        if sum(blend) <= 0:
            raise SettingsError("At least one style weight must be above zero.")
        device = pick_device(settings.device)
        precision = pick_precision(settings.precision, device)
        scales = fit_in_memory(plan(content_size, settings, schedule, above=above), settings, device, precision)
        weights = resolve_weights(settings.weights)
        style_layer_weights(settings, BALANCES[weights.kind])  # raises now for layers the balance has no weight for
        if weights.untrained:  # said now, before the work: a run can take minutes
            warnings.warn(weights.note, UntrainedWeightsWarning, stacklevel=3)
        return cls(settings, styles, blend, scales, device, precision, weights)

    def objective(self) -> Objective:
        vgg = feature_extractor(self.settings.layers, self.settings.weights, str(self.device), self.precision)
        return Objective(vgg, self.settings, BALANCES[self.weights.kind], self.precision)

    def recorder(
        self,
        started: float,
        scales: list[Scale],
        work: list[int],
        frame: int = 0,
        frames: int = 0,
        clip: tuple[int, int] | None = None,
    ) -> Callable[..., Progress]:
        """A maker of Progress records for one picture, or one frame of a clip, where `clip` is the clip's work
        done before this frame and its whole work."""
        before, whole = clip or (0, work[-1])

        def record(*, done: float, **fields: Any) -> Progress:
            return Progress(
                total=len(work),
                scales=len(scales),
                elapsed=time.perf_counter() - started,
                done=(before + work[-1] * done) / whole,
                work=whole,
                weights=self.weights.kind,
                device=str(self.device),
                precision=self.precision,
                note=self.weights.note,
                frame=frame,
                frames=frames,
                **fields,
            )

        return record


def _optimize(
    content: Image.Image, mask: Image.Image | None, init_image: Image.Image | None, job: _Job, schedule: Schedule
) -> Iterator[Progress]:
    """The work of `transfer`: each scale's steps in turn (`_Run.scales_steps`), from the start image
    (`_start_image`), then the final picture."""
    settings, scales = job.settings, job.scales
    objective = job.objective()
    photo = _Photo.of(content, mask, settings, scales[-1].size, job.device)
    styles = _Styles(objective, job, photo.colours)
    x = _start_image(init_image, photo.target, settings, scales[0].size, job.device)
    work = work_done(scales)
    run = _Run(
        objective,
        photo,
        schedule,
        settings.optimizer,
        work,
        _Throttle(),
        job.recorder(time.perf_counter(), scales, work),
    )
    with _cuda_cache_emptied(job.device):
        yield from _made(run, x, scales, styles, job.device)


def _optimize_clip(
    first: Image.Image, rest: Iterator[Image.Image], count: int, job: _Job, schedule: Schedule
) -> Iterator[Progress]:
    """The work of `transfer_clip`: the first frame as a picture, each later one from the previous result warped
    along the flow, with the temporal loss."""
    settings, full = job.settings, job.scales[-1].size
    objective = job.objective()
    photo = _Photo.of(first, None, settings, full, job.device)
    styles = _Styles(objective, job, photo.colours)  # the first frame's colours recolour the style, once
    later = later_frame_scales(job.scales, settings)
    first_work, later_work = work_done(job.scales)[-1], work_done(later)[-1]
    clip_work = first_work + (count - 1) * later_work
    started, throttle = time.perf_counter(), _Throttle()
    x = _start_image(None, photo.target, settings, job.scales[0].size, job.device)
    with _cuda_cache_emptied(job.device):
        for number, frame in enumerate(itertools.chain([first], rest), start=1):
            scales = job.scales if number == 1 else later
            if number > 1:
                previous, photo = photo, _Photo.of(frame, None, settings, full, job.device)
                motion, reliable = flow.temporal_guide(previous.colours, photo.colours)
                x = flow.warp(x, motion)
                objective.aim_temporal(x, reliable)
            work = work_done(scales)
            before = first_work + (number - 2) * later_work if number > 1 else 0
            record = job.recorder(started, scales, work, number, count, (before, clip_work))
            run = _Run(objective, photo, schedule, CLIP_OPTIMIZER, work, throttle, record)
            x = yield from _made(run, x, scales, styles, job.device)


def _made(
    run: _Run, x: torch.Tensor, scales: list[Scale], styles: _Styles, device: torch.device
) -> Generator[Progress, None, torch.Tensor]:
    """One picture (or frame) from `x`: every scale's steps, then the final record; returns the picture."""
    with _memory_refused(device, run):
        x = yield from run.scales_steps(x, scales, styles)
    yield run.final(x, scales)
    return x


@contextlib.contextmanager
def _cuda_cache_emptied(device: torch.device) -> Iterator[None]:
    """Whatever way the work ends, the memory it held goes back to the GPU (torch keeps it cached otherwise)."""
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _memory_refused(device: torch.device, run: _Run) -> Iterator[None]:
    """Running out of memory becomes a SettingsError that says the size it happened at."""
    try:
        yield
    except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(error, (MemoryError, torch.OutOfMemoryError)) and "allocate memory" not in str(error):
            raise
        width, height = run.size
        raise SettingsError(
            f"Ran out of {device.type.upper()} memory at {width}x{height} pixels; choose a smaller size."
        ) from None


@dataclass(frozen=True)
class _Photo:
    """The photo as the optimization sees it and as the user is shown the result."""

    colours: torch.Tensor  # the photo, at full size
    target: torch.Tensor  # what VGG compares against: the photo, or its grey version when only luminance is styled
    region: torch.Tensor | None  # where the style goes (1 channel), or None for everywhere
    luminance_only: bool

    @classmethod
    def of(
        cls,
        content: Image.Image,
        mask: Image.Image | None,
        settings: Settings,
        full: tuple[int, int],
        device: torch.device,
    ) -> _Photo:
        photo = images.to_tensor(content, full).to(device)
        luminance_only = settings.preserve_colors == "luminance"
        region = None if mask is None else images.to_tensor(mask.convert("L").convert("RGB"), full)[:, :1].to(device)
        return cls(photo, images.luminance(photo) if luminance_only else photo, region, luminance_only)

    def shown(self, image: torch.Tensor) -> torch.Tensor:
        """What the user sees: the region blended back into the photo, the photo's colours restored."""
        size = (image.shape[-1], image.shape[-2])
        if self.region is not None:
            m = images.resize(self.region, size)
            image = m * image + (1 - m) * images.resize(self.target, size)
        if self.luminance_only:
            image = images.with_chroma_of(image, images.resize(self.colours, size))
        return image.detach()


def _start_image(
    init_image: Image.Image | None,
    target: torch.Tensor,
    settings: Settings,
    first: tuple[int, int],
    device: torch.device,
) -> torch.Tensor:
    """The picture the first scale starts from: `init_image` where given, else noise or the photo (`settings.init`)."""
    if init_image is not None:
        x = images.to_tensor(init_image.convert("RGB"), first).to(device)
        return images.luminance(x) if settings.preserve_colors == "luminance" else x
    if settings.init == "noise":
        generator = torch.Generator().manual_seed(settings.seed)
        return torch.rand((1, 3, first[1], first[0]), generator=generator).to(device)
    return images.resize(target, first)


class _Throttle:
    """When a preview is due: at most one per PREVIEW_SECONDS, the first step's at once, however fast the machine;
    the time the consumer takes over a preview does not count."""

    def __init__(self) -> None:
        self.last = -math.inf

    def due(self) -> bool:
        return time.perf_counter() - self.last >= PREVIEW_SECONDS

    def shown(self) -> None:
        self.last = time.perf_counter()


@dataclass
class _Run:
    """What every scale of one transfer shares: `scale_steps` makes one scale's steps."""

    objective: Objective
    photo: _Photo
    schedule: Schedule
    optimizer: str  # settings.optimizer, for scales made whole
    work: list[int]  # work done after each step (work_done)
    throttle: _Throttle
    record: Callable[..., Progress]
    size: tuple[int, int] = (0, 0)  # of the scale being made, for a message

    def scales_steps(
        self, x: torch.Tensor, scales: list[Scale], styles: _Styles
    ) -> Generator[Progress, None, torch.Tensor]:
        """Every scale's steps in turn, from `x`; returns the picture at the end."""
        step = 0
        for index, scale in enumerate(scales, start=1):
            self.objective.aim_style(styles.at(scale))
            x = yield from self.scale_steps(x, scale, index, step, last=index == len(scales))
            step += scale.steps
        return x

    def final(self, x: torch.Tensor, scales: list[Scale]) -> Progress:
        return self.record(
            step=len(self.work),
            scale=len(scales),
            size=scales[-1].size,
            done=1.0,
            losses=self.objective.last_losses(),
            tile=0,
            tiles=0,
            final=True,
            pixels=self.photo.shown(x),
        )

    def scale_steps(
        self, x: torch.Tensor, scale: Scale, index: int, steps_before: int, *, last: bool
    ) -> Generator[Progress, None, torch.Tensor]:
        """One scale's steps from `x` (the picture so far), whole or tile by tile, yielding previews when due;
        returns the picture at the end of the scale. At a tiled scale each step is a sweep over the tiles."""
        work, objective = self.work, self.objective
        self.size = scale.size
        region = None if self.photo.region is None else images.resize(self.photo.region, scale.size)
        objective.aim(images.resize(self.photo.target, scale.size), region, scale.tile)
        start = images.resize(x, scale.size)
        del x  # the previous scale's picture: memory for this one's
        # L-BFGS makes only the last scale: its large first steps at the small scales lay out swirls across the
        # photo's houses, which Adam's bounded steps do not (bench/README.md); at full size it reaches a lower loss.
        if self.optimizer == "lbfgs" and last and not scale.tile:
            optimizer: tiles.Adam | _Lbfgs = _Lbfgs(objective, start, self.schedule.average_decay)
        else:  # tiled scales always use Adam: L-BFGS's history is of whole-picture steps
            optimizer = tiles.Adam(start, self.schedule.learning_rate, self.schedule.average_decay)
        del start
        for sweep in range(1, scale.steps + 1):
            step = steps_before + sweep - 1  # the steps done before this one
            cores = scale.grid(sweep)
            if scale.tile:
                objective.gather(optimizer.x)
            before = work[step - 1] if step else 0
            for number, (rows, columns) in enumerate(cores, start=1):
                if isinstance(optimizer, _Lbfgs):
                    optimizer.step()
                else:
                    optimizer.step(rows, columns, objective.gradient(optimizer.x, rows, columns), sweep)
                steps_done = step + (number == len(cores))
                if self.throttle.due() and steps_done < len(work):
                    yield self.record(
                        step=steps_done,
                        scale=index,
                        size=scale.size,
                        done=(before + (work[step] - before) * number / len(cores)) / work[-1],
                        losses=objective.last_losses(),
                        tile=number if scale.tile else 0,
                        tiles=len(cores) if scale.tile else 0,
                        final=False,
                        # A copy: the average goes on changing in place after the preview is handed on.
                        pixels=self.photo.shown(optimizer.average.clone()),
                    )
                    self.throttle.shown()
        return optimizer.average


class _Lbfgs:
    """L-BFGS steps on a whole picture, clamped to [0, 1] after each step (never inside its closure), with the
    averaged iterate, as tiles.Adam keeps it."""

    def __init__(self, objective: Objective, start: torch.Tensor, average_decay: float):
        self.x = start.detach().clone(memory_format=torch.contiguous_format).requires_grad_(True)
        # No tolerances: the engine counts the steps itself, and small losses (untrained features) have
        # gradients below L-BFGS's default tolerance from the start. A history of 10 steps scored as 20 and 50
        # did (bench/README.md) and keeps 240 bytes a pixel (two float32 pictures a step): within the room
        # plan.BYTES_PER_PIXEL leaves above what was measured.
        self.optimizer = torch.optim.LBFGS(
            [self.x], lr=1, max_iter=1, history_size=10, tolerance_grad=0, tolerance_change=0
        )
        self.closure = functools.partial(objective.closure, self.x, self.optimizer)
        self.average = self.x.detach().clone()
        self.average_decay = average_decay
        self.steps = 0

    def step(self) -> None:
        self.optimizer.step(self.closure)
        self.steps += 1
        with torch.no_grad():
            self.x.clamp_(0, 1)
            tiles.average_into(self.average, self.x, self.steps, self.average_decay)


class _Styles:
    """The style images as the optimization sees them, and their statistics at each scale's size, computed once
    for each size (a clip's later frames share the first frame's last)."""

    def __init__(self, objective: Objective, job: _Job, colours: torch.Tensor):
        settings = job.settings
        side = min(STYLE_MAX_SIDE, round(settings.style_scale * settings.size))
        self.tensors = [images.to_tensor(s, images.fit(s.size, side)).to(job.device) for s in job.styles]
        if settings.preserve_colors == "histogram":
            self.tensors = [images.match_colors(s, colours) for s in self.tensors]
        elif settings.preserve_colors == "luminance":
            self.tensors = [images.match_luminance(s, colours) for s in self.tensors]
        self.objective, self.blend, self.settings = objective, job.blend, settings
        self.targets: dict[tuple[tuple[int, int], int], dict[str, StyleTarget]] = {}

    def at(self, scale: Scale) -> dict[str, StyleTarget]:
        key = (scale.size, scale.tile)
        if key not in self.targets:
            objective = self.objective
            self.targets[key] = _style_targets(
                objective.vgg, self.tensors, self.blend, objective.layer_weights, scale, self.settings
            )
        return self.targets[key]


def _style_targets(
    vgg: torch.nn.Module,
    styles: list[torch.Tensor],
    blend: Sequence[float],
    layer_weights: dict[str, float],
    scale: Scale,
    settings: Settings,
) -> dict[str, StyleTarget]:
    """The style images' blended Gaussians at the scale's size, with their square roots: once per scale."""
    side = min(STYLE_MAX_SIDE, round(settings.style_scale * max(scale.size)))
    parts = [
        tiled_gaussians(
            vgg,
            images.resize(style, images.fit((style.shape[-1], style.shape[-2]), side)),
            list(layer_weights),
            scale.tile,
        )
        for style in styles
    ]
    return {name: StyleTarget.of(mixture([part[name] for part in parts], list(blend))) for name in layer_weights}
