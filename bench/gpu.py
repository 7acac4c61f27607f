"""Everything a GPU run needs in one command under 5 minutes (run it as bench/gpu.sh; --quick: small enough for a CPU).

1. Seconds per step by precision at 512, 1024 and 2048 px: the bare forward+backward and an engine step
   (bench/step_time.py's), and the share of the step outside the network.
2. tr(M^½) by eigendecomposition (losses._TraceSqrt) against Newton-Schulz (losses._TraceSqrtNewtonSchulz) on the
   matrices the style loss takes it of at 512 px (photo against style, relu1_1..relu5_1): ms per call forward and
   backward, the two values' and gradients' relative difference, and which one losses.TRACE_SQRT uses here.
3. The device's three presets end to end: time, first preview, cost in bare steps (seconds / one bare step at
   512 px timed beside the run, common.bare_step_seconds) and the objective (common.score).
4. A 4096 px picture with few steps in a fresh process (bench/memory.py's measure): time and peak memory.
5. The standard preset's cost in bare steps: the figure issue 18's bar is set in.
"""

from __future__ import annotations

import argparse
import time

import memory
import torch
from common import (
    WEIGHTS,
    bare_step_seconds,
    engine_settings,
    engine_vgg,
    load_images,
    load_pair,
    run_engine,
    score,
    start,
    sync,
    table,
)
from step_time import bare_seconds, engine_seconds, precisions

from stylize.losses import TRACE_SQRT, StyleTarget, _TraceSqrt, _TraceSqrtNewtonSchulz, gaussian
from stylize.settings import PRESET_NAMES, PRESETS, STYLE_LAYERS

GIB = 2**30
# --quick: the same sections at sizes and step counts a 2-core CPU gets through in a minute or two.
QUICK_PRESETS = {
    "draft": {"size": 64, "steps": 3},
    "standard": {"size": 96, "steps": 4},
    "fine": {"size": 128, "steps": 5},
}


def step_rows(device: torch.device, sizes: list[int], steps: int) -> list[list[object]]:
    rows = []
    for size in sizes:
        content, _ = load_pair(size, device)
        for precision in precisions(device):
            vgg = engine_vgg(device, precision)
            bare_seconds(vgg, content, 1)  # kernels chosen and memory pooled before timing
            bare, step = bare_seconds(vgg, content, steps), engine_seconds(size, steps, device, precision)
            h, w = content.shape[-2:]
            rows.append([f"{w}x{h}", precision, bare * 1000, step * 1000, f"{1 - bare / step:.1%}"])
    return rows


def style_matrices(device: torch.device, size: int) -> dict[str, torch.Tensor]:
    """The matrix each style layer takes tr(M^½) of, Σₛ^½·Σ·Σₛ^½, as style_loss forms it (its C×C form) for the
    photo (the picture at the first step) against the style, float32 features as the loss sees them."""
    content, style = load_pair(size, device)
    vgg = engine_vgg(device, "fp32")
    with torch.no_grad():
        photo, painting = vgg(content), vgg(style)
    matrices = {}
    for name in STYLE_LAYERS:
        target = StyleTarget.of(gaussian(painting[name]))
        matrices[name] = target.cov_sqrt @ gaussian(photo[name]).cov @ target.cov_sqrt
    return matrices


def timed_trace_sqrt(
    method: type[torch.autograd.Function], m: torch.Tensor, calls: int
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(seconds per call forward+backward, the value, its gradient), one untimed call first (library loading)."""
    x = m.clone().requires_grad_(True)
    method.apply(x).backward()
    sync(m.device)
    started = time.perf_counter()
    for _ in range(calls):
        x.grad = None
        value = method.apply(x)
        value.backward()
    sync(m.device)
    return (time.perf_counter() - started) / calls, value.detach(), x.grad


def trace_sqrt_rows(device: torch.device, size: int, calls: int) -> list[list[object]]:
    rows, totals = [], [0.0, 0.0]
    for name, m in style_matrices(device, size).items():
        eigh_s, eigh_value, eigh_grad = timed_trace_sqrt(_TraceSqrt, m, calls)
        ns_s, ns_value, ns_grad = timed_trace_sqrt(_TraceSqrtNewtonSchulz, m, calls)
        totals[0], totals[1] = totals[0] + eigh_s, totals[1] + ns_s
        rows.append(
            [
                name,
                m.shape[0],
                eigh_s * 1000,
                ns_s * 1000,
                f"{eigh_s / ns_s:.2f}",
                eigh_value.item(),
                f"{(ns_value / eigh_value - 1).item():+.1e}",
                f"{((ns_grad - eigh_grad).norm() / eigh_grad.norm()).item():.1e}",
            ]
        )
    rows.append(["all five", "", totals[0] * 1000, totals[1] * 1000, f"{totals[0] / totals[1]:.2f}", "", "", ""])
    return rows


def preset_rows(device: torch.device, presets: dict[str, dict[str, int]], unit: int) -> list[list[object]]:
    content, style = load_images()
    rows = []
    for name in PRESET_NAMES:
        settings = engine_settings(device, **presets[name])
        bare = bare_step_seconds(device, unit)  # timed next to each run: the machine's speed drifts
        run = run_engine(content, style, settings, device)
        final = run.records[-1]
        rows.append(
            [
                name,
                settings.size,
                settings.steps,
                final.scales,
                run.first_preview,
                f"{run.first_preview / bare:.2f}",
                run.final,
                bare,
                f"{run.final / bare:.1f}",
                score(final.pixels, settings, content, style),
            ]
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes and tiny presets: a CPU smoke test")
    args, device = start(p)
    kind = "cpu" if device.type == "cpu" else "gpu"
    if args.quick:
        sizes, steps, matrix_size, unit, big, big_steps = [64, 128], 2, 128, 128, 192, 3
    else:
        sizes, steps, matrix_size, unit, big, big_steps = [512, 1024, 2048], 8, 512, 512, 4096, 20
    presets = QUICK_PRESETS if args.quick else PRESETS[kind]

    print(
        f"\n1. Per step, ms by precision (mean of {steps} steps); outside = 1 - bare / engine step\n"
        + table(
            ["size", "precision", "bare fwd+bwd ms", "engine step ms", "outside the network"],
            step_rows(device, sizes, steps),
        ),
        flush=True,
    )

    chosen = TRACE_SQRT.get(device.type, _TraceSqrt).__name__
    print(
        f"\n2. tr(M^½) at {matrix_size} px, photo against style: eigh (_TraceSqrt, float64) against Newton-Schulz "
        f"(_TraceSqrtNewtonSchulz, {_TraceSqrtNewtonSchulz.ITERATIONS} iterations); ms per call forward+backward, "
        f"synchronised; differences relative to eigh\n"
        + table(
            [
                "layer",
                "channels",
                "eigh ms",
                "Newton-Schulz ms",
                "eigh / NS",
                "tr(M^½) eigh",
                "value diff",
                "gradient diff",
            ],
            trace_sqrt_rows(device, matrix_size, 3 if args.quick else 10),
        )
        + f"\nlosses.TRACE_SQRT picks {chosen} on {device.type}",
        flush=True,
    )

    rows = preset_rows(device, presets, unit)
    print(
        f"\n3. Presets end to end ({'tiny stand-ins for the ' if args.quick else ''}{kind} presets); bare steps = "
        f"seconds / one bare forward+backward at {unit} px timed beside the run; objective: the final picture "
        f"scored in float32 (weights: {WEIGHTS})\n"
        + table(
            [
                "preset",
                "size",
                "steps",
                "scales",
                "first preview s",
                "first / bare step",
                "final s",
                "bare step s",
                "bare steps",
                "objective",
            ],
            rows,
        ),
        flush=True,
    )

    result = memory.measure("engine", big, big_steps, device.type, tile=-1)
    how = "max_memory_allocated" if device.type == "cuda" else "peak RSS of the process (VmHWM after clear_refs)"
    print(
        f"\n4. A {big} px picture, {big_steps} steps, in a fresh process (bench/memory.py; tiles only where it "
        f"would not fit): {result['seconds']:.1f} s, peak {result['peak'] / GIB:.2f} GiB ({how})"
        + (f"; failed: {result['error']}" if "error" in result else ""),
        flush=True,
    )

    standard = next(row for row in rows if row[0] == "standard")
    print(
        f"\n5. Bar: the standard preset ({standard[1]} px, {standard[2]} steps) took {standard[6]:.1f} s = "
        f"{standard[8]} bare steps at {unit} px (issue 18's bar on a 2-core CPU: 512 px in at most 75)"
    )


if __name__ == "__main__":
    main()
