"""Shared bench helpers: inputs, device, machine header, timed engine runs, tables.

Importing this module puts the repository root on sys.path, so `python bench/NAME.py`
finds the `stylize` package without installing it.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from stylize import Progress, Settings, load_image, transfer  # noqa: E402
from stylize.device import cpu_budget, pick_device, pick_precision  # noqa: E402
from stylize.images import fit, to_tensor  # noqa: E402
from stylize.losses import (  # noqa: E402
    BALANCES,
    StyleTarget,
    content_loss,
    gaussian,
    style_layer_weights,
    style_loss,
    tv_loss,
)
from stylize.plan import SCHEDULE, Schedule  # noqa: E402
from stylize.settings import STYLE_LAYERS  # noqa: E402
from stylize.vgg import UntrainedWeightsWarning, feature_extractor, resolve_weights  # noqa: E402

warnings.filterwarnings("ignore", category=UntrainedWeightsWarning)  # benches without trained weights say so

IMAGES = Path(os.environ.get("STYLIZE_BENCH_IMAGES", ROOT.parent / "shared" / "images"))
CONTENT = "tubingen.jpg"
STYLE = "starry_night.jpg"
# Trained features for judging pictures: STYLIZE_BENCH_WEIGHTS, else the development stand-in where it has been built
# (../shared/tools/trained-stand-in), else untrained features (and every header says which).
STAND_IN = Path.home() / ".cache" / "stylize-dev" / "vgg16in19_caffe.pth"
WEIGHTS = os.environ.get("STYLIZE_BENCH_WEIGHTS") or (str(STAND_IN) if STAND_IN.is_file() else "untrained")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_header(device: torch.device) -> str:
    where = torch.cuda.get_device_name() if device.type == "cuda" else cpu_model()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"# {datetime.date.today()}  {platform.node()}  nproc={os.cpu_count()} budget={cpu_budget()}  "
        f"device={device.type} ({where})  auto precision={pick_precision('auto', device)}  "
        f"torch {torch.__version__}  threads={torch.get_num_threads()}  load avg {load}\n"
        f"# weights: {WEIGHTS} ({resolve_weights(WEIGHTS).kind})"
    )


PAIR = {"content": IMAGES / CONTENT, "style": IMAGES / STYLE}  # what load_images() reads: --content, --style


class _ChosenImage(argparse.Action):
    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Path, option: str | None = None
    ) -> None:
        path = value if value.exists() or not (IMAGES / value).exists() else IMAGES / value  # a classic image by name
        PAIR[self.dest] = path
        setattr(namespace, self.dest, path)


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    """--content and --style: any photo and painting, in place of the classic pair in ../shared/images."""
    for name, default in PAIR.items():
        parser.add_argument(
            f"--{name}",
            type=Path,
            default=default,
            action=_ChosenImage,
            help=f"the {name} image, or the name of one in {IMAGES} (default: {default.name})",
        )


def load_images() -> tuple[Image.Image, Image.Image]:
    return load_image(PAIR["content"], "content"), load_image(PAIR["style"], "style")


def load_pair(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Content and style as (1, 3, H, W) tensors whose long side is `size`, as the engine sees them."""
    content, style = load_images()
    return (
        to_tensor(content, fit(content.size, size)).contiguous().to(device),
        to_tensor(style, fit(style.size, size)).contiguous().to(device),
    )


def engine_settings(device: torch.device, **overrides: object) -> Settings:
    return Settings(**{"weights": WEIGHTS, "device": device.type, **overrides})


def engine_vgg(device: torch.device, precision: str = "auto") -> torch.nn.Module:
    """The engine's VGG19 feature extractor with its default layers and the bench's weights, as transfer() gets
    it."""
    settings = engine_settings(device)
    return feature_extractor(settings.layers, settings.weights, str(device), pick_precision(precision, device))


def load_engine_weights(device: torch.device) -> float:
    """Build (or fetch from cache) the engine's VGG19; returns the seconds it took."""
    started = time.perf_counter()
    engine_vgg(device)
    sync(device)
    return time.perf_counter() - started


def bare_step_seconds(device: torch.device, size: int, passes: int = 3) -> float:
    """Seconds of one bare step: the engine's network (auto precision, channels-last), forward and backward, on
    the photo at `size`, nothing else; the unit in which presets are costed ("bare steps"). Fastest of `passes`
    after one warm-up pass: other processes' noise only ever adds."""
    vgg = engine_vgg(device)
    content, _ = load_pair(size, device)
    x = content.clone().requires_grad_(True)
    best = math.inf
    for _ in range(passes + 1):
        sync(device)
        started = time.perf_counter()
        x.grad = None
        sum(f.sum() for f in vgg(x).values()).backward()
        sync(device)
        best = min(best, time.perf_counter() - started)
    return best


@torch.no_grad()
def score(pixels: torch.Tensor, settings: Settings, content: Image.Image, style: Image.Image) -> float:
    """The engine's objective (losses.py at the settings' strengths, the balance of the bench's weights) of a
    finished picture against the photo and the style at the picture's size, in float32: one figure for comparing
    pictures made in different ways (schedules, precisions, tiles)."""
    device = pixels.device
    vgg = feature_extractor(settings.layers, WEIGHTS, str(device), "fp32")
    balance = BALANCES[resolve_weights(WEIGHTS).kind]
    size = (pixels.shape[-1], pixels.shape[-2])
    photo = to_tensor(content, size).to(device)
    painting = to_tensor(style, fit(style.size, round(settings.style_scale * max(size)))).to(device)
    ours, theirs, photos = vgg(pixels.float()), vgg(painting), vgg(photo)
    style_term = sum(
        weight * style_loss(ours[name], StyleTarget.of(gaussian(theirs[name])))
        for name, weight in style_layer_weights(settings, balance).items()
    )
    content_term = content_loss(ours[settings.content_layer], photos[settings.content_layer])
    return (
        balance.content * settings.content_strength * content_term
        + settings.style_strength * style_term
        + balance.tv * settings.smoothing * tv_loss(pixels.float())
    ).item()


@dataclass
class EngineRun:
    """Consumer-side time stamps of every Progress a transfer yielded (seconds since the call)."""

    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds (all threads) since the call
    records: list[Progress] = field(default_factory=list)

    @property
    def first_preview(self) -> float:
        return self.times[0]

    @property
    def final(self) -> float:
        return self.times[-1]

    def step_seconds(self, scale: int) -> float:
        """Mean seconds per step over the Progress records of one scale (its set-up excluded)."""
        points = [(p.step, t) for p, t in zip(self.records, self.times, strict=True) if p.scale == scale]
        if len(points) < 2:
            return float("nan")
        (s0, t0), (s1, t1) = points[0], points[-1]
        return (t1 - t0) / (s1 - s0)


def run_engine(
    content: Image.Image,
    style: Image.Image,
    settings: Settings,
    device: torch.device,
    *,
    consumer: Callable[[Progress], object] | None = None,
    schedule: Schedule = SCHEDULE,
) -> EngineRun:
    """Run a transfer to the end, time-stamping each Progress as the consumer receives it.

    Progress pixels are kept (on the device) for later evaluation outside the timed region;
    `consumer`, if given, is called on each record inside the timed region (as a UI would).
    """
    run = EngineRun()
    sync(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    for progress in transfer(content, style, settings, schedule=schedule):
        sync(device)
        run.times.append(time.perf_counter() - started)
        run.cpu_times.append(time.process_time() - cpu_started)
        run.records.append(progress)
        if consumer is not None:
            consumer(progress)
    return run


def start(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, torch.device]:
    """Parse a bench's arguments (adding --device), print the machine, warm up; returns (args, device)."""
    parser.add_argument("--device", default="auto", help="auto (the engine's choice), cpu, cuda or mps")
    add_image_arguments(parser)
    args = parser.parse_args()
    device = pick_device(args.device)
    print(machine_header(device), flush=True)
    warm_up(device)
    return args, device


def warm_up(device: torch.device) -> None:
    """One tiny transfer, so allocators and kernels are warm before anything is timed."""
    content, style = load_images()
    for _ in transfer(content, style, engine_settings(device, size=128, steps=4)):
        pass
    sync(device)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


__all__ = [
    "STYLE_LAYERS",
    "WEIGHTS",
    "EngineRun",
    "add_image_arguments",
    "bare_step_seconds",
    "engine_settings",
    "engine_vgg",
    "load_engine_weights",
    "load_images",
    "load_pair",
    "machine_header",
    "run_engine",
    "score",
    "start",
    "sync",
    "table",
    "warm_up",
]
