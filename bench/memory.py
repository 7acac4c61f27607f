"""Peak memory of one transfer at 512, 1024 and 2048 px, and the largest size that fits in 8 GiB.

Every measurement runs in a fresh subprocess, so no allocator cache or earlier size
leaks into it. CPU: the child builds its model and loads its images, then resets the
kernel's peak-RSS mark (writing 5 to /proc/self/clear_refs) and reports VmHWM from
/proc/self/status after the run: the process's peak resident memory during the run,
Python, torch and the weights included (ru_maxrss is the fallback where clear_refs is
not writable; it also counts the model build). CUDA: torch.cuda.max_memory_allocated
after reset_peak_memory_stats.
The engine runs its default step count at each size (its peak is at the full scale).
The baseline runs --baseline-steps L-BFGS evaluations; its L-BFGS history keeps growing
to 100 pairs of image-sized vectors, so a "300 steps" column adds what those pairs hold
(200 x 3 x H x W x 4 bytes less what the measured run already held): computed, not measured.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import torch
from baseline import run_baseline, textbook_vgg
from common import (
    add_image_arguments,
    engine_settings,
    load_engine_weights,
    load_images,
    load_pair,
    machine_header,
    table,
)

from stylize import transfer
from stylize.device import pick_device
from stylize.images import fit

GIB = 2**30
LBFGS_HISTORY = 100  # torch.optim.LBFGS's default history_size


def child(method: str, size: int, steps: int, tile: int, device: torch.device) -> dict[str, float]:
    if method == "baseline":
        net = textbook_vgg(device)
        content, style = load_pair(size, device)
    else:
        settings = engine_settings(device, size=size, steps=steps, tile_size=tile)
        load_engine_weights(device)
        content, style = load_images()
    reset = reset_peak(device)
    started = time.perf_counter()
    if method == "baseline":
        run_baseline(net, content, style, steps)
    else:
        for _ in transfer(content, style, settings):
            pass
    return {"peak": peak(device, reset), "seconds": time.perf_counter() - started, "reset": float(reset)}


def reset_peak(device: torch.device) -> bool:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak(device: torch.device, reset: bool) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated())
    if reset:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kB on Linux


def measure(method: str, size: int, steps: int, device: str, tile: int = 0) -> dict[str, float]:
    """Peak memory and seconds of one run in a fresh process; the engine untiled unless `tile` (its tile_size)."""
    command = [sys.executable, __file__, "--child", method, str(size), str(steps), str(tile), "--device", device]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"peak": math.nan, "seconds": math.nan, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def history_bytes(pixels: int, steps: int) -> float:
    """What torch.optim.LBFGS's history holds after `steps` evaluations: pairs of image-sized float vectors."""
    return 2 * min(max(steps - 1, 0), LBFGS_HISTORY) * 3 * pixels * 4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_image_arguments(p)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--engine-steps", type=int, default=engine_settings(torch.device("cpu")).steps)
    p.add_argument("--baseline-steps", type=int, default=4)
    p.add_argument("--budget-gib", type=float, default=8.0)
    p.add_argument("--quick", action="store_true", help="256 and 512 px only")
    p.add_argument("--device", default="auto")
    p.add_argument("--child", nargs=4, metavar=("METHOD", "SIZE", "STEPS", "TILE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    device = pick_device(args.device)
    if args.child:
        method, size, steps, tile = args.child
        print(json.dumps(child(method, int(size), int(steps), int(tile), device)))
        return
    if args.quick:
        args.sizes = [256, 512]
    print(machine_header(device))
    print(report(device, args.sizes, args.engine_steps, args.baseline_steps, args.budget_gib))


def report(device: torch.device, sizes: list[int], engine_steps: int, baseline_steps: int, budget_gib: float) -> str:
    content, _ = load_images()
    rows, points = [], []
    for size in sizes:
        w, h = fit(content.size, size)
        base = measure("baseline", size, baseline_steps, device.type)
        ours = measure("engine", size, engine_steps, device.type)
        base_300 = base["peak"] + history_bytes(w * h, 300) - history_bytes(w * h, baseline_steps)
        points.append((w * h, ours["peak"]))
        rows.append(
            [
                f"{w}x{h}",
                base["peak"] / GIB,
                base_300 / GIB,
                ours["peak"] / GIB,
                ours["seconds"],
                f"{ours['peak'] / base['peak']:.2f}",
                f"{ours['peak'] / base_300:.2f}",
            ]
        )
    how = "max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM after clear_refs)"
    out = (
        f"\nPeak memory, GiB ({how}); engine: {engine_steps} steps; baseline: {baseline_steps} steps measured, "
        f"300 steps = measured + L-BFGS history (computed)\n"
        + table(
            [
                "size",
                f"baseline {baseline_steps} st",
                "baseline 300 st",
                "engine",
                "engine s",
                f"engine / baseline {baseline_steps} st",
                "engine / baseline 300 st",
            ],
            rows,
        )
    )
    if device.type == "cpu" and len(points) >= 2:
        out += "\n\n" + largest_fit(points, content.size, budget_gib)
    return out


def largest_fit(points: list[tuple[int, float]], image_size: tuple[int, int], budget_gib: float) -> str:
    """Least-squares line through (pixels, peak) for the engine, solved for the budget."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    fixed = my - slope * mx
    pixels = (budget_gib * GIB - fixed) / slope
    aspect = max(image_size) / min(image_size)
    long_side = int(math.sqrt(pixels * aspect))
    return (
        f"Engine peak ~ {fixed / GIB:.2f} GiB + {slope:.0f} bytes/pixel; {budget_gib:g} GiB holds "
        f"{pixels / 1e6:.1f} Mpixel = {long_side} px long side at this photo's {aspect:.2f}:1 aspect "
        f"({int(math.sqrt(pixels))} px square)"
    )


if __name__ == "__main__":
    main()
