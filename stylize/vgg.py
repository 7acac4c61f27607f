"""VGG19 feature extractor, truncated after the last layer in use, and its weights.

Weights are resolved in this order (DESIGN.md, Weights): an explicit file, the
torch hub cache, a download, and, when none can be had, untrained features
that are labelled as such wherever a result goes.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models import VGG19_Weights, vgg19

from .settings import LAYER_NAMES, InputError


def stride(layer: str) -> int:
    """Pixels per position of a layer's activations: 2 for each pooling before it."""
    return 2 ** sum(name.startswith("pool") for name in LAYER_NAMES[: LAYER_NAMES.index(layer)])


DOWNLOAD_URL = VGG19_Weights.IMAGENET1K_V1.url
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# A Caffe-converted VGG19 sees pixels in 0-255 where torchvision's sees (x - mean) / std, about 1 / 0.226 per unit:
# its activations run about 255 * 0.226 times larger (a ReLU network's activations grow with its input), and
# dividing them by that puts them on the scale the reference balance was tuned at (losses.BALANCES).
CAFFE_FEATURE_SCALE = 255 * sum(IMAGENET_STD) / 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
UNTRAINED_NOTE = (
    "Running on untrained VGG19 features: pretrained weights could not be loaded, so "
    "results only transfer colour and rough texture. Connect to the internet once "
    "(weights download automatically) or set STYLIZE_WEIGHTS to a VGG19 weights file."
)


class WeightsError(InputError):
    """A weights file the user named cannot be used; the message says why."""


class UntrainedWeightsWarning(UserWarning):
    """A transfer runs on untrained features (the degraded mode); the message says why and how to fix it."""


@dataclass(frozen=True)
class Weights:
    kind: str  # "imagenet" (torchvision), "caffe" (BGR, 0-255, mean-subtracted) or "untrained"
    state_dict: dict[str, torch.Tensor] | None  # keyed like torchvision's vgg19().features
    note: str = ""  # shown to the user: why these weights and not better ones

    @property
    def untrained(self) -> bool:
        return self.kind == "untrained"


@functools.lru_cache(maxsize=4)
def resolve_weights(spec: str = "auto") -> Weights:
    """`spec` is "auto", "untrained" or a path to a torchvision or Caffe-converted VGG19 file."""
    if spec == "untrained":
        return Weights("untrained", None, UNTRAINED_NOTE)
    if spec != "auto":
        return load_weights_file(spec)
    try:
        # Looks in the torch hub cache first; downloads (with a progress bar) only if absent.
        state = torch.hub.load_state_dict_from_url(
            DOWNLOAD_URL, progress=True, check_hash=True, map_location="cpu", weights_only=True
        )
    except Exception as error:  # offline, blocked, disk full, corrupt cache: all mean "none to be had"
        return Weights("untrained", None, f"{UNTRAINED_NOTE} (Download failed: {type(error).__name__}.)")
    return Weights("imagenet", _features_only(state, "the downloaded weights"))


def load_weights_file(path: str) -> Weights:
    """Load a torchvision VGG19 state dict, or a Caffe-converted one (keys like conv1_1.weight)."""
    if not os.path.isfile(path):
        raise WeightsError(f"Weights file not found: {path}. Give a VGG19 .pth file, 'auto' or 'untrained'.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise WeightsError(f"{path} is not a PyTorch weights file.") from None
    if isinstance(state, dict) and "conv1_1.weight" in state:
        # Caffe conversions name layers; map the names to torchvision's indices.
        renamed = {
            f"features.{LAYER_NAMES.index(k.split('.')[0])}.{k.split('.')[1]}": v
            for k, v in state.items()
            if k.split(".")[0] in LAYER_NAMES
        }
        return Weights("caffe", _features_only(renamed, path))
    return Weights("imagenet", _features_only(state, path))


def _features_only(state: object, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict):
        raise WeightsError(f"{source} does not hold a VGG19 state dict.")
    features = {
        k.removeprefix("features."): v
        for k, v in state.items()
        if k.startswith("features.") and isinstance(v, torch.Tensor)
    }
    if "0.weight" not in features or features["0.weight"].shape != (64, 3, 3, 3):
        raise WeightsError(f"{source} does not hold VGG19 weights (no 64x3x3x3 first convolution).")
    return features


class VGGFeatures(nn.Module):
    """VGG19 `features` up to the deepest requested layer; returns those layers' activations in float32.

    The network itself runs in `precision` ("fp32", "bf16" or "fp16"), in channels-last memory format where
    `channels_last` (what oneDNN's and cuDNN's fastest convolutions take); the activations it returns are cast
    back to float32, so only the network runs in reduced precision.
    """

    def __init__(self, layers: tuple[str, ...], weights: Weights, precision: str = "fp32", channels_last: bool = True):
        super().__init__()
        self.layers = layers
        self.kind = weights.kind
        last = max(LAYER_NAMES.index(name) for name in layers)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # untrained features must be the same in every process
            net = vgg19().features[: last + 1]
        if weights.state_dict is not None:
            wanted = net.state_dict().keys()
            missing = [k for k in wanted if k not in weights.state_dict]
            if missing:
                raise WeightsError(f"The VGG19 weights lack {', '.join(missing[:3])}.")
            net.load_state_dict({k: weights.state_dict[k] for k in wanted})
        net[0].padding_mode = "replicate"  # as the reference does: fewer edge artefacts than zero padding
        for layer in net:
            if isinstance(layer, nn.MaxPool2d):
                layer.ceil_mode = True  # the last rows and columns of a size no multiple of 16 reach every layer
        for i, layer in enumerate(net):
            if isinstance(layer, nn.ReLU) and LAYER_NAMES[i - 1] in layers:
                layer.inplace = False  # an in-place ReLU would overwrite a requested conv output
        if weights.kind == "caffe":
            mean, scale = torch.tensor(CAFFE_MEAN_BGR) / 255, torch.full((3,), 1 / 255)
            # Every activation divided by CAFFE_FEATURE_SCALE, exactly: ReLU and max-pooling commute with a
            # positive scale, so dividing the first convolution's weights and every bias is enough.
            with torch.no_grad():
                net[0].weight /= CAFFE_FEATURE_SCALE
                for layer in net:
                    if isinstance(layer, nn.Conv2d):
                        layer.bias /= CAFFE_FEATURE_SCALE
        else:
            mean, scale = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.dtype = DTYPES[precision]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = net.eval().requires_grad_(False).to(self.dtype, memory_format=self.memory_format)
        self.register_buffer("mean", mean.view(1, 3, 1, 1))
        self.register_buffer("scale", scale.view(1, 3, 1, 1))
        self.indices = {LAYER_NAMES.index(name): name for name in layers}

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """`image`: (N, 3, H, W) RGB in [0, 1]."""
        if self.kind == "caffe":
            image = image.flip(1)  # RGB -> BGR
        x = ((image - self.mean) / self.scale).to(self.dtype, memory_format=self.memory_format)
        out = {}
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i in self.indices:
                out[self.indices[i]] = x.float()
        return out


@functools.lru_cache(maxsize=2)
def feature_extractor(layers: tuple[str, ...], weights_spec: str, device: str, precision: str = "fp32") -> VGGFeatures:
    """A cached extractor: building VGG19 and moving it to the device is done once per process."""
    channels_last = torch.device(device).type != "mps"  # MPS convolutions do not gain from it
    return VGGFeatures(layers, resolve_weights(weights_spec), precision, channels_last).to(device)
