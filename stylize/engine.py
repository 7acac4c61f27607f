"""The optimization: coarse-to-fine scales, tiles past memory, a stream of Progress records.

The output image is optimized directly so that its VGG19 activations match the photo's at a deep layer and
the Gaussian statistics of the style images' activations at several layers (losses.py). It starts small
(about 128 px on the long side), where steps are cheap and the layout forms, and is upsampled by about
sqrt(2) per scale up to the requested size, with fewer steps at each larger scale. A scale too big to
optimize at once (or bigger than `tile_size`) is optimized tile by tile: overlapping tiles, each pulled
towards the whole style's statistics, blended back with feathered edges, the grid moved between passes.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from . import images
from .device import pick_device, pick_precision
from .losses import (
    BALANCES,
    Balance,
    StyleTarget,
    content_loss,
    mixture,
    style_layer_weights,
    style_loss,
    tiled_gaussians,
    tv_loss,
)
from .plan import SCHEDULE, TILE_OVERLAP, Scale, Schedule, fit_in_memory, plan, work_done
from .settings import Settings, SettingsError
from .vgg import UntrainedWeightsWarning, Weights, feature_extractor, resolve_weights

PREVIEW_SECONDS = 0.25  # at most one preview per this long, after the first step's
STYLE_MAX_SIDE = 2048  # the style image is never seen larger than this


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
    losses: dict[str, float]
    weights: str  # "imagenet", "caffe" or "untrained"
    device: str  # where it runs: "cpu", "cuda:0", "mps"
    precision: str  # the network's number format: "fp32", "bf16" or "fp16"
    note: str  # a warning for the user ("" when there is none), e.g. untrained weights
    tile: int  # 1-based index of the tile last optimized at a tiled scale; 0 where the scale is whole
    tiles: int  # tiles per pass at the current scale; 0 where the scale is whole
    final: bool
    pixels: torch.Tensor = field(repr=False)  # (1, 3, H, W) in [0, 1], on the engine's device

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
    schedule: Schedule = SCHEDULE,
) -> Iterator[Progress]:
    """Stylize `content` with one or more `style` images; yields previews, then the final image.

    `mask` (greyscale, over the content) limits the style to its white parts;
    `init_image` (e.g. a previous result) replaces `settings.init` as the start;
    `schedule` is the engine's own (benches compare others).
    Bad settings raise here, before the first record; closing the generator stops the work at once.
    """
    settings = settings.with_weights_from_env()
    styles = [style] if isinstance(style, Image.Image) else list(style)
    blend = settings.style_weights or (1.0,) * len(styles)
    if not styles or len(blend) != len(styles):
        raise SettingsError(f"Give one style weight per style image: {len(styles)} image(s), {len(blend)} weight(s).")
    if sum(blend) <= 0:
        raise SettingsError("At least one style weight must be above zero.")
    device = pick_device(settings.device)
    precision = pick_precision(settings.precision, device)
    scales = fit_in_memory(plan(content.size, settings, schedule), settings, device, precision)
    weights = resolve_weights(settings.weights)
    style_layer_weights(settings, BALANCES[weights.kind])  # raises now for layers the balance has no weight for
    if weights.untrained:  # said now, before the work: a run can take minutes
        warnings.warn(weights.note, UntrainedWeightsWarning, stacklevel=2)
    # Everything above raises now, at the call; the work itself starts at the first next().
    return _optimize(content, styles, blend, mask, init_image, settings, schedule, scales, device, weights, precision)


def _optimize(
    content: Image.Image,
    styles: list[Image.Image],
    blend: Sequence[float],
    mask: Image.Image | None,
    init_image: Image.Image | None,
    settings: Settings,
    schedule: Schedule,
    scales: list[Scale],
    device: torch.device,
    weights: Weights,
    precision: str,
) -> Iterator[Progress]:
    """The work of `transfer`: each scale's steps in turn (`_scale_steps`), from the start image (`_start_image`),
    then the final picture."""
    vgg = feature_extractor(settings.layers, settings.weights, str(device), precision)
    objective = _Objective(vgg, settings, BALANCES[weights.kind], precision)
    full = scales[-1].size
    photo = _Photo.of(content, mask, settings, full, device)
    style_side = min(STYLE_MAX_SIDE, round(settings.style_scale * settings.size))
    style_tensors = [images.to_tensor(s, images.fit(s.size, style_side)).to(device) for s in styles]
    if settings.preserve_colors == "histogram":
        style_tensors = [images.match_colors(s, photo.colours) for s in style_tensors]
    elif settings.preserve_colors == "luminance":
        style_tensors = [images.match_luminance(s, photo.colours) for s in style_tensors]
    x = _start_image(init_image, photo.target, settings, scales[0].size, device)

    started = time.perf_counter()

    def record(**fields: Any) -> Progress:
        return Progress(
            total=settings.steps,
            scales=len(scales),
            elapsed=time.perf_counter() - started,
            weights=weights.kind,
            device=str(device),
            precision=precision,
            note=weights.note,
            **fields,
        )

    run = _Run(objective, photo, settings, schedule, work_done(scales), _Throttle(), record)
    step = 0
    try:
        for index, scale in enumerate(scales, start=1):
            objective.aim_style(_style_targets(vgg, style_tensors, blend, objective.layer_weights, scale, settings))
            x = yield from run.scale_steps(x, scale, index, step)
            step += scale.steps
        yield record(
            step=step,
            scale=len(scales),
            size=full,
            done=1.0,
            losses=objective.last_losses(),
            tile=0,
            tiles=0,
            final=True,
            pixels=photo.shown(x),
        )
    except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(error, (MemoryError, torch.OutOfMemoryError)) and "allocate memory" not in str(error):
            raise
        raise SettingsError(
            f"Ran out of {device.type.upper()} memory at {scale.size[0]}x{scale.size[1]} pixels; choose a smaller size."
        ) from None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


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

    objective: _Objective
    photo: _Photo
    settings: Settings
    schedule: Schedule
    work: list[int]  # work done after each step (work_done)
    throttle: _Throttle
    record: Callable[..., Progress]

    def scale_steps(
        self, x: torch.Tensor, scale: Scale, index: int, steps_before: int
    ) -> Generator[Progress, None, torch.Tensor]:
        """One scale's steps on `x` (the picture so far), whole or tile by tile, yielding previews when due;
        returns the picture at the end of the scale."""
        work, objective = self.work, self.objective
        photo_here = images.resize(self.photo.target, scale.size)
        region_here = None if self.photo.region is None else images.resize(self.photo.region, scale.size)
        x = images.resize(x, scale.size).clone()  # tiles are written into it: never the photo itself
        picture = self.photo.shown(x).clone() if scale.tile else None  # a tiled scale's previews: as of the last tile
        work_before, cost = work[steps_before - 1] if steps_before else 0, scale.step_cost
        scale_end = work[steps_before + scale.steps - 1]
        tile_work = 0
        for tile_pass in range(scale.passes):
            grid = scale.grid(tile_pass)
            for number, (rows, columns) in enumerate(grid, start=1):
                objective.aim_content(
                    photo_here[..., rows, columns], None if region_here is None else region_here[..., rows, columns]
                )
                descent = _Descent(objective, x[..., rows, columns], self.settings, self.schedule)
                for _ in range(scale.tile_steps(tile_pass)):
                    descent.step()
                    tile_work += descent.x[0, 0].numel()
                    step = steps_before + min(tile_work // cost, scale.steps)
                    if self.throttle.due() and step < self.settings.steps:
                        yield self.record(
                            step=step,
                            scale=index,
                            size=scale.size,
                            done=min(work_before + tile_work, scale_end) / work[-1],
                            losses=objective.last_losses(),
                            tile=number if scale.tile else 0,
                            tiles=len(grid) if scale.tile else 0,
                            final=False,
                            pixels=picture if scale.tile else self.photo.shown(descent.average()),
                        )
                        self.throttle.shown()
                if scale.tile:
                    _blend_tile(x, descent.average(), rows, columns, scale.size)
                    picture = self.photo.shown(x).clone()
                else:
                    x = descent.average()
        return x


class _Descent:
    """Optimizer steps on a picture or one tile of it, clamped to [0, 1] after each step (never inside an
    L-BFGS closure), with an exponential moving average of the iterates: what is shown and kept."""

    def __init__(self, objective: _Objective, start: torch.Tensor, settings: Settings, schedule: Schedule):
        self.x = start.detach().clone(memory_format=torch.contiguous_format).requires_grad_(True)
        self.decay = schedule.average_decay
        if settings.optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam([self.x], lr=schedule.learning_rate)
        else:
            # No tolerances: the engine counts the steps itself, and small losses (untrained features) have
            # gradients below L-BFGS's default tolerance from the start.
            self.optimizer = torch.optim.LBFGS(
                [self.x], lr=1, max_iter=1, history_size=50, tolerance_grad=0, tolerance_change=0
            )
        self.closure = functools.partial(objective.closure, self.x, self.optimizer)
        self.sum = torch.zeros_like(self.x)
        self.weight = 0.0

    def step(self) -> None:
        self.optimizer.step(self.closure)
        with torch.no_grad():
            self.x.clamp_(0, 1)
            self.sum.mul_(self.decay).add_(self.x, alpha=1 - self.decay)
        self.weight = self.decay * self.weight + 1 - self.decay

    def average(self) -> torch.Tensor:
        return self.sum / self.weight


def _blend_tile(picture: torch.Tensor, tile: torch.Tensor, rows: slice, columns: slice, size: tuple[int, int]) -> None:
    """Write an optimized tile back into the picture, fading in over the overlap where a neighbour lies."""

    def ramp(span: slice, length: int) -> torch.Tensor:
        position = torch.arange(span.start, span.stop, device=tile.device, dtype=tile.dtype)
        weight = torch.ones_like(position)
        if span.start > 0:
            weight = torch.minimum(weight, (position - span.start + 1) / (TILE_OVERLAP + 1))
        if span.stop < length:
            weight = torch.minimum(weight, (span.stop - position) / (TILE_OVERLAP + 1))
        return weight

    window = ramp(rows, size[1])[:, None] * ramp(columns, size[0])[None, :]
    region = picture[..., rows, columns]
    region.mul_(1 - window).add_(tile * window)


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


class _Objective:
    """The loss of a picture, or of a tile of it: style targets set once per scale (`aim_style`), the content
    target and the region per tile (`aim_content`)."""

    def __init__(self, vgg: torch.nn.Module, settings: Settings, balance: Balance, precision: str):
        self.vgg = vgg
        self.settings = settings
        self.balance = balance
        self.layer_weights = style_layer_weights(settings, balance)
        # float16 gradients would underflow: its network sees the loss summed over pixels instead of averaged.
        self.gradient_scale = (lambda x: x.numel()) if precision == "fp16" else (lambda x: 1)
        self.losses: dict[str, torch.Tensor] = {}

    def aim_style(self, targets: dict[str, StyleTarget]) -> None:
        self.style_targets = targets

    @torch.no_grad()
    def aim_content(self, photo: torch.Tensor, region: torch.Tensor | None) -> None:
        self.photo, self.region = photo, region
        features = self.vgg(photo)
        self.content_target = features[self.settings.content_layer]
        self.masks = (
            None
            if region is None
            else {
                name: torch.nn.functional.interpolate(region, size=features[name].shape[-2:], mode="area")
                for name in self.layer_weights
            }
        )
        self.unit: torch.Tensor | None = None  # the loss at the first step against these targets

    def closure(self, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        image = x if self.region is None else self.region * x + (1 - self.region) * self.photo
        features = self.vgg(image)
        s = self.settings
        self.losses = {
            "content": content_loss(features[s.content_layer], self.content_target),
            "style": sum(
                weight
                * style_loss(features[name], self.style_targets[name], None if self.masks is None else self.masks[name])
                for name, weight in self.layer_weights.items()
            ),
            "tv": tv_loss(image),
        }
        total = (
            self.balance.content * s.content_strength * self.losses["content"]
            + s.style_strength * self.losses["style"]
            + self.balance.tv * s.smoothing * self.losses["tv"]
        )
        # The optimizer sees the loss in units of its value at the first step: L-BFGS's curvature test and
        # Adam's epsilon are absolute, and the losses of different weights differ in size by orders of magnitude.
        if self.unit is None:
            self.unit = total.detach().clamp_min(1e-12)
        scale = self.gradient_scale(x)
        (total / self.unit * scale).backward()
        if scale != 1:
            x.grad.div_(scale)
        self.losses = {"total": total.detach(), **{k: v.detach() for k, v in self.losses.items()}}
        return total.detach() / self.unit

    def last_losses(self) -> dict[str, float]:
        """The losses at the last step (of the last tile, at a tiled scale)."""
        return {name: value.item() for name, value in self.losses.items()}
