"""Decode, validate, orient and resize images; colour-space helpers on tensors.

Uploads are untrusted: sizes in bytes and pixels are checked before any pixel
is decoded, decoding itself is bounded (`decoding`), and every failure a user
can cause raises `ImageError` with a message that says what to do.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import threading
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .decoding import (
    MAX_BYTES,
    MAX_PIXELS,
    ImageError,
    LimitError,
    decode,
    refuse_metadata_bomb,
    shrunk,
    to_rgb,
    truncated,
)
from .decoding import fit as fit  # part of this module's interface: the engine sizes its scales with it

if TYPE_CHECKING:
    from .settings import Settings

MIN_SIDE = 16
MAX_ASPECT = 8.0
# A progressive JPEG has about 10 scans; libjpeg decodes every scan over the whole picture, so a file
# repeating a scan tens of thousands of times holds the decoder for minutes.
MAX_SCANS = 100
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")


def load_image(
    source: str | os.PathLike | bytes | Image.Image,
    what: str = "image",
    max_side: int | None = None,
    stop: threading.Event | None = None,
) -> Image.Image:
    """Open `source` as an upright 8-bit RGB image, refusing what cannot or should not be decoded.

    A file is checked here (bytes, format, header), then decoded in a bounded child process (`decoding`), which
    `stop` being set ends at once. With `max_side`, an image whose long side is longer is shrunk to it as soon
    as it is decoded, so that a large upload never reaches this process at full size.
    """
    if isinstance(source, Image.Image):
        return shrunk(to_rgb(_checked_shape(source, what)), max_side)
    _opened(source, what).close()
    return decode(source, what, max_side=max_side, stop=stop)


def image_size(source: str | os.PathLike | bytes, what: str = "image") -> tuple[int, int]:
    """(width, height) read from the file's header, after every check `load_image` makes before decoding."""
    with _opened(source, what) as image:
        return image.size


def load_opacity(
    source: str | os.PathLike | bytes, what: str, size: tuple[int, int], stop: threading.Event | None = None
) -> Image.Image:
    """The opacity of an image (a painted layer) as greyscale of `size`: 255 wherever any paint is, else 0."""
    _opened(source, what).close()
    return decode(source, what, opacity_size=size, stop=stop)


def _opened(source: str | os.PathLike | bytes, what: str) -> Image.Image:
    """The image, opened but not decoded, once its bytes, format and header pass every check."""
    if isinstance(source, bytes):
        size, opener, contents = len(source), lambda: io.BytesIO(source), lambda: source
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"The {what} file {path.name!r} does not exist.")
        size, opener, contents = path.stat().st_size, lambda: path, path.read_bytes
    if size == 0:
        raise ImageError(f"The {what} file is empty. Use a JPEG, PNG or WebP image.")
    if size > MAX_BYTES:
        raise LimitError(
            f"The {what} is {size / 2**20:.1f} MB; the limit is {MAX_BYTES / 2**20:.0f} MB. Use a smaller file.",
            "STYLIZE_MAX_UPLOAD_MB",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, as an error
            image = Image.open(opener())
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, Image.DecompressionBombError):
            raise LimitError(
                f"The {what} has too many pixels; the limit is {MAX_PIXELS / 1e6:.0f} megapixels. Use a smaller image.",
                "STYLIZE_MAX_MEGAPIXELS",
            ) from None
        refuse_metadata_bomb(error, what)
        raise ImageError(f"The {what} is not an image this app can read. Use a JPEG, PNG or WebP image.") from None
    try:
        if image.format not in FORMATS:
            raise ImageError(f"The {what} is in {image.format} format. Use a JPEG, PNG or WebP image.")
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise LimitError(
                f"The {what} is {width}x{height} pixels; the limit is {MAX_PIXELS / 1e6:.0f} megapixels. "
                "Use a smaller image.",
                "STYLIZE_MAX_MEGAPIXELS",
            )
        _checked_shape(image, what)
        if image.format in ("JPEG", "MPO"):
            _check_jpeg(contents(), image.size, what)
    except ImageError:
        image.close()
        raise
    return image


# The end of a scan's entropy-coded data: a marker, that is 0xFF followed by anything but a stuffed zero,
# a restart marker (both part of the data) or another 0xFF (fill).
_END_OF_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_HUFFMAN_FRAMES = (0xC0, 0xC1, 0xC2)  # baseline, extended and progressive, as cameras and browsers write them


def _check_jpeg(data: bytes, size: tuple[int, int], what: str) -> None:
    """Refuse a JPEG whose decoding would take far too long (a scan bomb) or that has hardly any image data
    (a header alone decodes to a flat grey picture). Walks the markers of the first image without decoding."""
    scans = coded = 0
    huffman = False
    position = 2  # after the start-of-image marker
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xD9:  # end of image
            break
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # fill byte or a marker without length
            position += 1 if marker == 0xFF else 2
            continue
        end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        huffman |= marker in _HUFFMAN_FRAMES
        if marker == 0xDA:  # start of scan: its header, then entropy-coded data up to the next marker
            scans += 1
            following = _END_OF_SCAN.search(data, end)
            coded += (following.start() if following else len(data)) - end
            end = following.start() if following else len(data)
        position = end
    if scans > MAX_SCANS:
        raise ImageError(
            f"The {what} is a JPEG in {scans} scans (progressive layers); the limit is {MAX_SCANS}. "
            "Open it in an image editor and save it again as a standard JPEG or a PNG."
        )
    # Huffman coding spends at least one bit on every 8x8 block's DC coefficient.
    if huffman and coded * 8 < math.ceil(size[0] / 8) * math.ceil(size[1] / 8):
        raise truncated(what)


def _checked_shape(image: Image.Image, what: str) -> Image.Image:
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        raise ImageError(
            f"The {what} is only {width}x{height} pixels; use one at least {MIN_SIDE} pixels on each side."
        )
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ImageError(
            f"The {what} is {width}x{height} pixels, longer than {MAX_ASPECT:g}:1. Crop it to a less extreme shape."
        )
    return image


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
    return F.interpolate(tensor, size=(height, width), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


# ITU-R BT.601 (JPEG) YCbCr; the rows give Y, Cb, Cr from RGB in [0, 1].
_RGB_TO_YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


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


def result_metadata(settings: Settings, progress: Any) -> dict[str, str]:
    """PNG text chunks that record how a result was made: the settings as given, with the precision that ran (so
    that a rerun gives the same pixels; a weights file named only in the server's environment stays out of
    pictures shown to strangers), and the kind of weights used. `progress` is the engine's Progress record
    of the result."""
    ran = replace(settings, precision=progress.precision)
    meta = {
        "Software": "stylize",
        "stylize:settings": ran.to_json(),
        "stylize:weights": progress.weights,
        "stylize:precision": progress.precision,
    }
    if progress.note:
        meta["stylize:warning"] = progress.note
    return meta


def bigger_metadata(size: tuple[int, int], recorded: dict[str, str]) -> dict[str, str]:
    """The PNG text chunk of a picture made bigger: the (width, height) of the result it was made from, and that
    result's settings where it records settings this app takes (`recorded`: its text chunks; None where it does
    not, e.g. a picture made elsewhere)."""
    from .settings import Settings, SettingsError

    try:
        settings = json.loads(Settings.from_json(recorded["stylize:settings"]).to_json())
    except (KeyError, SettingsError, ValueError, TypeError, AttributeError, RecursionError):
        settings = None
    return {"stylize:bigger_from": json.dumps({"size": list(size), "settings": settings})}
