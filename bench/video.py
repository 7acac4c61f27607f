"""Clips without flicker (issue 23's targets): consistent frames against frames made alone, per-frame quality, time.

- Flicker: the mean |difference| (0-1) between consecutive output frames once the earlier is moved along the
  input's optical flow, over the pixels where the flow is reliable (flow.flicker), for the clip made by
  engine.transfer_clip against frames each made alone by transfer() at the same per-frame budget (the steps
  whose work is the clip's work per frame).
- Per-frame quality: a few frames of the clip scored with the picture objective (common.score) against the same
  frame made on its own as a picture at the preset (the first frame's budget).
- Time: the clip's seconds, its first frame's, and a later frame's against the first's.
Clips: a synthetic pan across the bench photo, and a real one (the rotating globe gradio ships as an example
video), both at `--fps` for `--seconds`. A strip of frames, alone above consistent, goes to bench/out/video_strip_*.png.
Weights: the bench's (common.WEIGHTS: the trained stand-in where it has been built), named in the header.
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

import av
import torch
from common import WEIGHTS, load_images, score, start, table
from PIL import Image

from stylize import Settings, transfer
from stylize.engine import CLIP_OPTIMIZER, transfer_clip
from stylize.flow import flicker, temporal_guide
from stylize.images import fit, to_tensor
from stylize.plan import job_work

OUT = Path(__file__).resolve().parent / "out"  # git-ignored


def pan_clip(photo: Image.Image, count: int, side: int) -> list[Image.Image]:
    """A camera panning across the photo: a window of `side` x 3/4 `side` moving right 2% of its width a frame."""
    height = round(side * 0.75)
    scaled = photo.resize(fit(photo.size, round(side * 1.6)))
    top = (scaled.height - height) // 2
    return [scaled.crop((x, top, x + side, top + height)) for x in (round(k * side * 0.02) for k in range(count))]


def real_clip(count: int, fps: float, side: int) -> list[Image.Image]:
    """Frames of a real video (gradio's example globe), one every 1/fps s, scaled to `side`."""
    from gradio.media import get_video

    frames = []
    with av.open(get_video("world.mp4")) as container:
        stream = container.streams.video[0]
        every = round(float(stream.average_rate) / fps)
        for index, frame in enumerate(container.decode(stream)):
            if index % every == 0:
                picture = frame.to_image()
                frames.append(picture.resize(fit(picture.size, side), Image.Resampling.LANCZOS))
            if len(frames) == count:
                break
    return frames


def steps_for(work: float, size: tuple[int, int], settings: Settings) -> int:
    """The fewest steps whose work at `size` reaches `work`: a frame made alone on the clip's per-frame budget."""
    steps = 1
    while job_work(size, replace(settings, steps=steps)) < work:
        steps += 1
    return steps


def flickers(frames: list[Image.Image], outputs: list[torch.Tensor]) -> float:
    """The mean flicker over consecutive pairs of the clip."""
    values = []
    for k in range(1, len(frames)):
        size = (outputs[k].shape[-1], outputs[k].shape[-2])
        previous, current = (to_tensor(frames[j], size) for j in (k - 1, k))
        flow, reliable = temporal_guide(previous, current)
        values.append(flicker(outputs[k - 1], outputs[k], flow, reliable))
    return sum(values) / len(values)


def strip(rows: list[list[torch.Tensor]], name: str, picks: list[int]) -> Path:
    pictures = [[to_image(row[k]) for k in picks] for row in rows]
    width, height = pictures[0][0].size
    sheet = Image.new("RGB", (width * len(picks), height * len(rows)), "white")
    for r, row in enumerate(pictures):
        for c, picture in enumerate(row):
            sheet.paste(picture, (c * width, r * height))
    OUT.mkdir(exist_ok=True)
    path = OUT / f"video_strip_{name}.png"
    sheet.save(path)
    return path


def to_image(pixels: torch.Tensor) -> Image.Image:
    array = pixels[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def measure(name: str, frames: list[Image.Image], style: Image.Image, settings: Settings, checked: int) -> list:
    started, finished, outputs = time.perf_counter(), [], []
    for progress in transfer_clip(frames, style, settings):
        if progress.final:
            finished.append(time.perf_counter() - started)
            outputs.append(progress.pixels.cpu())
    clip_seconds = finished[-1]
    first = job_work(frames[0].size, settings)  # a later frame's work is settings.later_frames of it
    alone_steps = steps_for(
        first * (1 + (len(frames) - 1) * settings.later_frames) / len(frames), frames[0].size, settings
    )
    alone = [
        deque(transfer(frame, style, replace(settings, steps=alone_steps)), maxlen=1)[0].pixels for frame in frames
    ]
    ratio = flickers(frames, outputs) / flickers(frames, alone)
    picks = sorted({len(frames) // 2, len(frames) - 1})[-checked:]
    quality = []
    for k in picks:
        own = deque(transfer(frames[k], style, settings), maxlen=1)[0].pixels
        quality.append(score(outputs[k], settings, frames[k], style) / score(own, settings, frames[k], style))
    sheet = strip([alone, outputs], name, [0, len(frames) // 3, 2 * len(frames) // 3, len(frames) - 1])
    later = (clip_seconds - finished[0]) / max(1, len(frames) - 1)
    return [
        name,
        f"{frames[0].width}x{frames[0].height}",
        len(frames),
        alone_steps,
        f"{flickers(frames, outputs):.4f}",
        f"{flickers(frames, alone):.4f}",
        f"{ratio:.2f}",
        " ".join(f"{q:.3f}" for q in quality),
        clip_seconds,
        finished[0],
        f"{later / finished[0]:.2f}",
        sheet.name,
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="draft", help="the first frame's settings (and a frame made on its own)")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--fps", type=float, default=12.0)
    p.add_argument("--clips", nargs="+", choices=("pan", "real"), default=["pan", "real"])
    p.add_argument("--checked", type=int, default=2, help="frames whose quality is checked against their own picture")
    args, device = start(p)
    kind = "gpu" if device.type == "cuda" else "cpu"
    # Frames made alone and pictures with the clip's optimizer: the comparisons are of the warm start and the
    # temporal loss alone.
    settings = replace(
        Settings.from_preset(args.preset, kind, weights=WEIGHTS, device=device.type), optimizer=CLIP_OPTIMIZER
    )
    content, style = load_images()
    count = round(args.seconds * args.fps)
    clips = {
        "pan": lambda: pan_clip(content, count, settings.size),
        "real": lambda: real_clip(count, args.fps, settings.size),
    }
    rows = [measure(name, clips[name](), style, settings, args.checked) for name in args.clips]
    print(
        f"\n{args.seconds:g} s at {args.fps:g} frames per second, preset {args.preset} ({settings.size} px, "
        f"{settings.steps} steps for the first frame, later frames {settings.later_frames} of its work, temporal "
        f"weight {settings.temporal_weight}); flicker: mean |difference| of consecutive frames after the flow, "
        "on reliable pixels; alone: each frame made on its own at the clip's work per frame; quality: a frame's "
        "objective / the same frame made as a picture at the preset\n"
        + table(
            [
                "clip",
                "size",
                "frames",
                "alone steps",
                "flicker clip",
                "flicker alone",
                "clip / alone",
                "quality",
                "clip s",
                "first s",
                "later / first",
                "strip",
            ],
            rows,
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
