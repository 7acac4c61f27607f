"""Seconds per optimization step for each precision of the network, the share of a step spent outside
VGG19's forward/backward, and what the style loss costs.

Three things are timed per size and precision, interleaved in rounds so that a noisy machine hits all alike:
- bare: the engine's VGG19 forward and backward alone in that precision (no losses, no optimizer);
- baseline: one L-BFGS evaluation of the textbook method (bench/baseline.py, float32);
- engine: one step of stylize.transfer in that precision, pinned to a single scale (the schedule's start side set
  to the size for the run) so every step is at the measured size; timed from the Progress stream, so target
  set-up is excluded and preview production is included.
Outside the network = 1 - bare / engine step. The style loss table times the five layers' Wasserstein
losses with their backward on a picture's activations (float32, as the engine computes them), against
the step. On CPU a thread-count table follows. --profile prints torch.profiler's view of engine steps.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
from baseline import run_baseline, textbook_vgg
from common import (
    engine_settings,
    engine_vgg,
    load_images,
    load_pair,
    run_engine,
    start,
    sync,
    table,
)

from stylize.device import cpu_bf16, cpu_budget
from stylize.losses import StyleTarget, gaussian, style_loss
from stylize.plan import SCHEDULE, Schedule
from stylize.settings import STYLE_LAYERS


def single_scale(side: int) -> Schedule:
    """The engine's schedule with all its steps at `side` (no coarse-to-fine), for per-step timing."""
    return replace(SCHEDULE, start_side=side)


def precisions(device: torch.device) -> list[str]:
    """The precisions worth timing here: float32, bfloat16, and float16 on a GPU (too slow on CPUs to matter);
    bfloat16 on a CPU only where it runs natively (emulated, a step takes minutes)."""
    if device.type == "cuda":
        return ["fp32", "bf16", "fp16"]
    return ["fp32", "bf16"] if device.type != "cpu" or cpu_bf16() != "emulated" else ["fp32"]


def bare_seconds(vgg: torch.nn.Module, image: torch.Tensor, passes: int) -> float:
    """Mean seconds of one forward + backward through the feature extractor."""
    x = image.clone().requires_grad_(True)
    sync(image.device)
    started = time.perf_counter()
    for _ in range(passes):
        x.grad = None
        sum(f.sum() for f in vgg(x).values()).backward()
    sync(image.device)
    return (time.perf_counter() - started) / passes


def baseline_seconds(net: torch.nn.Module, content: torch.Tensor, style: torch.Tensor, steps: int) -> float:
    stamps: list[float] = []
    run_baseline(net, content, style, steps + 1, lambda t, *_: stamps.append(t))
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def engine_seconds(size: int, steps: int, device: torch.device, precision: str) -> float:
    content, style = load_images()
    run = run_engine(
        content,
        style,
        engine_settings(device, size=size, steps=steps + 1, precision=precision),
        device,
        schedule=single_scale(size),
    )
    return run.step_seconds(scale=1)


def measure(device: torch.device, sizes: list[int], steps: int, rounds: int) -> list[list[object]]:
    net = textbook_vgg(device)
    rows = []
    for size in sizes:
        content, style = load_pair(size, device)
        samples: dict[str, list[float]] = {"baseline": []}
        for _ in range(rounds):
            samples["baseline"].append(baseline_seconds(net, content, style, steps))
            for precision in precisions(device):
                samples.setdefault(f"bare {precision}", []).append(
                    bare_seconds(engine_vgg(device, precision), content, steps)
                )
                samples.setdefault(precision, []).append(engine_seconds(size, steps, device, precision))
        median = {name: statistics.median(values) for name, values in samples.items()}
        h, w = content.shape[-2:]
        for precision in precisions(device):
            bare, ours = median[f"bare {precision}"], median[precision]
            rows.append(
                [
                    f"{w}x{h}",
                    precision,
                    bare,
                    ours,
                    f"{1 - bare / ours:.1%}",
                    median["baseline"],
                    f"{ours / median['baseline']:.3f}",
                    f"{ours / median['fp32']:.2f}",
                ]
            )
    return rows


def style_loss_rows(device: torch.device, sizes: list[int], steps: int, rounds: int) -> list[list[object]]:
    """Seconds of the style loss (forward + backward, all five layers) per step, and its share of an engine step."""
    rows = []
    for size in sizes:
        content, style = load_pair(size, device)
        vgg = engine_vgg(device, "fp32")
        with torch.no_grad():
            targets = {name: StyleTarget.of(gaussian(f)) for name, f in vgg(style).items() if name in STYLE_LAYERS}
            pictures = {name: f for name, f in vgg(content).items() if name in STYLE_LAYERS}
        loss_times, step_times = [], {p: [] for p in precisions(device)}
        for _ in range(rounds):
            features = {name: f.clone().requires_grad_(True) for name, f in pictures.items()}
            sync(device)
            started = time.perf_counter()
            for _ in range(steps):
                sum(style_loss(features[name], targets[name]) for name in STYLE_LAYERS).backward()
            sync(device)
            loss_times.append((time.perf_counter() - started) / steps)
            for precision in step_times:
                step_times[precision].append(engine_seconds(size, steps, device, precision))
        seconds = statistics.median(loss_times)
        h, w = content.shape[-2:]
        rows.append(
            [f"{w}x{h}", seconds * 1000]
            + [f"{seconds / statistics.median(step_times[p]):.1%}" for p in precisions(device)]
        )
    return rows


def thread_rows(device: torch.device, size: int, passes: int) -> list[list[object]]:
    vgg = engine_vgg(device)
    content, _ = load_pair(size, device)
    budget = cpu_budget()
    counts = sorted({1, budget, 2 * budget})
    results = {}
    try:
        for _ in range(2):  # two rounds, interleaved; keep the faster
            for n in counts:
                torch.set_num_threads(n)
                results[n] = min(results.get(n, float("inf")), bare_seconds(vgg, content, passes))
    finally:
        torch.set_num_threads(budget)
    return [[n, results[n], f"{results[budget] / results[n]:.2f}"] for n in counts]


def profile(device: torch.device, size: int, steps: int) -> str:
    content, style = load_images()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run_engine(content, style, engine_settings(device, size=size, steps=steps), device, schedule=single_scale(size))
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--loss-sizes", type=int, nargs="+", default=[128, 256, 512], help="sizes for the style loss's cost")
    p.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="2 rounds of 4 steps")
    p.add_argument("--profile", action="store_true", help="also profile engine steps at the largest size")
    args, device = start(p)
    if args.quick:
        args.steps, args.rounds = 4, 2
    print(report(device, args.sizes, args.loss_sizes, args.steps, args.rounds))
    if args.profile:
        print(profile(device, max(args.sizes), args.steps))


def report(device: torch.device, sizes: list[int], loss_sizes: list[int], steps: int, rounds: int) -> str:
    out = f"\nSeconds per step (median of {rounds} rounds x {steps} steps); outside = 1 - bare / engine step\n" + table(
        [
            "size",
            "precision",
            "bare fwd+bwd s",
            "engine step s",
            "outside the network",
            "baseline fp32 s",
            "engine / baseline",
            "engine / engine fp32",
        ],
        measure(device, sizes, steps, rounds),
    )
    out += "\n\nStyle loss (5 layers, forward + backward): ms per step, and share of an engine step\n" + table(
        ["size", "style loss ms", *[f"share of a {p} step" for p in precisions(device)]],
        style_loss_rows(device, loss_sizes, steps, rounds),
    )
    if device.type == "cpu":
        out += f"\n\nCPU threads: bare forward+backward at {max(sizes)} px (auto precision)\n" + table(
            ["threads", "s", f"speed vs {cpu_budget()} threads"], thread_rows(device, max(sizes), max(2, steps // 2))
        )
    return out


if __name__ == "__main__":
    main()
