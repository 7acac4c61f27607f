"""Neural style transfer (Gatys et al.): optimize an image so VGG19 sees the content of one
picture in the style of another. Importable without gradio; the web UI lives in `stylize.ui`."""

import importlib
from typing import Any

# Where each public name lives. They are imported at first use, so that what needs no torch (the command line
# reading its arguments, `stylize.settings`) starts without waiting seconds for it.
_HOMES = {
    "Progress": "engine",
    "transfer": "engine",
    "transfer_clip": "engine",
    "ClipError": "video",
    "ImageError": "images",
    "load_image": "images",
    "Settings": "settings",
    "SettingsError": "settings",
    "UntrainedWeightsWarning": "vgg",
    "WeightsError": "vgg",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'stylize' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
