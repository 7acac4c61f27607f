import os

import numpy as np
import pytest
import torch
from PIL import Image

from stylize import Settings
from stylize.images import to_tensor
from stylize.losses import gram, relative_error
from stylize.vgg import feature_extractor

# Tests never touch the network: the engine runs on untrained VGG19 features
# unless a test builds its own weights file.
os.environ["STYLIZE_WEIGHTS"] = "untrained"


def photo(width: int = 96, height: int = 72) -> Image.Image:
    """A smooth 'photo': a colour gradient with a bright disc, so it has structure to keep."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / width, y / height, 0.5 + 0 * x], axis=-1) * 0.6 + 0.2
    disc = (x - width * 0.6) ** 2 + (y - height * 0.45) ** 2 < (min(width, height) * 0.25) ** 2
    rgb[disc] = (0.95, 0.9, 0.3)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def artwork(width: int = 96, height: int = 96, period: int = 8) -> Image.Image:
    """A busy 'painting': saturated diagonal stripes with a checker, unlike the photo."""
    y, x = np.mgrid[0:height, 0:width]
    stripes = ((x + y) // (period // 2)) % 2
    checks = ((x // period) + (y // period)) % 2
    rgb = np.where(stripes[..., None], (200, 30, 40), (20, 40, 190)) + checks[..., None] * (0, 90, 0)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


@pytest.fixture
def content_image() -> Image.Image:
    return photo()


@pytest.fixture
def style_image() -> Image.Image:
    return artwork()


def style_distance(a: Image.Image, b: Image.Image) -> float:
    """Summed relative Gram error between two images under the engine's (untrained) VGG19."""
    s = Settings()
    vgg = feature_extractor(tuple(dict.fromkeys((s.content_layer, *s.style_layers))), "untrained", "cpu")
    with torch.no_grad():
        fa, fb = vgg(to_tensor(a)), vgg(to_tensor(b.resize(a.size)))
    return sum(relative_error(gram(fa[n]), gram(fb[n])).item() for n in s.style_layers)
