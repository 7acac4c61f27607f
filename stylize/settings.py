"""Every knob of a style transfer, with its default, its range and its validation.

The UI and the CLI read defaults, ranges and help text from here, so a knob is
described once. A `Settings` cannot exist with an out-of-range value: the
constructor raises `SettingsError` with a message that names the knob.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

BLOCK_DEPTHS = (2, 2, 4, 4, 4)
# The names of VGG19's layers (stylize.vgg builds the network from them; here, settings name them without
# importing torch), as in torchvision's vgg19().features, in order: conv1_1, relu1_1, ... pool5.
LAYER_NAMES = tuple(
    name
    for block, depth in enumerate(BLOCK_DEPTHS, start=1)
    for name in [n for i in range(1, depth + 1) for n in (f"conv{block}_{i}", f"relu{block}_{i}")] + [f"pool{block}"]
)
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
PRESERVE_COLORS = ("off", "luminance", "histogram")
INITS = ("content", "noise")
OPTIMIZERS = ("lbfgs", "adam")
DEVICES = ("auto", "cpu", "cuda", "mps")  # and "cuda:N", one GPU of several
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# Output size and step count per quality preset, for the kind of device that
# runs it. On a 2-core CPU "standard" costs about 56 bare steps (bench/README.md, issue 18).
PRESETS: dict[str, dict[str, dict[str, int]]] = {
    "cpu": {
        "draft": {"size": 256, "steps": 50},
        "standard": {"size": 512, "steps": 115},
        "fine": {"size": 768, "steps": 190},
    },
    "gpu": {
        "draft": {"size": 512, "steps": 145},
        "standard": {"size": 768, "steps": 260},
        "fine": {"size": 1024, "steps": 300},
    },
}
PRESET_NAMES = ("draft", "standard", "fine")
MIN_TILE_SIZE = 256  # smaller tiles would be mostly the overlap they share with their neighbours
ECHO_LENGTH = 40  # the most characters of a user's value that a message repeats


class InputError(ValueError):
    """Something a user gave (a setting, an image, a weights file) cannot be used; the message says why. Defined
    here, where no torch is imported: the command line catches it before it has imported torch."""


class SettingsError(InputError):
    """A setting a user chose is not allowed; the message says what is."""


def _knob(
    default: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    choices: tuple[str, ...] | None = None,
    label: str,
    help: str,
) -> Any:
    meta = {"low": low, "high": high, "choices": choices, "label": label, "help": help}
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    size: int = _knob(512, low=64, high=8192, label="Output size (px)", help="Long side of the output image in pixels.")
    steps: int = _knob(115, low=1, high=5000, label="Steps", help="Optimization steps, summed over all scales.")
    style_strength: float = _knob(
        1.0, low=0.0, high=10.0, label="Style strength", help="How strongly the output matches the style's textures."
    )
    content_strength: float = _knob(
        1.0, low=0.0, high=10.0, label="Content strength", help="How strongly the output keeps the photo's structure."
    )
    smoothing: float = _knob(
        1.0,
        low=0.0,
        high=10.0,
        label="Smoothing",
        help="Total-variation weight: higher values give smoother, less noisy output.",
    )
    style_scale: float = _knob(
        1.0,
        low=0.25,
        high=2.0,
        label="Style scale",
        help="Size at which the style is seen, relative to the output: "
        "small gives fine strokes, large gives big swirls.",
    )
    style_weights: tuple[float, ...] = _knob(
        (), low=0.0, high=100.0, label="Style blend weights", help="One weight per style image (empty: equal weights)."
    )
    preserve_colors: str = _knob(
        "off",
        choices=PRESERVE_COLORS,
        label="Preserve photo colours",
        help="luminance: style the brightness only; histogram: recolour the style to the photo's palette first.",
    )
    init: str = _knob("content", choices=INITS, label="Start from", help="The image the optimization starts from.")
    optimizer: str = _knob(
        "lbfgs",
        choices=OPTIMIZERS,
        label="Optimizer",
        help="lbfgs: Adam at the smaller scales, then L-BFGS at full size, which reaches a lower loss in the same "
        "steps; adam: Adam throughout. Clips and scales made in tiles use Adam.",
    )
    seed: int = _knob(
        0, low=0, high=2**31 - 1, label="Seed", help="Same inputs, settings, seed and device give the same pixels."
    )
    content_layer: str = _knob("relu4_2", label="Content layer", help="VGG19 layer whose activations describe content.")
    style_layers: tuple[str, ...] = _knob(
        STYLE_LAYERS, label="Style layers", help="VGG19 layers whose activation statistics describe style."
    )
    style_layer_weights: tuple[float, ...] = _knob(
        (),
        low=0.0,
        high=1000.0,
        label="Style layer weights",
        help="One weight per style layer (empty: the balance of the VGG19 weights in use, see losses.BALANCES).",
    )
    weights: str = _knob(
        "auto", label="VGG19 weights", help="auto (cache, then download), untrained, or a path to a weights file."
    )
    device: str = _knob(
        "auto",
        label="Device",
        help="auto picks CUDA, then Apple MPS, then the CPU; or name one: cpu, cuda, cuda:1, mps.",
    )
    precision: str = _knob(
        "auto",
        choices=PRECISIONS,
        label="Precision",
        help="Number format of the VGG19 network: auto picks bf16 where the CPU or GPU runs it "
        "natively, fp16 on other GPUs, else fp32. Statistics, optimizer and image stay fp32.",
    )
    tile_size: int = _knob(
        -1,
        low=-1,
        high=8192,
        label="Tile size (px)",
        help="Optimize the largest scales in tiles of at most this many px squared (square, or strips across the "
        "picture where fewer overlap): -1 where the whole picture would take more than a few GB of memory, 0 never.",
    )

    temporal_weight: float = _knob(
        1.0,
        low=0.0,
        high=100.0,
        label="Temporal weight",
        help="Clips: how strongly each frame keeps to the previous one moved along the motion (less flicker); "
        "0 makes each frame on its own.",
    )
    later_frames: float = _knob(
        0.19,  # bench/README.md, clips: a 2 s clip at 256 px within 3 minutes on 2 CPU cores
        low=0.02,
        high=1.0,
        label="Later frames' work",
        help="Clips: each frame after the first is refined from the previous one with this share of the first "
        "frame's work.",
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = _checked(f.name, f.type, getattr(self, f.name), f.metadata)
            object.__setattr__(self, f.name, value)
        if self.style_layer_weights and len(self.style_layer_weights) != len(self.style_layers):
            raise SettingsError(
                f"style_layer_weights needs one weight per style layer "
                f"({len(self.style_layers)}), got {len(self.style_layer_weights)}."
            )
        if 0 < self.tile_size < MIN_TILE_SIZE:
            raise SettingsError(f"tile_size must be -1, 0 or at least {MIN_TILE_SIZE}; got {self.tile_size}.")
        if self.device not in DEVICES and not re.fullmatch(r"cuda:\d+", self.device):
            raise SettingsError(f"device must be one of {', '.join(DEVICES)} or cuda:N; got {brief(self.device)}.")
        if not self.style_layers:
            raise SettingsError("style_layers must name at least one layer.")
        for layer in (self.content_layer, *self.style_layers):
            if layer not in LAYER_NAMES:
                raise SettingsError(f"{layer!r} is not a VGG19 layer; use names like relu4_2.")

    @property
    def layers(self) -> tuple[str, ...]:
        """The VGG19 layers in use: the content layer, then the style layers."""
        return tuple(dict.fromkeys((self.content_layer, *self.style_layers)))

    @classmethod
    def from_preset(cls, preset: str, device_kind: str, **overrides: Any) -> Settings:
        """Settings for a quality preset on a "cpu" or "gpu" device, then `overrides`."""
        if preset not in PRESET_NAMES:
            raise SettingsError(f"preset must be one of {', '.join(PRESET_NAMES)}; got {brief(preset)}.")
        return cls(**{**PRESETS[device_kind][preset], **overrides})

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Settings:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def with_weights_from_env(self) -> Settings:
        """`weights="auto"` defers to the STYLIZE_WEIGHTS environment variable."""
        if self.weights == "auto" and os.environ.get("STYLIZE_WEIGHTS"):
            return replace(self, weights=os.environ["STYLIZE_WEIGHTS"])
        return self


def knob(name: str) -> dict[str, Any]:
    """Default, range, label and help of one field, for building UIs and CLIs."""
    f = next(f for f in fields(Settings) if f.name == name)
    default = f.default if f.default is not MISSING else f.default_factory()
    return {"default": default, **f.metadata}


def _checked(name: str, type_name: str, value: Any, meta: Any) -> Any:
    low, high, choices = meta["low"], meta["high"], meta["choices"]
    if type_name.startswith("tuple"):
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise SettingsError(f"{name} must be a list, got {brief(value)}.")
        item_type = "float" if "float" in type_name else "str"
        return tuple(_checked(name, item_type, v, meta) for v in value)
    if type_name == "str":
        if not isinstance(value, str):
            raise SettingsError(f"{name} must be text, got {brief(value)}.")
        if choices and value not in choices:
            raise SettingsError(f"{name} must be one of {', '.join(choices)}; got {brief(value)}.")
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be a number, got {brief(value)}.") from None
    except OverflowError:  # a whole number with hundreds of digits, too large for a float
        raise SettingsError(
            f"{name} must be between {format_number(low)} and {format_number(high)}; got {brief(value)}."
        ) from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise SettingsError(f"{name} must be a finite number, got {brief(value)}.")
    if type_name == "int":
        if number != int(number):
            raise SettingsError(f"{name} must be a whole number, got {brief(value)}.")
        number = int(number)
    if not low <= number <= high:
        raise SettingsError(
            f"{name} must be between {format_number(low)} and {format_number(high)}; got {format_number(number)}."
        )
    return number


def format_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"  # 1e308 is not 309 digits


def brief(value: Any) -> str:
    """`repr(value)` cut to ECHO_LENGTH characters: messages echo what a user sent, which may be megabytes."""
    text = repr(value)
    return text if len(text) <= ECHO_LENGTH else text[: ECHO_LENGTH - 1] + "…"
