"""The plan of a transfer, known before it starts: its scales (coarse to fine), their steps and tiles, and the work
each step costs (what the job clock prices a job by).

A transfer starts small (about 128 px on the long side), where steps are cheap and the layout forms, and is
upsampled by about sqrt(2) per scale up to the requested size, with fewer steps at each larger scale. A scale
bigger than `tile_size` is optimized in overlapping tiles, the grid moved between passes.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from . import images
from .device import free_memory
from .settings import MIN_TILE_SIZE, Settings, SettingsError

if TYPE_CHECKING:
    import torch

MIN_SHORT_SIDE = 32  # below this, VGG19's deep layers see less than two pixels
TILE_OVERLAP = 64  # px that neighbouring tiles share, blended with feathered edges
# Peak working memory per pixel optimized at once, by the network's precision (bench/README.md, with room to
# spare), and per pixel of a tiled picture, which stays whole in memory (picture, photo, region, snapshot).
BYTES_PER_PIXEL = {"fp32": 3500, "bf16": 3200, "fp16": 3200}
PICTURE_BYTES_PER_PIXEL = 80


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
    tile: int  # side of the square tiles it is optimized in, in px; 0 where it is optimized whole

    @property
    def passes(self) -> int:
        """Passes over the tiles, the grid moved between them; each tile gets steps / passes steps a pass."""
        return 2 if self.tile and self.steps >= 4 else 1

    def tile_steps(self, tile_pass: int) -> int:
        return self.steps // self.passes + (tile_pass < self.steps % self.passes)

    def grid(self, tile_pass: int) -> list[tuple[slice, slice]]:
        """(rows, columns) of each tile in a pass; the grid moves by half a tile between passes."""
        if not self.tile:
            return [(slice(0, self.size[1]), slice(0, self.size[0]))]
        shifted = tile_pass % 2 == 1
        return [
            (rows, columns)
            for rows in _spans(self.size[1], self.tile, shifted)
            for columns in _spans(self.size[0], self.tile, shifted)
        ]

    @property
    def step_cost(self) -> int:
        """Pixels optimized by one step over the whole picture: overlapping tiles count their overlap twice, and
        the passes' grids (which differ in tiles) are averaged over the steps."""

        def area(grid: list[tuple[slice, slice]]) -> int:
            return sum((r.stop - r.start) * (c.stop - c.start) for r, c in grid)

        return round(sum(self.tile_steps(p) * area(self.grid(p)) for p in range(self.passes)) / self.steps)


def _spans(length: int, tile: int, shifted: bool) -> list[slice]:
    """Overlapping spans of at most `tile` px along one axis: equal parts, each reaching half the overlap past
    its ends; `shifted`, the cuts fall halfway between the unshifted ones (and the end parts are half parts)."""
    if length <= tile:
        return [slice(0, length)]
    parts = math.ceil(length / (tile - TILE_OVERLAP))
    cuts = [round(length * (k - 0.5 * shifted) / parts) for k in range(1, parts + shifted)]
    bounds = [0, *cuts, length]
    half = TILE_OVERLAP // 2
    return [slice(max(0, a - half), min(length, b + half)) for a, b in itertools.pairwise(bounds)]


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


def plan(image_size: tuple[int, int], settings: Settings, schedule: Schedule = SCHEDULE) -> list[Scale]:
    """The scales of a transfer: size, steps, and the tile side where `tile_size` asks for tiles."""
    sizes = scale_sizes(image_size, settings.size, schedule.start_side)[-settings.steps :]
    return [
        Scale(size, steps, settings.tile_size if 0 < settings.tile_size < max(size) else 0)
        for size, steps in zip(sizes, split_steps(settings.steps, len(sizes), schedule), strict=True)
    ]


def work_done(scales: list[Scale]) -> list[int]:
    """Work done after each step, a step costing the pixels it optimizes: what VGG19's time grows with."""
    return list(itertools.accumulate(scale.step_cost for scale in scales for _ in range(scale.steps)))


def job_work(content_size: tuple[int, int], settings: Settings) -> int:
    """The total work of a transfer of a `content_size` photo (see work_done), known before it starts (tiles
    that memory may call for, and their overlap, left out)."""
    return work_done(plan(content_size, settings))[-1]


def fit_in_memory(scales: list[Scale], settings: Settings, device: torch.device, precision: str) -> list[Scale]:
    """The scales with tiles where one would not fit in the device's free memory whole (unless `tile_size` says
    never); a size that does not fit even so is refused now rather than killed half-way."""
    free = free_memory(device)
    per_pixel = BYTES_PER_PIXEL[precision]

    def fitted(scale: Scale) -> Scale:
        width, height = scale.size
        if scale.tile or free is None or per_pixel * width * height <= free:
            return scale
        side = math.isqrt(max(0, free - PICTURE_BYTES_PER_PIXEL * width * height) // per_pixel) // 16 * 16
        if settings.tile_size == 0 or side < MIN_TILE_SIZE:
            raise SettingsError(
                f"A {width}x{height} picture needs about {per_pixel * width * height / 2**30:.1f} GB "
                f"of memory and {free / 2**30:.1f} GB is free on this {device.type.upper()}; "
                f"choose a smaller size" + (" or let it be made in tiles." if side >= MIN_TILE_SIZE else ".")
            )
        return replace(scale, tile=side)

    return [fitted(scale) for scale in scales]
