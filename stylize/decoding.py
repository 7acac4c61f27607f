"""Decoding an untrusted image file in a child process bounded in wall time, CPU time and memory.

Why: the header checks in `images` refuse the costly files we know of cheaply, before any pixel is decoded, but
they race the decoders (libjpeg, libpng, libtiff, libwebp): a progressive JPEG whose scans a header walk
undercounts held a worker for minutes, and a decoding thread cannot be stopped, so it went on after its job was
stopped. Services that decode strangers' images for a living bound the decoder itself, not only its input:
browsers decode in sandboxed processes, and image proxies (imgproxy, thumbor) decode in resource-limited
workers they can kill. So here: each file is decoded by a process of its own, which sets an RLIMIT_CPU and an
RLIMIT_AS on itself before it reads a byte of the file and is killed at a wall-clock deadline
(STYLIZE_DECODE_SECONDS) or when its job is stopped. Whatever the decoder does, it cannot hold the worker longer,
use more memory, or outlive its job.

The child runs this file as a script: it imports Pillow and numpy, never the app (torch, gradio), so it starts in
a fraction of a second; one is started ahead of need (`Decoders`), so a job does not wait for that either. It
sends back the picture as raw bytes with its mode and size, converted and shrunk already, so the server never
holds a full-size image. This module imports nothing from the package for the same reason; `images` builds on it.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

MAX_BYTES = int(float(os.environ.get("STYLIZE_MAX_UPLOAD_MB", "20")) * 2**20)
MAX_PIXELS = int(float(os.environ.get("STYLIZE_MAX_MEGAPIXELS", "40")) * 1_000_000)
DECODE_SECONDS = float(os.environ.get("STYLIZE_DECODE_SECONDS", "20"))  # wall and CPU time to decode one file
# Room for the largest image's decoded pixels several times over: 16-bit RGBA is 8 bytes a pixel, and
# converting one makes float32 and 8-bit copies.
DECODE_MEMORY = 16 * MAX_PIXELS + 256 * 2**20
POLL_SECONDS = 0.05  # how often a waiting parent looks whether the job was stopped

# Pillow refuses anything larger than this outright, wherever it decodes (gradio included).
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageError(ValueError):
    """An image a user gave cannot be used; the message says why and what to do."""


class LimitError(ImageError):
    """An image over a limit on uploads. On their own machine (the command line) a user may raise it: `setting`
    is the environment variable that does."""

    def __init__(self, message: str, setting: str) -> None:
        super().__init__(message)
        self.setting = setting


# --- in the parent -------------------------------------------------------------------------------------------


class Decoders:
    """Decoding processes, one started ahead of need: each decodes one file and exits, so nothing one file does
    to a decoder can reach the next."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ready: subprocess.Popen | None = None

    def take(self) -> subprocess.Popen:
        with self.lock:
            process = self.ready if self.ready is not None and self.ready.poll() is None else _start()
            self.ready = _start()
        return process


DECODERS = Decoders()


def _start() -> subprocess.Popen:
    # One thread for numpy's maths libraries: their thread pools would take most of the address space allowed.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # -I: the child imports only installed packages, not files from this folder or the working directory.
    return subprocess.Popen(
        [sys.executable, "-I", str(Path(__file__).resolve())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )


def decode(
    source: str | os.PathLike | bytes,
    what: str,
    max_side: int | None = None,
    opacity_size: tuple[int, int] | None = None,
    stop: threading.Event | None = None,
) -> Image.Image:
    """Decode `source` in a bounded child process: upright 8-bit RGB, shrunk to `max_side` on its long side if
    longer; or, with `opacity_size`, its opacity as greyscale of that size (255 wherever any paint is, else 0).
    Raises ImageError when the file cannot be decoded within the bounds, or when `stop` is set meanwhile."""
    request = {
        "what": what,
        "max_side": max_side,
        "opacity_size": opacity_size,
        "seconds": DECODE_SECONDS,
        "memory": DECODE_MEMORY,
        "path": None if isinstance(source, bytes) else str(source),
        "length": len(source) if isinstance(source, bytes) else 0,
    }
    payload = json.dumps(request).encode() + b"\n" + (source if isinstance(source, bytes) else b"")
    process = DECODERS.take()
    answer: list[bytes] = []

    def exchange() -> None:  # in a thread of its own, so that this one can kill the decoder whatever it does
        try:
            with process.stdin:
                process.stdin.write(payload)
        except BrokenPipeError:  # it died before reading the whole request: it answers nothing
            pass
        answer.append(process.stdout.read())

    deadline = time.monotonic() + DECODE_SECONDS
    talking = threading.Thread(target=exchange, daemon=True)
    talking.start()
    try:
        while True:
            talking.join(POLL_SECONDS)
            if not talking.is_alive():
                break
            if stop is not None and stop.is_set():
                raise ImageError(f"Stopped while reading the {what}.")
            if time.monotonic() > deadline:
                raise ImageError(
                    f"The {what} takes too long to decode (over {DECODE_SECONDS:g} s). Save it again "
                    "as a standard JPEG or PNG, or try another image."
                )
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        talking.join()
        process.stdout.close()
    return _picture(answer[0], what)


def _picture(output: bytes, what: str) -> Image.Image:
    header, _, pixels = output.partition(b"\n")
    try:
        answer = json.loads(header)
    except ValueError:  # killed by its CPU or memory limit before it could answer
        raise ImageError(
            f"The {what} needs more time or memory to decode than this server gives one image. "
            "Save it again as a standard JPEG or PNG, or try a smaller image."
        ) from None
    if "error" in answer:
        raise ImageError(answer["error"])
    mode, size = answer["mode"], tuple(answer["size"])
    if mode not in ("RGB", "L") or len(pixels) != size[0] * size[1] * len(mode):
        raise ImageError(f"The {what} could not be decoded. Try another image.")
    return Image.frombytes(mode, size, pixels)


# --- shared by both ------------------------------------------------------------------------------------------


def fit(size: tuple[int, int], long_side: int) -> tuple[int, int]:
    """(width, height) with the given long side and the aspect of `size`."""
    width, height = size
    scale = long_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def truncated(what: str) -> ImageError:
    return ImageError(f"The {what} file is truncated or corrupt. Use another copy of it or another image.")


def refuse_metadata_bomb(error: Exception, what: str) -> None:
    """PNG text and colour-profile chunks inflate like a zip bomb; Pillow stops them past its MAX_TEXT_* limits."""
    if isinstance(error, ValueError) and "MAX_TEXT" in str(error):
        raise ImageError(
            f"The {what}'s metadata (text or colour profile) is too large. Save the image again "
            "without metadata, or try another image."
        ) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB; transparency is flattened onto white, 16-bit and float data scaled, not clipped."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        data = np.array(image, dtype=np.float32)  # a copy, scaled in place: a 40-megapixel image takes 160 MB
        high = 65535.0 if image.mode.startswith("I;16") or data.max() > 255 else 255.0
        data *= 255 / high
        data += 0.5
        image = Image.fromarray(np.clip(data, 0, 255, out=data).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def shrunk(image: Image.Image, max_side: int | None) -> Image.Image:
    if max_side is None or max(image.size) <= max_side:
        return image
    return image.resize(fit(image.size, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)


# --- in the child --------------------------------------------------------------------------------------------


def _decoded(request: dict, data: bytes) -> Image.Image:
    what = request["what"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the parent checked the pixel count
            image = Image.open(io.BytesIO(data) if request["path"] is None else request["path"])
            image.seek(0)  # the first frame of an animation
            image.load()
    except Exception as error:
        refuse_metadata_bomb(error, what)
        raise truncated(what) from None
    if request["opacity_size"]:
        alpha = image.convert("RGBA").getchannel("A")
        return alpha.point(lambda value: 255 if value else 0).resize(
            tuple(request["opacity_size"]), Image.Resampling.LANCZOS
        )
    return shrunk(to_rgb(image), request["max_side"])


def _limit(seconds: float, memory: int) -> None:
    """Bound this process: CPU time (SIGXCPU, then SIGKILL a second later) and address space (allocations past it
    fail), counted from now; no core dump."""
    import resource  # POSIX only, and only the child needs it

    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = int(usage.ru_utime + usage.ru_stime + seconds) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with open("/proc/self/statm") as statm:  # the address space already mapped: interpreter, Pillow, numpy
        mapped = int(statm.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (mapped + memory, mapped + memory))


def _serve() -> None:
    """Read one request from stdin, answer on stdout: a JSON line (mode and size, or an error), then the pixels."""
    line = sys.stdin.buffer.readline()
    if not line:  # the parent went away before asking anything
        return
    request = json.loads(line)
    _limit(request["seconds"], request["memory"])
    data = sys.stdin.buffer.read(request["length"])
    try:
        image = _decoded(request, data)
        header, pixels = {"mode": image.mode, "size": image.size}, image.tobytes()
    except ImageError as error:
        header, pixels = {"error": str(error)}, b""
    sys.stdout.buffer.write(json.dumps(header).encode() + b"\n" + pixels)
    sys.stdout.buffer.flush()
    os._exit(0)  # done: no interpreter shutdown for the parent to wait for


if __name__ == "__main__":
    _serve()
