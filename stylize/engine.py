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
import itertools
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from . import images
from .losses import (
    BALANCES,
    Balance,
    Gaussian,
    StyleTarget,
    content_loss,
    gaussian,
    mixture,
    style_loss,
    tv_loss,
)
from .settings import MIN_TILE_SIZE, Settings, SettingsError
from .vgg import UntrainedWeightsWarning, Weights, feature_extractor, resolve_weights, stride

MIN_SHORT_SIDE = 32  # below this, VGG19's deep layers see less than two pixels
PREVIEW_SECONDS = 0.25  # at most one preview per this long, after the first step's
STYLE_MAX_SIDE = 2048  # the style image is never seen larger than this
# Peak working memory per pixel optimized at once, by the network's precision (bench/README.md, with room to
# spare), and per pixel of a tiled picture, which stays whole in memory (picture, photo, region, snapshot).
BYTES_PER_PIXEL = {"fp32": 3500, "bf16": 3200, "fp16": 3200}
PICTURE_BYTES_PER_PIXEL = 80
TILE_OVERLAP = 64  # px that neighbouring tiles share, blended with feathered edges
STATISTICS_MARGIN = 64  # px of context around a tile whose statistics are taken (style images past the tile size)


@dataclass(frozen=True)
class Schedule:
    """How a transfer spends its steps; bench/README.md has what other values did on trained features."""

    start_side: int = 128  # long side of the first scale
    step_decay: float = 0.9  # each scale gets this share of the previous scale's steps
    learning_rate: float = 0.02  # Adam's, in pixel units (images in [0, 1])
    average_decay: float = 0.8  # what is shown and kept: an exponential moving average of the iterates


SCHEDULE = Schedule()


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
        return [(rows, columns) for rows in _spans(self.size[1], self.tile, shifted)
                for columns in _spans(self.size[0], self.tile, shifted)]

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


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        device = torch.device(name)
        available = {"cpu": True, "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
                     "mps": torch.backends.mps.is_available()}
        if not available[device.type]:
            raise SettingsError(f"Device {name!r} is not available on this machine; use 'auto' or 'cpu'.")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    _configure(device.type)
    return device


def pick_precision(name: str, device: torch.device) -> str:
    """The network's number format: `name`, or for "auto" the fastest that keeps quality on `device`:
    bfloat16 where the hardware runs it natively, float16 on other GPUs, float32 elsewhere (bench/README.md)."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"  # MPS, and CPUs that emulate bfloat16 (slower than float32 there)


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU has bfloat16 instructions (AVX512-BF16 or AMX-BF16), from Linux's list of its features."""
    try:
        with open(cpuinfo) as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def gpu_names() -> list[str]:
    """This machine's CUDA devices as device names ("cuda:0", "cuda:1", ...), for spreading runs over them."""
    return [f"cuda:{index}" for index in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


@functools.cache
def _configure(device_type: str) -> None:
    if device_type == "cuda":
        # TF32 convolutions and matmuls: several times faster, far below visible precision.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif device_type == "cpu":
        torch.set_num_threads(cpu_budget())


def cpu_budget() -> int:
    """CPUs this process may really use: affinity, and a container's CPU quota (cgroup v2)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


def free_memory(device: torch.device) -> int | None:
    """Bytes this process can still allocate on `device`, or None where that cannot be known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    limits = []
    try:
        meminfo = dict(line.split(":") for line in open("/proc/meminfo"))
        limits.append(int(meminfo["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        pass
    # The container's limit: cgroup v2, or v1 (which reports no limit as a number near 2**63).
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            maximum = open(f"/sys/fs/cgroup/{limit_file}").read().strip()
            if maximum != "max" and int(maximum) < 2**60:
                limits.append(int(maximum) - int(open(f"/sys/fs/cgroup/{usage_file}").read()))
        except (OSError, ValueError):
            pass
    return min(limits) if limits else None


def scale_sizes(image_size: tuple[int, int], long_side: int, start_side: int = SCHEDULE.start_side
                ) -> list[tuple[int, int]]:
    """(width, height) of each scale: geometric from about `start_side` up to `long_side`."""
    aspect = max(image_size) / min(image_size)
    if long_side / aspect < MIN_SHORT_SIDE:
        raise SettingsError(f"An output {long_side} px long is too small for this {image_size[0]}x"
                            f"{image_size[1]} image; choose at least {math.ceil(MIN_SHORT_SIDE * aspect)} px.")
    start = min(long_side, max(start_side, math.ceil(MIN_SHORT_SIDE * aspect)))
    count = math.ceil(math.log(long_side / start) / math.log(math.sqrt(2)) - 1e-9)
    sides = [round(start * (long_side / start) ** (k / count)) for k in range(count)] + [long_side]
    return [images.fit(image_size, side) for side in sides]


def split_steps(total: int, scales: int, decay: float = SCHEDULE.step_decay) -> list[int]:
    """Steps per scale, decaying geometrically so most of the work is at the cheap small scales; at least one
    each (there are never more scales than steps)."""
    shares = [decay**k for k in range(scales)]
    counts = [max(1, math.floor(total * share / sum(shares))) for share in shares]
    counts[0] += total - sum(counts)
    return counts


def plan(image_size: tuple[int, int], settings: Settings, schedule: Schedule = SCHEDULE) -> list[Scale]:
    """The scales of a transfer: size, steps, and the tile side where `tile_size` asks for tiles."""
    sizes = scale_sizes(image_size, settings.size, schedule.start_side)[-settings.steps:]
    return [Scale(size, steps, settings.tile_size if 0 < settings.tile_size < max(size) else 0)
            for size, steps in zip(sizes, split_steps(settings.steps, len(sizes), schedule.step_decay), strict=True)]


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
            raise SettingsError(f"A {width}x{height} picture needs about {per_pixel * width * height / 2**30:.1f} GB "
                                f"of memory and {free / 2**30:.1f} GB is free on this {device.type.upper()}; "
                                f"choose a smaller size" + (" or let it be made in tiles." if side >= MIN_TILE_SIZE
                                                            else "."))
        return replace(scale, tile=side)

    return [fitted(scale) for scale in scales]


def work_done(scales: list[Scale]) -> list[int]:
    """Work done after each step, a step costing the pixels it optimizes: what VGG19's time grows with."""
    return list(itertools.accumulate(scale.step_cost for scale in scales for _ in range(scale.steps)))


def job_work(content_size: tuple[int, int], settings: Settings) -> int:
    """The total work of a transfer of a `content_size` photo (see work_done), known before it starts (tiles
    that memory may call for, and their overlap, left out)."""
    return work_done(plan(content_size, settings))[-1]


def transfer(content: Image.Image, style: Image.Image | Sequence[Image.Image], settings: Settings, *,
             mask: Image.Image | None = None, init_image: Image.Image | None = None,
             schedule: Schedule = SCHEDULE) -> Iterator[Progress]:
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
        raise SettingsError(f"Give one style weight per style image: {len(styles)} image(s), "
                            f"{len(blend)} weight(s).")
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


def _optimize(content: Image.Image, styles: list[Image.Image], blend: Sequence[float], mask: Image.Image | None,
              init_image: Image.Image | None, settings: Settings, schedule: Schedule, scales: list[Scale],
              device: torch.device, weights: Weights, precision: str) -> Iterator[Progress]:
    vgg = feature_extractor(settings.layers, settings.weights, str(device), precision)
    objective = _Objective(vgg, settings, BALANCES[weights.kind], precision)
    full = scales[-1].size
    work = work_done(scales)

    photo = images.to_tensor(content, full).to(device)
    style_side = min(STYLE_MAX_SIDE, round(settings.style_scale * settings.size))
    style_tensors = [images.to_tensor(s, images.fit(s.size, style_side)).to(device) for s in styles]
    if settings.preserve_colors == "histogram":
        style_tensors = [images.match_colors(s, photo) for s in style_tensors]
    elif settings.preserve_colors == "luminance":
        style_tensors = [images.match_luminance(s, photo) for s in style_tensors]
    # What VGG compares against: the photo, or its grey version when only luminance is styled.
    target_photo = images.luminance(photo) if settings.preserve_colors == "luminance" else photo
    region = None if mask is None else images.to_tensor(mask.convert("L").convert("RGB"), full)[:, :1].to(device)

    first = scales[0].size
    if init_image is not None:
        x = images.to_tensor(init_image.convert("RGB"), first).to(device)
        if settings.preserve_colors == "luminance":
            x = images.luminance(x)
    elif settings.init == "noise":
        generator = torch.Generator().manual_seed(settings.seed)
        x = torch.rand((1, 3, first[1], first[0]), generator=generator).to(device)
    else:
        x = images.resize(target_photo, first)

    def shown(image: torch.Tensor) -> torch.Tensor:
        """What the user sees: the region blended back into the photo, the photo's colours restored."""
        size = (image.shape[-1], image.shape[-2])
        if region is not None:
            m = images.resize(region, size)
            image = m * image + (1 - m) * images.resize(target_photo, size)
        if settings.preserve_colors == "luminance":
            image = images.with_chroma_of(image, images.resize(photo, size))
        return image.detach()

    started = time.perf_counter()
    last_preview = -math.inf  # the first step's picture is shown at once, however fast the machine
    record = functools.partial(Progress, total=settings.steps, scales=len(scales), weights=weights.kind,
                               device=str(device), precision=precision, note=weights.note)
    step = 0
    try:
        for index, scale in enumerate(scales, start=1):
            objective.aim_style(_style_targets(vgg, style_tensors, blend, objective.layer_weights, scale, settings))
            photo_here = images.resize(target_photo, scale.size)
            region_here = None if region is None else images.resize(region, scale.size)
            x = images.resize(x, scale.size).clone()  # tiles are written into it: never the photo itself
            picture = shown(x).clone() if scale.tile else None  # a tiled scale's previews: as of the last tile
            steps_before, work_before, cost = step, work[step - 1] if step else 0, scale.step_cost
            scale_end = work[step + scale.steps - 1]
            tile_work = 0
            for tile_pass in range(scale.passes):
                grid = scale.grid(tile_pass)
                for number, (rows, columns) in enumerate(grid, start=1):
                    objective.aim_content(photo_here[..., rows, columns],
                                          None if region_here is None else region_here[..., rows, columns])
                    descent = _Descent(objective, x[..., rows, columns], settings, schedule)
                    for _ in range(scale.tile_steps(tile_pass)):
                        descent.step()
                        tile_work += descent.x[0, 0].numel()
                        step = steps_before + min(tile_work // cost, scale.steps)
                        if time.perf_counter() - last_preview >= PREVIEW_SECONDS and step < settings.steps:
                            yield record(step=step, scale=index, size=scale.size,
                                         elapsed=time.perf_counter() - started,
                                         done=min(work_before + tile_work, scale_end) / work[-1],
                                         losses=objective.last_losses(), tile=number if scale.tile else 0,
                                         tiles=len(grid) if scale.tile else 0, final=False,
                                         pixels=picture if scale.tile else shown(descent.average()))
                            last_preview = time.perf_counter()  # the consumer's time does not count
                    if scale.tile:
                        _blend_tile(x, descent.average(), rows, columns, scale.size)
                        picture = shown(x).clone()
                    else:
                        x = descent.average()
            step = steps_before + scale.steps
        yield record(step=step, scale=len(scales), size=full, elapsed=time.perf_counter() - started, done=1.0,
                     losses=objective.last_losses(), tile=0, tiles=0, final=True, pixels=shown(x))
    except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(error, (MemoryError, torch.OutOfMemoryError)) and "allocate memory" not in str(error):
            raise
        raise SettingsError(f"Ran out of {device.type.upper()} memory at {scale.size[0]}x{scale.size[1]} pixels; "
                            "choose a smaller size.") from None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


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
            self.optimizer = torch.optim.LBFGS([self.x], lr=1, max_iter=1, history_size=50, tolerance_grad=0,
                                               tolerance_change=0)
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


def _blend_tile(picture: torch.Tensor, tile: torch.Tensor, rows: slice, columns: slice,
                size: tuple[int, int]) -> None:
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


def _style_targets(vgg: torch.nn.Module, styles: list[torch.Tensor], blend: Sequence[float],
                   layer_weights: dict[str, float], scale: Scale, settings: Settings) -> dict[str, StyleTarget]:
    """The style images' blended Gaussians at the scale's size, with their square roots: once per scale."""
    side = min(STYLE_MAX_SIDE, round(settings.style_scale * max(scale.size)))
    parts = [_gaussians(vgg, images.resize(style, images.fit((style.shape[-1], style.shape[-2]), side)),
                        list(layer_weights), scale.tile) for style in styles]
    return {name: StyleTarget.of(mixture([part[name] for part in parts], list(blend))) for name in layer_weights}


@torch.no_grad()
def _gaussians(vgg: torch.nn.Module, image: torch.Tensor, layers: list[str], tile: int) -> dict[str, Gaussian]:
    """Gaussians of an image's activations; where it is bigger than `tile`, summed over tiles that see a margin
    of context around them, so that memory follows the tile and every position counts once, as in the whole."""
    height, width = image.shape[-2:]
    if not tile or max(height, width) <= tile:
        features = vgg(image)
        return {name: gaussian(features[name]) for name in layers}
    core = max(16, (tile - 2 * STATISTICS_MARGIN) // 16 * 16)  # whole pooling cells: crops line up at every layer
    sums: dict[str, list] = {name: [0, 0.0, 0.0] for name in layers}  # positions, sum of f, sum of f·fᵀ
    for top, left in itertools.product(range(0, height, core), range(0, width, core)):
        y0, x0 = max(0, top - STATISTICS_MARGIN), max(0, left - STATISTICS_MARGIN)
        features = vgg(image[..., y0:min(height, top + core + STATISTICS_MARGIN),
                             x0:min(width, left + core + STATISTICS_MARGIN)])
        for name in layers:
            f = stride(name)
            kept = features[name][0, :, (top - y0) // f:(min(height, top + core) - y0) // f,
                                  (left - x0) // f:(min(width, left + core) - x0) // f].flatten(1).double()
            sums[name][0] += kept.shape[1]
            sums[name][1] += kept.sum(1)
            sums[name][2] += kept @ kept.T
    out = {}
    for name, (count, total, products) in sums.items():
        mean = total / count
        out[name] = Gaussian(mean.float(), (products / count - torch.outer(mean, mean)).float())
    return out


def style_layer_weights(settings: Settings, balance: Balance) -> dict[str, float]:
    """Each style layer's share of the style loss: the settings' own weights, else the balance's; summing to 1."""
    if settings.style_layer_weights:
        weights = dict(zip(settings.style_layers, settings.style_layer_weights, strict=True))
    else:
        unknown = [name for name in settings.style_layers if name not in balance.style_layers]
        if unknown:
            raise SettingsError(f"Give style_layer_weights for the style layers {', '.join(unknown)}: "
                                "the loss balance has weights for relu1_1 to relu5_1 only.")
        weights = {name: balance.style_layers[name] for name in settings.style_layers}
    total = sum(weights.values())
    if total <= 0:
        raise SettingsError("At least one style layer weight must be above zero.")
    return {name: weight / total for name, weight in weights.items()}


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
        self.masks = None if region is None else {
            name: torch.nn.functional.interpolate(region, size=features[name].shape[-2:], mode="area")
            for name in self.layer_weights}
        self.unit: torch.Tensor | None = None  # the loss at the first step against these targets

    def closure(self, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        image = x if self.region is None else self.region * x + (1 - self.region) * self.photo
        features = self.vgg(image)
        s = self.settings
        self.losses = {
            "content": content_loss(features[s.content_layer], self.content_target),
            "style": sum(weight * style_loss(features[name], self.style_targets[name],
                                             None if self.masks is None else self.masks[name])
                         for name, weight in self.layer_weights.items()),
            "tv": tv_loss(image),
        }
        total = (self.balance.content * s.content_strength * self.losses["content"]
                 + s.style_strength * self.losses["style"] + self.balance.tv * s.smoothing * self.losses["tv"])
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


def result_metadata(settings: Settings, progress: Progress) -> dict[str, str]:
    """PNG text chunks that record how a result was made: the settings as given, with the precision that ran (so
    that a rerun gives the same pixels; a weights file named only in the server's environment stays out of
    pictures shown to strangers), and the kind of weights used."""
    ran = replace(settings, precision=progress.precision)
    meta = {"Software": "stylize", "stylize:settings": ran.to_json(), "stylize:weights": progress.weights,
            "stylize:precision": progress.precision}
    if progress.note:
        meta["stylize:warning"] = progress.note
    return meta
