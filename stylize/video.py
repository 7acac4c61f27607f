"""Clips in and out: container checks before any frame is decoded, frames, and an MP4 writer (flow.py: the
optical flow between frames).

Clips are untrusted like images (images.py): `probe` reads only the container's header and refuses, with a
message that says what to do, what is not a short video (a picture, a truncated file, no declared length,
too many streams, frames too large, too long). Frames are then decoded up to the count the header declared,
however many the file really holds. PyAV reads and writes them: its wheel ships FFmpeg's codecs (H.264 and AAC
included), so nothing is assumed of the system and nothing is downloaded. This module imports no torch:
the command line tells a clip from a picture before it imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
from PIL import Image

from .decoding import ImageError, LimitError

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


class ClipError(ImageError):
    """A clip a user gave cannot be used; the message says why and what to do."""


class ClipLimitError(ClipError, LimitError):
    """A clip over a limit on uploads; `setting` is the environment variable that raises it (the command line
    says so)."""


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
        raise ClipLimitError(
            f"The {what} is {size / 2**20:.1f} MB; the limit is {MAX_CLIP_BYTES / 2**20:.0f} MB. {USE}",
            "STYLIZE_MAX_CLIP_MB",
        )
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
        raise ClipLimitError(
            f"The {what}'s frames are {width}x{height} pixels; the limit is {MAX_FRAME_PIXELS / 1e6:.1f} megapixels. "
            "Use a smaller video.",
            "STYLIZE_MAX_FRAME_MEGAPIXELS",
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
        raise ClipLimitError(
            f"The {what} is {seconds:.1f} s long; the limit is {MAX_CLIP_SECONDS:g} s. Use a shorter one.",
            "STYLIZE_MAX_CLIP_SECONDS",
        )
    if declared > MAX_CLIP_FRAMES:
        raise ClipLimitError(
            f"The {what} has {declared} frames; the limit is {MAX_CLIP_FRAMES}. Use a shorter video "
            "or one with fewer frames per second.",
            "STYLIZE_MAX_CLIP_FRAMES",
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
