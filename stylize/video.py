"""Clips in and out: container checks before any frame is decoded, frames, optical flow, and an MP4 writer.

Clips are untrusted like images (images.py): `probe` reads only the container's header and refuses, with a
message that says what to do, what is not a short video (a picture, a truncated file, no declared length,
too many streams, frames too large, too long). Frames are then decoded up to the count the header declared,
however many the file really holds. PyAV reads and writes them: its wheel ships FFmpeg's codecs (H.264 and AAC
included), so nothing is assumed of the system and nothing is downloaded. Optical flow is OpenCV's DIS
(dense inverse search): dense, fast on a CPU (milliseconds at 256 px), and without learned weights.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .decoding import ImageError

MAX_CLIP_BYTES = int(float(os.environ.get("STYLIZE_MAX_CLIP_MB", "100")) * 2**20)
MAX_CLIP_SECONDS = float(os.environ.get("STYLIZE_MAX_CLIP_SECONDS", "30"))
MAX_CLIP_FRAMES = int(os.environ.get("STYLIZE_MAX_CLIP_FRAMES", "360"))
MAX_FRAME_PIXELS = int(float(os.environ.get("STYLIZE_MAX_FRAME_MEGAPIXELS", "8.3")) * 1_000_000)  # 3840x2160
MAX_STREAMS = 4  # video, audio, and a subtitle or data track or two; more is not a phone's or an editor's clip
# What FFmpeg names the containers a camera, a phone or an editor writes.
CONTAINERS = {"mov,mp4,m4a,3gp,3g2,mj2": "MP4", "matroska,webm": "WebM", "avi": "AVI"}
CODECS = ("h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mpeg2video", "mpeg1video", "mjpeg", "prores", "theora")
# Containers FFmpeg opens a picture in: a picture given as a clip.
PICTURE_FORMATS = ("image2", "png_pipe", "jpeg_pipe", "webp_pipe", "gif", "bmp_pipe", "tiff_pipe", "apng")
USE = "Use a short MP4, WebM or MOV video."

# Forward-backward consistency (Ruder, Dosovitskiy and Brox 2016, section 3.2): a pixel's flow is trusted where
# following it there and back returns near the start, and where the flow does not change abruptly.
CONSISTENCY = (0.01, 0.5)  # |f + b|² <= 0.01·(|f|² + |b|²) + 0.5 (px²)
MOTION_BOUNDARY = (0.01, 0.002)  # |∇b|² > 0.01·|b|² + 0.002


class ClipError(ImageError):
    """A clip a user gave cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Clip:
    """What a clip's container declares, once `probe` has found it acceptable."""

    path: Path
    size: tuple[int, int]  # (width, height) of its frames
    frames: int  # frames to decode: the declared count (or duration times rate), never above MAX_CLIP_FRAMES
    rate: Fraction  # frames per second
    seconds: float
    codec: str
    audio: bool  # whether it has a sound track to carry over


# The first bytes of the containers read here: MP4/MOV (a box type after the box size), Matroska/WebM, AVI.
CLIP_SIGNATURES = (
    lambda head: head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"),
    lambda head: head[:4] == b"\x1a\x45\xdf\xa3",
    lambda head: head[:4] == b"RIFF" and head[8:12] == b"AVI ",
)


def looks_like_clip(path: str | os.PathLike) -> bool:
    """Whether the file's first bytes are those of a container read here (not its name)."""
    with open(path, "rb") as file:
        head = file.read(12)
    return any(signature(head) for signature in CLIP_SIGNATURES)


def probe(path: str | os.PathLike, what: str = "clip") -> Clip:
    """The clip's header, checked against the limits before a single frame is decoded."""
    path = Path(path)
    if not path.is_file():
        raise ClipError(f"The {what} file {path.name!r} does not exist.")
    size = path.stat().st_size
    if size == 0:
        raise ClipError(f"The {what} file is empty. {USE}")
    if size > MAX_CLIP_BYTES:
        raise ClipError(f"The {what} is {size / 2**20:.1f} MB; the limit is {MAX_CLIP_BYTES / 2**20:.0f} MB. {USE}")
    try:
        container = av.open(str(path), options={"probesize": "5000000", "analyzeduration": "5000000"})
    except (av.FFmpegError, UnicodeDecodeError):
        if looks_like_clip(path):
            raise ClipError(f"The {what} file is truncated or corrupt. Use another copy of it. {USE}") from None
        raise ClipError(f"The {what} is not a video this app can read. {USE}") from None
    with container:
        return _checked(container, path, what)


def _checked(container: av.container.InputContainer, path: Path, what: str) -> Clip:
    name = container.format.name
    if name in PICTURE_FORMATS or name.endswith("_pipe"):
        raise ClipError(f"The {what} is a picture, not a video. {USE}")
    if name not in CONTAINERS:
        raise ClipError(f"The {what} is in a container this app does not read ({name}). {USE}")
    streams = container.streams
    if len(streams) > MAX_STREAMS:
        raise ClipError(f"The {what} has {len(streams)} streams; the limit is {MAX_STREAMS}. {USE}")
    if not streams.video:
        raise ClipError(f"The {what} has no video in it. {USE}")
    stream = streams.video[0]
    codec = stream.codec_context.name
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > MAX_FRAME_PIXELS:
        raise ClipError(
            f"The {what}'s frames are {width}x{height} pixels; the limit is {MAX_FRAME_PIXELS / 1e6:.1f} megapixels. "
            "Use a smaller video."
        )
    if width <= 0 or height <= 0:
        raise ClipError(f"The {what} does not say how large its frames are. {USE}")
    if codec not in CODECS:
        raise ClipError(f"The {what} is encoded in {codec}, which this app does not read. {USE}")
    if min(width, height) < 16:
        raise ClipError(f"The {what}'s frames are only {width}x{height} pixels; use one at least 16 pixels each side.")
    rate = stream.average_rate or stream.guessed_rate
    if stream.duration is not None and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / av.time_base
    else:
        raise ClipError(f"The {what} does not say how long it is (a live stream?). {USE}")
    declared = stream.frames or (round(seconds * rate) if rate else 0)
    if declared <= 1 or seconds <= 0:
        raise ClipError(f"The {what} is a single picture, not a video. Use it as the photo, or use a short video.")
    if seconds > MAX_CLIP_SECONDS:
        raise ClipError(f"The {what} is {seconds:.1f} s long; the limit is {MAX_CLIP_SECONDS:g} s. Use a shorter one.")
    if declared > MAX_CLIP_FRAMES:
        raise ClipError(
            f"The {what} has {declared} frames; the limit is {MAX_CLIP_FRAMES}. Use a shorter video "
            "or one with fewer frames per second."
        )
    rate = Fraction(rate) if rate else Fraction(declared) / Fraction(seconds)
    return Clip(path, (width, height), declared, rate, seconds, codec, bool(streams.audio))


def read_frames(clip: Clip, what: str = "clip") -> Iterator[Image.Image]:
    """The clip's frames as RGB pictures, decoded one at a time: at most `clip.frames` of them, each of the size
    the header declared (a file whose frames are not what its header says is refused)."""
    count = 0
    try:
        with av.open(str(clip.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if (frame.width, frame.height) != clip.size:
                    raise ClipError(
                        f"The {what}'s frame {count + 1} is {frame.width}x{frame.height} pixels, not the "
                        f"{clip.size[0]}x{clip.size[1]} its header declares. {USE}"
                    )
                yield frame.to_image()
                count += 1
                if count == clip.frames:
                    return
    except av.FFmpegError:
        if count == 0:
            raise ClipError(f"The {what} file is truncated or corrupt. Use another copy of it. {USE}") from None
    # A clip that ends early (cut off, or a header that counted too many) gives the frames it has.


def even(size: tuple[int, int]) -> tuple[int, int]:
    """The largest even (width, height) within `size`: H.264 in yuv420p, which every browser plays, needs them."""
    return size[0] // 2 * 2, size[1] // 2 * 2


class ClipWriter:
    """An H.264 MP4 (yuv420p, even sides, the index at the front for streaming) written a frame at a time; on
    `close`, the sound of `audio_from` (AAC) for as long as the frames written last."""

    def __init__(self, path: str | os.PathLike, rate: Fraction, audio_from: Clip | None = None, crf: int = 18):
        self.path, self.rate, self.audio_from, self.crf = Path(path), Fraction(rate), audio_from, crf
        self.container = av.open(str(self.path), "w", format="mp4", options={"movflags": "+faststart"})
        self.stream: av.VideoStream | None = None
        self.sound: av.AudioStream | None = None
        self.frames = 0

    def add(self, picture: Image.Image) -> None:
        if self.stream is None:  # every stream is added before the first packet: the header lists them
            width, height = even(picture.size)
            self.stream = self.container.add_stream("libx264", rate=self.rate, options={"crf": str(self.crf)})
            self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
            if self.audio_from is not None and self.audio_from.audio:
                self.sound = self.container.add_stream("aac", rate=self._sample_rate())
        width, height = self.stream.width, self.stream.height
        frame = av.VideoFrame.from_image(picture.convert("RGB").crop((0, 0, width, height)))
        frame.pts = self.frames
        frame.time_base = 1 / self.rate
        self.container.mux(self.stream.encode(frame))
        self.frames += 1

    def close(self) -> None:
        try:
            if self.stream is not None:
                self.container.mux(self.stream.encode(None))
                if self.sound is not None:
                    self._add_audio(self.frames / self.rate)
        finally:
            self.container.close()

    def _add_audio(self, seconds: Fraction) -> None:
        """The source's first sound track up to `seconds`, re-encoded to AAC (what MP4 in a browser plays,
        whatever the source had)."""
        out = self.sound
        with av.open(str(self.audio_from.path)) as source:
            resampler = av.AudioResampler(format="fltp", layout="stereo", rate=out.rate)
            try:
                for frame in source.decode(source.streams.audio[0]):
                    if frame.time is not None and frame.time >= seconds:
                        break
                    for part in resampler.resample(frame):
                        part.pts = None
                        self.container.mux(out.encode(part))
            except av.FFmpegError:
                pass  # a cut-off sound track: the sound there is
            for part in resampler.resample(None):
                part.pts = None
                self.container.mux(out.encode(part))
            self.container.mux(out.encode(None))

    def _sample_rate(self) -> int:
        with av.open(str(self.audio_from.path)) as source:
            return source.streams.audio[0].codec_context.sample_rate or 48000

    def __enter__(self) -> ClipWriter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


# --- optical flow ------------------------------------------------------------------------------------------------


def grey(picture: torch.Tensor) -> np.ndarray:
    """A (1, 3, H, W) picture in [0, 1] as an 8-bit grey (H, W) array, what DIS flow takes."""
    y = 0.299 * picture[0, 0] + 0.587 * picture[0, 1] + 0.114 * picture[0, 2]
    return y.clamp(0, 1).mul(255).round().byte().cpu().numpy()


def optical_flow(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(H, W, 2) float32: where each pixel of `source` went in `target`, (dx, dy) in px: source(p) ≈ target(p +
    flow(p)). DIS at its "medium" preset, on grey 8-bit frames."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    return dis.calc(source, target, None)


def consistency_mask(backward: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """(H, W) float32, 1 where the flow of a frame back to the previous one (`backward`) is reliable: the previous
    frame's flow (`forward`) at where it points brings it back (else the pixel was occluded or disoccluded), it
    points inside the previous frame, and it is not at a motion boundary."""
    height, width = backward.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    to_x, to_y = xs + backward[..., 0], ys + backward[..., 1]
    forward_there = cv2.remap(forward, to_x, to_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    round_trip = np.square(backward + forward_there).sum(-1)
    lengths = np.square(backward).sum(-1) + np.square(forward_there).sum(-1)
    consistent = round_trip <= CONSISTENCY[0] * lengths + CONSISTENCY[1]
    inside = (to_x >= 0) & (to_x <= width - 1) & (to_y >= 0) & (to_y <= height - 1)
    gradient = sum(np.square(np.gradient(backward[..., c])).sum(0) for c in range(2))
    boundary = gradient > MOTION_BOUNDARY[0] * np.square(backward).sum(-1) + MOTION_BOUNDARY[1]
    return (consistent & inside & ~boundary).astype(np.float32)


def temporal_guide(previous: torch.Tensor, current: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For two consecutive (1, 3, H, W) input frames: the flow from `current` back to `previous` ((1, H, W, 2),
    for `warp`) and where it is reliable ((1, 1, H, W) of 0 and 1), on `current`'s device."""
    a, b = grey(previous), grey(current)
    backward, forward = optical_flow(b, a), optical_flow(a, b)
    mask = consistency_mask(backward, forward)
    return torch.from_numpy(backward)[None].to(current.device), torch.from_numpy(mask)[None, None].to(current.device)


def warp(picture: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """`picture` (N, C, H, W) moved along `flow` (N, H, W, 2) in px: out(p) = picture(p + flow(p)), bilinear,
    the border repeated where the flow points outside (such pixels are masked out)."""
    height, width = picture.shape[-2:]
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=flow.dtype, device=flow.device),
        torch.arange(width, dtype=flow.dtype, device=flow.device),
        indexing="ij",
    )
    x = (xs + flow[..., 0]) * 2 / max(width - 1, 1) - 1  # grid_sample's coordinates: -1 to 1 across the centres
    y = (ys + flow[..., 1]) * 2 / max(height - 1, 1) - 1
    grid = torch.stack([x, y], dim=-1).to(picture.dtype)
    return F.grid_sample(picture, grid, mode="bilinear", padding_mode="border", align_corners=True)


def flicker(previous: torch.Tensor, current: torch.Tensor, flow: torch.Tensor, mask: torch.Tensor) -> float:
    """How much two consecutive output frames differ where the input's flow is reliable: the mean absolute
    difference of `current` and `previous` warped along `flow` (current back to previous), over `mask`."""
    difference = (current - warp(previous, flow)).abs().mean(1, keepdim=True)
    return float((difference * mask).sum() / mask.sum().clamp_min(1))
