"""Decode, validate, orient and resize images; colour-space helpers on tensors.

Uploads are untrusted: sizes in bytes and pixels are checked before any pixel
is decoded, and every failure a user can cause raises `ImageError` with a
message that says what to do.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

MAX_BYTES = int(float(os.environ.get("STYLIZE_MAX_UPLOAD_MB", "20")) * 2**20)
MAX_PIXELS = int(float(os.environ.get("STYLIZE_MAX_MEGAPIXELS", "40")) * 1_000_000)
MIN_SIDE = 16
MAX_ASPECT = 8.0
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")

# Pillow refuses anything larger than this outright, wherever it decodes (gradio included).
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageError(ValueError):
    """An image a user gave cannot be used; the message says why and what to do."""


def load_image(source: str | os.PathLike | bytes | Image.Image, what: str = "image") -> Image.Image:
    """Open `source` as an upright 8-bit RGB image, refusing what cannot or should not be decoded."""
    if isinstance(source, Image.Image):
        return _checked_size(_to_rgb(source), what)
    if isinstance(source, bytes):
        size, opener = len(source), lambda: io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"The {what} file {path.name!r} does not exist.")
        size, opener = path.stat().st_size, lambda: path
    if size == 0:
        raise ImageError(f"The {what} file is empty. Upload a JPEG, PNG or WebP image.")
    if size > MAX_BYTES:
        raise ImageError(f"The {what} is {size / 2**20:.1f} MB; the limit is {MAX_BYTES / 2**20:.0f} MB. "
                         "Upload a smaller file.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, as an error
            image = Image.open(opener())
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, Image.DecompressionBombError):
            raise ImageError(f"The {what} has too many pixels; the limit is {MAX_PIXELS / 1e6:.0f} "
                             "megapixels. Upload a smaller image.") from None
        raise ImageError(f"The {what} is not an image this app can read. "
                         "Upload a JPEG, PNG or WebP image.") from None
    if image.format not in FORMATS:
        raise ImageError(f"The {what} is a {image.format} file. Upload a JPEG, PNG or WebP image.")
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError(f"The {what} is {width}x{height} pixels; the limit is "
                         f"{MAX_PIXELS / 1e6:.0f} megapixels. Upload a smaller image.")
    try:
        image.seek(0)  # animations: the first frame
        image.load()
    except Exception:
        raise ImageError(f"The {what} file is truncated or corrupt. Upload it again or try another image.") \
            from None
    return _checked_size(_to_rgb(image), what)


def _checked_size(image: Image.Image, what: str) -> Image.Image:
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"The {what} is only {width}x{height} pixels; use one at least "
                         f"{MIN_SIDE} pixels on each side.")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ImageError(f"The {what} is {width}x{height} pixels, longer than {MAX_ASPECT:g}:1. "
                         "Crop it to a less extreme shape.")
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB; transparency is flattened onto white, 16-bit data scaled, not clipped."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        data = np.asarray(image, dtype=np.float64)
        high = 65535.0 if image.mode.startswith("I;16") or data.max() > 255 else 255.0
        image = Image.fromarray(np.clip(data / high * 255 + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def fit(size: tuple[int, int], long_side: int) -> tuple[int, int]:
    """(width, height) with the given long side and the aspect of `size`."""
    width, height = size
    scale = long_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_tensor(image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(1, 3, H, W) float in [0, 1], resized with a high-quality filter when `size` is given."""
    if size is not None and size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]


def to_image(tensor: torch.Tensor) -> Image.Image:
    array = tensor[0].detach().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def resize(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a (N, C, H, W) tensor to (width, height), antialiased when shrinking."""
    width, height = size
    if tensor.shape[-2:] == (height, width):
        return tensor
    return F.interpolate(tensor, size=(height, width), mode="bicubic", antialias=True,
                         align_corners=False).clamp(0, 1)


# ITU-R BT.601 (JPEG) YCbCr; the rows give Y, Cb, Cr from RGB in [0, 1].
_RGB_TO_YCBCR = torch.tensor([[0.299, 0.587, 0.114],
                              [-0.168736, -0.331264, 0.5],
                              [0.5, -0.418688, -0.081312]])


def rgb_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    out = torch.einsum("ij,njhw->nihw", _RGB_TO_YCBCR.to(rgb), rgb)
    return out + torch.tensor([0, 0.5, 0.5]).to(rgb).view(1, 3, 1, 1)


def ycbcr_to_rgb(ycbcr: torch.Tensor) -> torch.Tensor:
    centred = ycbcr - torch.tensor([0, 0.5, 0.5]).to(ycbcr).view(1, 3, 1, 1)
    return torch.einsum("ij,njhw->nihw", torch.linalg.inv(_RGB_TO_YCBCR).to(ycbcr), centred)


def luminance(rgb: torch.Tensor) -> torch.Tensor:
    """The Y channel repeated to three channels, so VGG sees a grey image."""
    return rgb_to_ycbcr(rgb)[:, :1].expand(-1, 3, -1, -1)


def with_chroma_of(luma_rgb: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """The luminance of `luma_rgb` with the chroma (Cb, Cr) of `colour`."""
    ycbcr = torch.cat([rgb_to_ycbcr(luma_rgb)[:, :1], rgb_to_ycbcr(colour)[:, 1:]], dim=1)
    return ycbcr_to_rgb(ycbcr).clamp(0, 1)


def match_luminance(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Grey `source` whose luminance mean and spread match `target`'s (the luminance-only mode)."""
    y_s, y_t = luminance(source)[:, :1], luminance(target)[:, :1]
    y = (y_s - y_s.mean()) / (y_s.std() + 1e-5) * y_t.std() + y_t.mean()
    return y.clamp(0, 1).expand(-1, 3, -1, -1)


def match_colors(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`source` recoloured so its colour mean and covariance match `target`'s."""
    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = x[0].flatten(1).double()
        mean = pixels.mean(1, keepdim=True)
        cov = torch.cov(pixels) + 1e-5 * torch.eye(3, dtype=torch.float64)
        return mean, cov

    def sqrtm(m: torch.Tensor, power: float) -> torch.Tensor:
        values, vectors = torch.linalg.eigh(m)
        return vectors @ torch.diag(values.clamp_min(1e-8) ** power) @ vectors.T

    mean_s, cov_s = stats(source)
    mean_t, cov_t = stats(target)
    transform = sqrtm(cov_t, 0.5) @ sqrtm(cov_s, -0.5)
    pixels = source[0].flatten(1).double()
    out = transform @ (pixels - mean_s) + mean_t
    return out.to(source.dtype).view_as(source).clamp(0, 1)


def save_png(image: Image.Image, target: str | os.PathLike | io.BytesIO, metadata: dict[str, str]) -> None:
    """Write a PNG whose text chunks carry `metadata` (settings, weights, inputs)."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    image.save(target, format="PNG", pnginfo=info)


def png_metadata(path: str | os.PathLike) -> dict[str, str]:
    with Image.open(path) as image:
        return dict(getattr(image, "text", {}))
