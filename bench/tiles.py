"""Tiled rendering: time and peak memory from 1024 to 8192 px, seams, and quality against the whole picture.

- Time and peak memory: each run in a fresh process (as bench/memory.py measures them), the engine whole
  and in tiles at 1024 px, whole and in tiles at 2048 px, in tiles at 4096 px and, with --sizes, larger.
- Seams: a picture made in tiles; the mean absolute pixel difference across the lines where tiles meet
  (every edge of every tile of the last scale's passes) over that across all other lines, and a sheet with
  a crop around a tile corner (bench/out/tile_seam.png).
- Quality: at a size where both fit, the picture made in tiles and the one made whole, the same steps,
  scored with the baseline's float32 objective over the whole picture (bench/baseline.py).
"""

from __future__ import annotations

import argparse
from collections import deque
from pathlib import Path

import memory
import numpy as np
import torch
from baseline import BaselineLoss, textbook_vgg
from common import engine_settings, load_images, start, table
from PIL import Image

from stylize import transfer
from stylize.images import fit, to_tensor
from stylize.plan import Scale, plan

OUT = Path(__file__).resolve().parent / "out"  # git-ignored
GIB = 2**30


def memory_rows(device: torch.device, runs: list[tuple[int, int]], steps: int) -> list[list[object]]:
    content, _ = load_images()
    rows = []
    for size, tile in runs:
        result = memory.measure("engine", size, steps, device.type, tile)
        w, h = fit(content.size, size)
        rows.append([f"{w}x{h}", f"{tile} px" if tile else "whole", result["peak"] / GIB, result["seconds"]])
    return rows


def seam_ratio(picture: np.ndarray, scale: Scale) -> tuple[float, float, float]:
    """(mean |difference| across tile edges, across all other lines, their ratio), both axes together."""
    at_edges, elsewhere = [], []
    for axis in (0, 1):  # rows, then columns
        step = np.abs(np.diff(picture, axis=axis)).mean(axis=(1 - axis, 2))  # line i | i + 1
        spans = [cell[axis] for tile_pass in range(scale.passes) for cell in scale.grid(tile_pass)]
        edges = {s.start - 1 for s in spans if s.start} | {s.stop - 1 for s in spans if s.stop <= len(step)}
        at_edges += [step[i] for i in sorted(edges)]
        elsewhere += [step[i] for i in range(len(step)) if i not in edges]
    edge, other = float(np.mean(at_edges)), float(np.mean(elsewhere))
    return edge, other, edge / other


def seams(device: torch.device, size: int, tile: int, steps: int) -> tuple[list[list[object]], Path]:
    content, style = load_images()
    settings = engine_settings(device, size=size, steps=steps, tile_size=tile)
    final = deque(transfer(content, style, settings), maxlen=1)[0].image()
    scale = plan(content.size, settings)[-1]
    edge, other, ratio = seam_ratio(np.asarray(final, np.float64), scale)
    sheet = OUT / "tile_seam.png"
    OUT.mkdir(exist_ok=True)
    seam_sheet(final, scale).save(sheet)
    return [[f"{final.width}x{final.height}", f"{tile} px", scale.passes, edge, other, f"{ratio:.3f}"]], sheet


def seam_sheet(picture: Image.Image, scale: Scale) -> Image.Image:
    """The picture shrunk, beside a 256 px crop around the corner where the last pass's first tiles meet, 2x."""
    rows, columns = scale.grid(scale.passes - 1)[0]
    y, x = rows.stop - 32, columns.stop - 32  # the middle of the overlap, where the tiles meet
    crop = picture.crop((x - 128, y - 128, x + 128, y + 128)).resize((512, 512), Image.Resampling.NEAREST)
    small = picture.copy()
    small.thumbnail((512, 512))
    sheet = Image.new("RGB", (small.width + 520, max(small.height, 512)), "white")
    sheet.paste(small, (0, 0))
    sheet.paste(crop, (small.width + 8, 0))
    return sheet


def quality(device: torch.device, size: int, tile: int, steps: int) -> list[list[object]]:
    content_image, style_image = load_images()
    full = fit(content_image.size, size)
    content = to_tensor(content_image, full).to(device)
    style = to_tensor(style_image, fit(style_image.size, size)).to(device)
    loss = BaselineLoss(textbook_vgg(device), content, style)
    rows, values = [], {}
    for name, tile_size in (("whole", 0), (f"{tile} px tiles", tile)):
        settings = engine_settings(device, size=size, steps=steps, tile_size=tile_size)
        final = deque(transfer(content_image, style_image, settings), maxlen=1)[0]
        values[name] = loss.value(final.pixels)
        rows.append(
            [f"{full[0]}x{full[1]}", name, steps, final.elapsed, values[name], f"{values[name] / values['whole']:.3f}"]
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[1024, 2048, 4096],
        help="sizes for time and memory (1024 and 2048 also whole); add 8192 where affordable",
    )
    p.add_argument("--tile", type=int, default=512, help="tile_size for the tiled runs")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--seam-size", type=int, default=2048)
    p.add_argument("--quality-size", type=int, default=1024)
    p.add_argument("--only", nargs="+", choices=("memory", "seams", "quality"), default=["memory", "seams", "quality"])
    args, device = start(p)
    if "memory" in args.only:
        runs = [(size, tile) for size in args.sizes for tile in ((0, args.tile) if size <= 2048 else (args.tile,))]
        print(
            f"\nTime and peak memory (fresh process each; {args.steps} steps; "
            f"{'max_memory_allocated' if device.type == 'cuda' else 'peak RSS'})\n"
            + table(["size", "tiles", "peak GiB", "s"], memory_rows(device, runs, args.steps)),
            flush=True,
        )
    if "seams" in args.only:
        rows, sheet = seams(device, args.seam_size, args.tile, args.steps)
        print(
            "\nSeams: mean |pixel difference| (0-255) across tile edges and across all other lines\n"
            + table(
                [
                    "size",
                    "tiles",
                    "passes at the last scale",
                    "across tile edges",
                    "across other lines",
                    "edges / other",
                ],
                rows,
            )
            + f"\nsheet: {sheet}",
            flush=True,
        )
    if "quality" in args.only:
        print(
            "\nQuality: the whole picture's float32 objective, made whole and in tiles with the same steps\n"
            + table(
                ["size", "made", "steps", "s", "objective", "/ whole"],
                quality(device, args.quality_size, args.tile, args.steps),
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
