"""The plan of a transfer, known before it starts: its scales (coarse to fine), their steps and tiles, and the work
each step costs (what the job clock prices a job by).

A transfer starts small (about 128 px on the long side), where steps are cheap and the layout forms, and is
upsampled by about sqrt(2) per scale up to the requested size, with fewer steps at each larger scale. A scale
with more pixels than a `tile_size` square (or than memory allows) is optimized tile by tile as the one picture it
is (tiles.py). Making a result bigger, only the scales above its size are made.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from . import images, tiles
from .device import free_memory
from .losses import CELL, piece_grid
from .settings import MIN_TILE_SIZE, Settings, SettingsError

if TYPE_CHECKING:
    import torch

MIN_SHORT_SIDE = 32  # below this, VGG19's deep layers see less than two pixels
# Peak working memory per pixel optimized at once, by the network's precision (bench/README.md, with room to
# spare), and per pixel of the picture, whose state stays whole in memory however it is made: picture, photo,
# region, Adam's two moments and the average (4 bytes a channel each), the content target (relu4_2: 512 channels
# at an 8th of the side), and the previews' and the next scale's copies.
BYTES_PER_PIXEL = {"fp32": 3500, "bf16": 3200, "fp16": 3200}
PICTURE_BYTES_PER_PIXEL = 160
# Auto tiles: the most working memory what is optimized at once (a whole scale or one tile) takes, whatever is
# free, so a print's peak stays within a few GB (bench/README.md: a 4096 px picture peaked at 5.4 GiB with 3 GiB,
# 6.5 with 4, in the same time).
TILE_BYTES = 3 * 2**30


@dataclass(frozen=True)
class Schedule:
    """How a transfer spends its steps; bench/README.md has what other values did on trained features."""

    start_side: int = 128  # long side of the first scale
    step_decay: float = 0.8  # each scale gets this share of the previous scale's steps, but the last:
    # after the last upsampling the loss jumps (the full size's style has detail the smaller picture lacks), and
    # the full size needs this many times its share to make it up.
    final_boost: float = 2.5
    learning_rate: float = 0.04  # Adam's, in pixel units (images in [0, 1])
    average_decay: float = 0.8  # what is shown and kept: an exponential moving average of the iterates


SCHEDULE = Schedule()


@dataclass(frozen=True)
class Scale:
    size: tuple[int, int]  # (width, height)
    steps: int
    tile: int  # its tiles hold at most tile² px (tiles.shape: square or strips); 0 where it is optimized whole

    def grid(self, sweep: int) -> list[tuple[slice, slice]]:
        """(rows, columns) of each tile's core at a sweep (1-based; each sweep is one step of the whole picture):
        the whole picture where the scale is made whole."""
        if not self.tile:
            return [(slice(0, self.size[1]), slice(0, self.size[0]))]
        return tiles.grid(self.size, self.tile, sweep)

    def step_cost(self, sweep: int) -> int:
        """The work of a step (see work_done): its pixels, or at a tiled scale the pixels its tiles see, margins
        included, and a third of those its statistics pass sees (a forward without a backward)."""
        if not self.tile:
            return self.size[0] * self.size[1]
        pieces = piece_grid(self.size, tiles.statistics_side(self.tile))
        statistics = sum((rows.stop - rows.start) * (columns.stop - columns.start) for _, _, rows, columns in pieces)
        return tiles.work(self.size, self.grid(sweep)) + statistics // 3

    @property
    def work(self) -> int:
        """The work of all its steps."""
        return sum(self.step_cost(sweep) for sweep in range(1, self.steps + 1))


def scale_sizes(
    image_size: tuple[int, int], long_side: int, start_side: int = SCHEDULE.start_side
) -> list[tuple[int, int]]:
    """(width, height) of each scale: geometric from about `start_side` up to `long_side`."""
    aspect = max(image_size) / min(image_size)
    if long_side / aspect < MIN_SHORT_SIDE:
        raise SettingsError(
            f"An output {long_side} px long is too small for this {image_size[0]}x"
            f"{image_size[1]} image; choose at least {math.ceil(MIN_SHORT_SIDE * aspect)} px."
        )
    start = min(long_side, max(start_side, math.ceil(MIN_SHORT_SIDE * aspect)))
    count = math.ceil(math.log(long_side / start) / math.log(math.sqrt(2)) - 1e-9)
    sides = [round(start * (long_side / start) ** (k / count)) for k in range(count)] + [long_side]
    return [images.fit(image_size, side) for side in sides]


def split_steps(total: int, scales: int, schedule: Schedule = SCHEDULE) -> list[int]:
    """Steps per scale, decaying geometrically so most of the work is at the cheap small scales, the last
    scale's share multiplied by `final_boost`; at least one each (there are never more scales than steps)."""
    shares = [schedule.step_decay**k for k in range(scales)]
    shares[-1] *= schedule.final_boost
    spare = total - scales  # steps past the one each scale has
    counts = [1 + math.floor(spare * share / sum(shares)) for share in shares]
    counts[0] += total - sum(counts)
    return counts


def plan(
    image_size: tuple[int, int], settings: Settings, schedule: Schedule = SCHEDULE, *, above: int = 0
) -> list[Scale]:
    """The scales of a transfer: size, steps, and the tile side where `tile_size` asks for tiles. Making a picture
    `above` px long bigger, only the scales longer than it (with the steps they have in the whole plan)."""
    sizes = scale_sizes(image_size, settings.size, schedule.start_side)[-settings.steps :]
    tile = max(0, settings.tile_size)
    scales = [
        Scale(size, steps, tile if 0 < tile**2 < math.prod(size) else 0)
        for size, steps in zip(sizes, split_steps(settings.steps, len(sizes), schedule), strict=True)
        if max(size) > above
    ]
    if not scales:
        raise SettingsError(f"To make a {above} px picture bigger, choose a size above {above} px.")
    return scales


def work_done(scales: list[Scale]) -> list[int]:
    """Work done after each step, a step costing the pixels VGG19 runs through (Scale.step_cost): what its time
    grows with."""
    return list(itertools.accumulate(scale.step_cost(sweep) for scale in scales for sweep in range(1, scale.steps + 1)))


def later_frame_scales(scales: list[Scale], settings: Settings) -> list[Scale]:
    """A later frame of a clip whose first frame is made with `scales`: one scale at full size, whose steps cost
    `settings.later_frames` of the first frame's work (it starts from the previous result, which has the style
    already)."""
    full = scales[-1]
    steps = max(1, round(settings.later_frames * work_done(scales)[-1] / full.step_cost(1)))
    return [replace(full, steps=steps)]


def job_scales(content_size: tuple[int, int], settings: Settings, above: int = 0) -> list[Scale]:
    """The scales of a transfer of a `content_size` photo (`above` as for plan) as they are known before it starts:
    with the tiles `tile_size` asks for and those auto tiles add past TILE_BYTES (in float32's bytes where the
    precision is auto). Tiles that a device's free memory may call for are left out: a server's memory is not known
    before its device is."""
    precision = "fp32" if settings.precision == "auto" else settings.precision
    return fit_in_memory(plan(content_size, settings, above=above), settings, None, precision)


def job_work(content_size: tuple[int, int], settings: Settings, above: int = 0, frames: int = 1) -> int:
    """The total work of a transfer (see work_done; its scales as job_scales has them), or of a clip of `frames`
    such frames (the first's work, then each later frame's), known before it starts."""
    scales = job_scales(content_size, settings, above)
    later = work_done(later_frame_scales(scales, settings))[-1] if frames > 1 else 0
    return work_done(scales)[-1] + (frames - 1) * later


def peak_bytes(scale: Scale, precision: str) -> int:
    """The memory model: the picture's state, and the working memory of what is optimized at once."""
    width, height = scale.size
    at_once = math.prod(tiles.shape(scale.size, scale.tile)) if scale.tile else width * height
    return PICTURE_BYTES_PER_PIXEL * width * height + BYTES_PER_PIXEL[precision] * at_once


def fit_in_memory(scales: list[Scale], settings: Settings, device: torch.device | None, precision: str) -> list[Scale]:
    """The scales with tiles where one whole would take more working memory than TILE_BYTES, or more than the
    device has free (where there is a device and its free memory is known): tiles whose working memory stays within
    both. Where `tile_size` says never, a scale is made whole if it fits in free memory. A size that does not fit
    even so is refused now rather than killed half-way."""
    free = None if device is None else free_memory(device)
    never = settings.tile_size == 0

    def fitted(scale: Scale) -> Scale:
        width, height = scale.size
        if scale.tile or (never and free is None):
            return scale
        room = None if free is None else free - PICTURE_BYTES_PER_PIXEL * width * height  # beside the picture's state
        budget = room if never else TILE_BYTES if room is None else min(TILE_BYTES, room)
        if BYTES_PER_PIXEL[precision] * width * height <= budget:
            return scale
        side = math.isqrt(max(0, budget) // BYTES_PER_PIXEL[precision]) // CELL * CELL
        if never or side < MIN_TILE_SIZE:
            raise SettingsError(
                f"A {width}x{height} picture needs about {peak_bytes(scale, precision) / 2**30:.1f} GB "
                f"of memory and {free / 2**30:.1f} GB is free on this {device.type.upper()}; "
                f"choose a smaller size" + (" or let it be made in tiles." if side >= MIN_TILE_SIZE else ".")
            )
        return replace(scale, tile=side)

    return [fitted(scale) for scale in scales]
