"""Seconds per optimization step, and the share of a step spent outside VGG's forward/backward.

Three things are timed, interleaved in rounds so that a noisy machine hits all alike:
- bare: the engine's VGG19 forward and backward alone (no losses, no optimizer);
- baseline: one L-BFGS evaluation of the textbook method (bench/baseline.py);
- engine: one step of stylize.transfer, pinned to a single scale (START_SIDE set to the
  size for the run) so every step is at the measured size; timed from the Progress stream,
  so target set-up is excluded and preview production is included.
Overhead = step / bare - 1. On CUDA a precision table (FP32, TF32, BF16/FP16 autocast) is
added; on CPU a thread-count table. --profile prints torch.profiler's view of engine steps.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from baseline import BaselineLoss, run_baseline, textbook_vgg
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

from stylize import engine
from stylize.engine import cpu_budget


@contextmanager
def single_scale(side: int) -> Iterator[None]:
    """Make transfer() run all its steps at `side` (no coarse-to-fine), for per-step timing."""
    saved = engine.START_SIDE
    engine.START_SIDE = side
    try:
        yield
    finally:
        engine.START_SIDE = saved


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


def engine_seconds(size: int, steps: int, device: torch.device) -> float:
    content, style = load_images()
    with single_scale(size):
        run = run_engine(content, style, engine_settings(device, size=size, steps=steps + 1), device)
    return run.step_seconds(scale=1)


def measure(device: torch.device, sizes: list[int], steps: int, rounds: int) -> list[list[object]]:
    vgg = engine_vgg(device)
    net = textbook_vgg(device)
    rows = []
    for size in sizes:
        content, style = load_pair(size, device)
        samples: dict[str, list[float]] = {"bare": [], "baseline": [], "engine": []}
        for _ in range(rounds):
            samples["bare"].append(bare_seconds(vgg, content, steps))
            samples["baseline"].append(baseline_seconds(net, content, style, steps))
            samples["engine"].append(engine_seconds(size, steps, device))
        bare, base, ours = (statistics.median(samples[k]) for k in ("bare", "baseline", "engine"))
        h, w = content.shape[-2:]
        rows.append([f"{w}x{h}", bare, base, f"{base / bare - 1:+.1%}", ours, f"{ours / bare - 1:+.1%}",
                     f"{ours / base:.3f}"])
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


def precision_rows(device: torch.device, size: int, passes: int) -> list[list[object]]:
    """CUDA only: bare VGG speed and the baseline loss/gradient error under FP32, TF32 and autocast."""
    net = textbook_vgg(device)
    content, style = load_pair(size, device)
    loss = BaselineLoss(net, content, style)
    image = (0.5 * content + 0.5 * style[..., : content.shape[-2], : content.shape[-1]]).contiguous()
    modes = {"fp32": (False, None), "tf32": (True, None), "bf16 autocast": (True, torch.bfloat16),
             "fp16 autocast": (True, torch.float16)}
    reference = None
    rows = []
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for name, (tf32, dtype) in modes.items():
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                seconds = bare_seconds(net_features(net), image, passes)
                x = image.clone().requires_grad_(True)
                value = loss(x)
                value.backward()
            grad = x.grad.flatten().float()
            if reference is None:
                reference = (value.item(), grad)
            cosine = torch.nn.functional.cosine_similarity(grad, reference[1], dim=0).item()
            rows.append([name, seconds * 1000, f"{abs(value.item() / reference[0] - 1):.1e}", f"{cosine:.5f}"])
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    return rows


def net_features(net: torch.nn.Module) -> torch.nn.Module:
    class Wrapped(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"out": net(x)}
    return Wrapped()


def profile(device: torch.device, size: int, steps: int) -> str:
    content, style = load_images()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with single_scale(size), torch.profiler.profile(activities=activities) as prof:
        run_engine(content, style, engine_settings(device, size=size, steps=steps), device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="2 rounds of 4 steps")
    p.add_argument("--profile", action="store_true", help="also profile engine steps at the largest size")
    args, device = start(p)
    if args.quick:
        args.steps, args.rounds = 4, 2
    print(report(device, args.sizes, args.steps, args.rounds))
    if args.profile:
        print(profile(device, max(args.sizes), args.steps))


def report(device: torch.device, sizes: list[int], steps: int, rounds: int) -> str:
    rows = measure(device, sizes, steps, rounds)
    out = (f"\nSeconds per step (median of {rounds} rounds x {steps} steps); overhead = step / bare - 1\n"
           + table(["size", "bare fwd+bwd s", "baseline s", "baseline overhead", "engine s", "engine overhead",
                    "engine / baseline"], rows))
    if device.type == "cpu":
        out += (f"\n\nCPU threads: bare forward+backward at {max(sizes)} px\n"
                + table(["threads", "s", f"speed vs {cpu_budget()} threads"],
                        thread_rows(device, max(sizes), max(2, steps // 2))))
    if device.type == "cuda":
        out += (f"\n\nPrecision at {max(sizes)} px (bare ms; baseline loss and gradient against FP32)\n"
                + table(["mode", "bare fwd+bwd ms", "loss rel. error", "gradient cosine"],
                        precision_rows(device, max(sizes), steps)))
    return out


if __name__ == "__main__":
    main()
