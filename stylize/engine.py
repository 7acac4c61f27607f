"""The optimization: coarse-to-fine scales, L-BFGS or Adam, a stream of Progress records.

The output image is optimized directly so that its VGG19 activations match
the content photo (deep layer) and the style images' Gram matrices (several
layers). It starts small (about 128 px on the long side), where steps are
cheap and the layout forms, and is upsampled by about sqrt(2) per scale up to
the requested size, with fewer steps at each larger scale.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from . import images
from .losses import content_loss, gram, style_loss, tv_loss
from .settings import Settings, SettingsError
from .vgg import UntrainedWeightsWarning, Weights, feature_extractor, resolve_weights

START_SIDE = 128  # long side of the first scale
MIN_SHORT_SIDE = 32  # below this, VGG19's deep layers see less than two pixels
STEP_DECAY = 0.6  # each scale gets this share of the previous scale's steps
PREVIEW_SECONDS = 0.25  # at most one preview per this long
AVERAGE_DECAY = 0.8  # the shown image is an exponential moving average of the iterates (0.9 lags: bench/README.md)
ADAM_LR = 0.02  # in pixel units, images in [0, 1]
TV_BASE = 1e-2  # "smoothing" = 1 gives this total-variation weight
CONTENT_BASE = 0.05  # "content strength" = 1 gives this content weight (style's is 1)
STYLE_MAX_SIDE = 2048  # the style image is never seen larger than this
BYTES_PER_PIXEL = 3500  # peak working memory per output pixel, measured on CPU (bench/README.md)


@dataclass
class Progress:
    """One point of a running transfer; `image()` gives the picture at that point."""

    step: int
    total: int
    scale: int  # 1-based index of the current scale
    scales: int
    size: tuple[int, int]  # (width, height) of the current scale
    elapsed: float  # seconds since the transfer started
    done: float  # share of the work done, 0 to 1 (a step costs its scale's pixel count)
    losses: dict[str, float]
    weights: str  # "imagenet", "caffe" or "untrained"
    note: str  # a warning for the user ("" when there is none), e.g. untrained weights
    final: bool
    pixels: torch.Tensor = field(repr=False)  # (1, 3, H, W) in [0, 1], on the engine's device

    def image(self) -> Image.Image:
        return images.to_image(self.pixels)


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


def check_memory(size: tuple[int, int], device: torch.device) -> None:
    """Refuse a size whose working memory would not fit, rather than be killed half-way."""
    needed = BYTES_PER_PIXEL * size[0] * size[1]
    free = free_memory(device)
    if free is not None and needed > free:
        raise SettingsError(f"A {size[0]}x{size[1]} picture needs about {needed / 2**30:.1f} GB of memory and "
                            f"{free / 2**30:.1f} GB is free on this {device.type.upper()}; choose a smaller size.")


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
        maximum = open("/sys/fs/cgroup/memory.max").read().strip()
        if maximum != "max":
            limits.append(int(maximum) - int(open("/sys/fs/cgroup/memory.current").read()))
    except (OSError, KeyError, ValueError):
        pass
    return min(limits) if limits else None


def scale_sizes(image_size: tuple[int, int], long_side: int) -> list[tuple[int, int]]:
    """(width, height) of each scale: geometric from about START_SIDE up to `long_side`."""
    aspect = max(image_size) / min(image_size)
    if long_side / aspect < MIN_SHORT_SIDE:
        raise SettingsError(f"An output {long_side} px long is too small for this {image_size[0]}x"
                            f"{image_size[1]} image; choose at least {math.ceil(MIN_SHORT_SIDE * aspect)} px.")
    start = min(long_side, max(START_SIDE, math.ceil(MIN_SHORT_SIDE * aspect)))
    count = math.ceil(math.log(long_side / start) / math.log(math.sqrt(2)) - 1e-9)
    sides = [round(start * (long_side / start) ** (k / count)) for k in range(count)] + [long_side]
    return [images.fit(image_size, side) for side in sides]


def split_steps(total: int, scales: int) -> list[int]:
    """Steps per scale, decaying geometrically so most of the work is at the cheap small scales."""
    shares = [STEP_DECAY**k for k in range(scales)]
    counts = [max(1, round(total * share / sum(shares))) for share in shares]
    counts[0] += total - sum(counts)
    return counts


def work_done(sizes: list[tuple[int, int]], steps_per_scale: list[int]) -> list[int]:
    """Work done after each step, a step costing its scale's pixel count: what VGG19's time grows with."""
    return list(itertools.accumulate(w * h for (w, h), count in zip(sizes, steps_per_scale, strict=True)
                                     for _ in range(count)))


def transfer(content: Image.Image, style: Image.Image | Sequence[Image.Image], settings: Settings, *,
             mask: Image.Image | None = None, init_image: Image.Image | None = None) -> Iterator[Progress]:
    """Stylize `content` with one or more `style` images; yields previews, then the final image.

    `mask` (greyscale, over the content) limits the style to its white parts;
    `init_image` (e.g. a previous result) replaces `settings.init` as the start.
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
    if sum(settings.style_layer_weights) <= 0:
        raise SettingsError("At least one style layer weight must be above zero.")
    sizes = scale_sizes(content.size, settings.size)[-settings.steps:]
    device = pick_device(settings.device)
    check_memory(sizes[-1], device)
    weights = resolve_weights(settings.weights)
    if weights.untrained:  # said now, before the work: a run can take minutes
        warnings.warn(weights.note, UntrainedWeightsWarning, stacklevel=2)
    # Everything above raises now, at the call; the work itself starts at the first next().
    return _optimize(content, styles, blend, mask, init_image, settings, sizes, device, weights)


def _optimize(content: Image.Image, styles: list[Image.Image], blend: Sequence[float], mask: Image.Image | None,
              init_image: Image.Image | None, settings: Settings, sizes: list[tuple[int, int]],
              device: torch.device, weights: Weights) -> Iterator[Progress]:
    vgg = feature_extractor(settings.layers, settings.weights, str(device))
    steps_per_scale = split_steps(settings.steps, len(sizes))
    full = sizes[-1]
    work = work_done(sizes, steps_per_scale)

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

    if init_image is not None:
        x = images.to_tensor(init_image.convert("RGB"), sizes[0]).to(device)
        if settings.preserve_colors == "luminance":
            x = images.luminance(x)
    elif settings.init == "noise":
        generator = torch.Generator().manual_seed(settings.seed)
        x = torch.rand((1, 3, sizes[0][1], sizes[0][0]), generator=generator).to(device)
    else:
        x = images.resize(target_photo, sizes[0])

    def shown(image: torch.Tensor) -> torch.Tensor:
        """What the user sees: the region blended back into the photo, the photo's colours restored."""
        size = (image.shape[-1], image.shape[-2])
        if region is not None:
            m = images.resize(region, size)
            image = m * image + (1 - m) * images.resize(target_photo, size)
        if settings.preserve_colors == "luminance":
            image = images.with_chroma_of(image, images.resize(photo, size))
        return image

    started = time.perf_counter()
    last_preview = started
    step = 0
    try:
        for scale, (size, scale_steps) in enumerate(zip(sizes, steps_per_scale, strict=True), start=1):
            objective = _Objective(vgg, settings, target_photo, style_tensors, blend, region, size)
            x = images.resize(x, size).contiguous().requires_grad_(True)
            if settings.optimizer == "adam":
                optimizer = torch.optim.Adam([x], lr=ADAM_LR)
            else:
                optimizer = torch.optim.LBFGS([x], lr=1, max_iter=1, history_size=50)
            average, average_weight = torch.zeros_like(x), 0.0
            for _ in range(scale_steps):
                optimizer.step(functools.partial(objective.closure, x, optimizer))
                with torch.no_grad():
                    x.clamp_(0, 1)
                    average.mul_(AVERAGE_DECAY).add_(x, alpha=1 - AVERAGE_DECAY)
                average_weight = AVERAGE_DECAY * average_weight + (1 - AVERAGE_DECAY)
                step += 1
                if time.perf_counter() - last_preview >= PREVIEW_SECONDS and step < settings.steps:
                    yield Progress(step, settings.steps, scale, len(sizes), size, time.perf_counter() - started,
                                   work[step - 1] / work[-1],
                                   objective.last_losses(), weights.kind, weights.note, False,
                                   shown(average / average_weight).detach())
                    last_preview = time.perf_counter()  # the consumer's time does not count
            x = (average / average_weight).detach()
        yield Progress(step, settings.steps, len(sizes), len(sizes), full, time.perf_counter() - started, 1.0,
                       objective.last_losses(), weights.kind, weights.note, True, shown(x))
    except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(error, (MemoryError, torch.OutOfMemoryError)) and "allocate memory" not in str(error):
            raise
        raise SettingsError(f"Ran out of {device.type.upper()} memory at {size[0]}x{size[1]} pixels; "
                            "choose a smaller size.") from None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


class _Objective:
    """The loss at one scale, with the content and style targets computed once."""

    def __init__(self, vgg: torch.nn.Module, settings: Settings, photo: torch.Tensor,
                 styles: list[torch.Tensor], blend: Sequence[float], region: torch.Tensor | None,
                 size: tuple[int, int]):
        self.vgg = vgg
        self.settings = settings
        self.layer_weights = dict(zip(settings.style_layers, settings.style_layer_weights, strict=True))
        self.photo = images.resize(photo, size)
        self.region = None if region is None else images.resize(region, size)
        style_side = min(STYLE_MAX_SIDE, round(settings.style_scale * max(size)))
        with torch.no_grad():
            photo_features = vgg(self.photo)
            self.content_target = photo_features[settings.content_layer]
            self.masks = None if region is None else {
                name: torch.nn.functional.interpolate(self.region, size=photo_features[name].shape[-2:],
                                                      mode="area")
                for name in settings.style_layers}
            self.style_targets = {name: torch.zeros(()) for name in settings.style_layers}
            for style, share in zip(styles, blend, strict=True):
                features = vgg(images.resize(style, images.fit((style.shape[-1], style.shape[-2]), style_side)))
                for name in settings.style_layers:
                    self.style_targets[name] = self.style_targets[name] + gram(features[name]) * share / sum(blend)
        self.losses: dict[str, torch.Tensor] = {}

    def closure(self, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        image = x if self.region is None else self.region * x + (1 - self.region) * self.photo
        features = self.vgg(image)
        s = self.settings
        self.losses = {
            "content": content_loss(features[s.content_layer], self.content_target),
            "style": style_loss(features, self.style_targets, self.layer_weights, self.masks),
            "tv": tv_loss(image),
        }
        total = (CONTENT_BASE * s.content_strength * self.losses["content"]
                 + s.style_strength * self.losses["style"] + TV_BASE * s.smoothing * self.losses["tv"])
        total.backward()
        self.losses = {"total": total.detach(), **{k: v.detach() for k, v in self.losses.items()}}
        return total

    def last_losses(self) -> dict[str, float]:
        return {name: value.item() for name, value in self.losses.items()}


def result_metadata(settings: Settings, progress: Progress) -> dict[str, str]:
    """PNG text chunks that record how a result was made, the weights' label included."""
    meta = {"Software": "stylize", "stylize:settings": settings.with_weights_from_env().to_json(),
            "stylize:weights": progress.weights}
    if progress.note:
        meta["stylize:warning"] = progress.note
    return meta
