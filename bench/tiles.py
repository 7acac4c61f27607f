"""Tiled rendering against the whole picture: objective, time, seams, peak memory, and making a result bigger.

- Quality and time (issue 19's targets): at each size, the picture made whole and in tiles with the same steps,
  both scored with the engine's objective on the whole picture in float32 (common.score), and their times.
- Seams: in the tiled picture, the mean absolute pixel difference across the lines where the last sweep's tiles
  meet over that across the other lines at the same place in VGG19's 16 px cell (tiles are cut on whole cells,
  and a picture made through VGG19 differs more across some of a cell's lines than others, tiled or not), beside
  the whole picture's at the same lines (a few lines of a photo: some cross its edges) and the tiled over the
  whole's, what the tiles add; a sheet with a crop across a tile corner, whole beside tiled
  (bench/out/tile_seam.png).
- Peak memory: each run in a fresh process (as bench/memory.py measures them), whole and tiled, with the memory
  model's estimate (plan.peak_bytes) beside it.
- Make it bigger: a result at a quarter of the size made bigger to the size; the bigger picture shrunk to the
  result's size against the result (mean |difference|, 0-255; beside it, the picture made from scratch at the size,
  shrunk the same way), and its time against the time from scratch.
Weights: the bench's (common.WEIGHTS: the trained stand-in where it has been built), named in the header.
"""

from __future__ import annotations

import argparse
import math
from collections import deque
from pathlib import Path

import memory
import numpy as np
import torch
from common import engine_settings, load_images, score, start, table
from PIL import Image

from stylize import transfer
from stylize.device import pick_precision
from stylize.losses import CELL
from stylize.plan import Scale, peak_bytes, plan

OUT = Path(__file__).resolve().parent / "out"  # git-ignored
GIB = 2**30
OPTIMIZER = "adam"  # tiled scales are made with Adam (engine.py): whole pictures too, so that tiles alone differ


def made(device: torch.device, size: int, tile: int, steps: int, **more: object):
    """The final Progress of one transfer of the bench's pair."""
    content, style = load_images()
    settings = engine_settings(device, size=size, steps=steps, tile_size=tile, optimizer=OPTIMIZER)
    return deque(transfer(content, style, settings, **more), maxlen=1)[0]


def seam_ratio(picture: np.ndarray, scale: Scale, sweep: int) -> float:
    """Mean |difference| across the lines where the tiles of a sweep meet, over that across the other lines that
    lie where they do in a CELL (the edges are on whole cells)."""
    at_edges, elsewhere = [], []
    for axis in (0, 1):  # rows, then columns
        step = np.abs(np.diff(picture, axis=axis)).mean(axis=(1 - axis, 2))  # line i | i + 1
        edges = {cell[axis].start - 1 for cell in scale.grid(sweep) if cell[axis].start}
        at_edges += [step[i] for i in sorted(edges)]
        elsewhere += [step[i] for i in range(CELL - 1, len(step), CELL) if i not in edges]
    return float(np.mean(at_edges)) / float(np.mean(elsewhere))


def seam_sheet(whole: Image.Image, tiled: Image.Image, scale: Scale, sweep: int) -> Image.Image:
    """A 256 px crop across the first tile's far corner at the last sweep, whole beside tiled, at twice the size
    (the crop kept inside the picture: the moving grid's first corner may lie near its edge, and a strip across the
    picture ends at it, so the crop is across its one cut edge)."""
    rows, columns = scale.grid(sweep)[0]
    y, x = (min(max(edge, 128), side - 128) for edge, side in ((rows.stop, tiled.height), (columns.stop, tiled.width)))
    crops = [
        p.crop((x - 128, y - 128, x + 128, y + 128)).resize((512, 512), Image.Resampling.NEAREST)
        for p in (whole, tiled)
    ]
    sheet = Image.new("RGB", (1032, 512), "white")
    sheet.paste(crops[0], (0, 0))
    sheet.paste(crops[1], (520, 0))
    return sheet


def quality(device: torch.device, size: int, tile: int, steps: int, rounds: int) -> tuple[list[list[object]], dict]:
    content, style = load_images()
    settings = engine_settings(device, size=size, steps=steps, tile_size=tile, optimizer=OPTIMIZER)
    runs, seconds = {}, {}
    for _ in range(rounds):  # interleaved, the fastest kept: a shared machine's noise only ever adds
        for name, tile_size in (("whole", 0), ("tiled", tile)):
            runs[name] = made(device, size, tile_size, steps)
            seconds[name] = min(seconds.get(name, math.inf), runs[name].elapsed)
    values = {name: score(run.pixels, settings, content, style) for name, run in runs.items()}
    scale = plan(content.size, settings)[-1]
    pictures = {name: run.image() for name, run in runs.items()}
    seams = {name: seam_ratio(np.asarray(image, np.float64), scale, scale.steps) for name, image in pictures.items()}
    OUT.mkdir(exist_ok=True)
    seam_sheet(pictures["whole"], pictures["tiled"], scale, scale.steps).save(OUT / f"tile_seam_{size}.png")
    row = [
        f"{pictures['whole'].width}x{pictures['whole'].height}",
        f"{tile} px",
        steps,
        values["whole"],
        values["tiled"],
        f"{values['tiled'] / values['whole']:.3f}",
        seconds["whole"],
        seconds["tiled"],
        f"{seconds['tiled'] / seconds['whole']:.2f}",
        f"{seams['tiled']:.3f}",
        f"{seams['whole']:.3f}",
        f"{seams['tiled'] / seams['whole']:.3f}",
    ]
    return [row], runs["whole"]


def memory_rows(device: torch.device, size: int, tile: int, steps: int) -> list[list[object]]:
    content, _ = load_images()
    precision = pick_precision("auto", device)
    rows, peaks = [], {}
    for tile_size in (0, tile):
        result = memory.measure("engine", size, steps, device.type, tile_size)
        scale = plan(content.size, engine_settings(device, size=size, steps=steps, tile_size=tile_size))[-1]
        peaks[tile_size] = result["peak"]
        rows.append(
            [
                f"{scale.size[0]}x{scale.size[1]}",
                f"{tile_size} px" if tile_size else "whole",
                result["peak"] / GIB,
                peak_bytes(scale, precision) / GIB,
                result["seconds"],
                f"{result['peak'] / peaks[0]:.2f}",
            ]
        )
    return rows


def bigger(device: torch.device, size: int, steps: int, whole) -> list[list[object]]:
    small = made(device, size // 4, 0, steps).image()
    content, _ = load_images()
    big = made(device, size, 0, steps, bigger_from=small)
    source = np.asarray(small, np.float64)

    def apart(picture: Image.Image) -> float:
        return float(np.abs(np.asarray(picture.resize(small.size, Image.Resampling.BOX), np.float64) - source).mean())

    return [
        [
            f"{small.width}x{small.height}",
            f"{big.image().width}x{big.image().height}",
            big.total,
            apart(big.image()),
            apart(whole.image()),
            big.elapsed,
            whole.elapsed,
            f"{big.elapsed / whole.elapsed:.2f}",
        ]
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="sizes made whole and in tiles")
    p.add_argument("--tile", type=int, default=512, help="tile_size for the tiled runs")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--rounds", type=int, default=1, help="whole and tiled runs, interleaved; times: the fastest")
    p.add_argument(
        "--memory-steps",
        type=int,
        default=20,
        help="steps of the memory runs (the peak is the last scale's, whatever the steps)",
    )
    p.add_argument(
        "--only", nargs="+", choices=("quality", "memory", "bigger"), default=["quality", "memory", "bigger"]
    )
    args, device = start(p)
    for size in args.sizes:
        if "quality" in args.only or "bigger" in args.only:
            rows, whole = quality(device, size, args.tile, args.steps, args.rounds)
            print(
                f"\nWhole and tiled, {args.steps} steps: the engine's objective on the whole picture in float32, "
                f"time (the fastest of {args.rounds} rounds), seams (|difference| across the last sweep's tile "
                "edges / across the other lines at the same place in a 16 px cell; whole's: the whole picture's at "
                "the same lines)\n"
                + table(
                    [
                        "size",
                        "tiles",
                        "steps",
                        "whole",
                        "tiled",
                        "tiled / whole",
                        "whole s",
                        "tiled s",
                        "time ratio",
                        "seams",
                        "whole's",
                        "seams / whole's",
                    ],
                    rows,
                )
                + f"\nsheet: {OUT / f'tile_seam_{size}.png'}",
                flush=True,
            )
        if "memory" in args.only:
            print(
                f"\nPeak memory (fresh process each; {args.memory_steps} steps; "
                f"{'max_memory_allocated' if device.type == 'cuda' else 'peak RSS'}), GiB, and the memory model's\n"
                + table(
                    ["size", "tiles", "peak", "model", "s", "/ whole"],
                    memory_rows(device, size, args.tile, args.memory_steps),
                ),
                flush=True,
            )
        if "bigger" in args.only:
            print(
                f"\nMade bigger from a {size // 4} px result ({args.steps} steps at {size} px, of which the scales "
                "above the result's make the total shown): mean |difference| (0-255) from the result once shrunk "
                "to its size, against the picture made from scratch at the size\n"
                + table(
                    [
                        "from",
                        "to",
                        "steps",
                        "bigger vs result",
                        "from scratch vs result",
                        "bigger s",
                        "from scratch s",
                        "time ratio",
                    ],
                    bigger(device, size, args.steps, whole),
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
