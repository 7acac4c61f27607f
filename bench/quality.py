"""Time to reach the baseline's final loss, measured with the baseline's loss function (float32).

The baseline runs its steps at full size; its final (clamped) image's loss is the bar.
Every few baseline iterates are kept and scored clamped too (the unclamped iterates of
plain L-BFGS leave [0, 1], and their loss is not the loss of any picture), so the
baseline is credited with the first kept iterate that is already at the bar.
Then the engine runs with its defaults (and any --engine variants); every Progress image
it yields is time-stamped, kept, and scored with the baseline's loss at full size after
the run, outside the timed region. Smaller-scale previews are upsampled to full size
first: they are pictures the user is shown, scored as such.
Three clocks: wall seconds, process CPU seconds (less hurt by other people's jobs on a
shared machine) and work in full-size step equivalents (no clock at all: each step
counts its pixels over the full size's; set-up and overhead not included).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from baseline import BaselineLoss, run_baseline, textbook_vgg
from common import (
    EngineRun,
    engine_settings,
    load_images,
    load_pair,
    run_engine,
    start,
    table,
)

from stylize import Settings
from stylize.images import resize
from stylize.plan import SCHEDULE, Schedule, plan, work_done

OUT = Path(__file__).resolve().parent / "out"  # git-ignored
Point = tuple[int, float, float, float, float]  # step, work, wall s, CPU s, loss


@dataclass
class Result:
    name: str
    steps: int  # steps run
    steps_to_bar: int  # -1 when the bar was not reached
    work_to_bar: float  # full-size step equivalents; nan when not reached
    seconds_to_bar: float  # wall seconds; nan when not reached
    cpu_to_bar: float  # process CPU seconds; nan when not reached
    final_seconds: float
    final_loss: float
    final_cpu: float = math.nan


def first_at_bar(name: str, points: list[Point], bar: float) -> Result:
    """`points` end with the final image's."""
    hit = next((p for p in points if p[4] <= bar), None)
    step, _, seconds, cpu, loss = points[-1]
    if hit is None:
        return Result(name, step, -1, math.nan, math.nan, math.nan, seconds, loss, cpu)
    return Result(name, step, hit[0], hit[1], hit[2], hit[3], seconds, loss, cpu)


def run_baseline_scored(
    net: torch.nn.Module, content: torch.Tensor, style: torch.Tensor, steps: int, loss: BaselineLoss, every: int
) -> tuple[Result, list[Point]]:
    """The baseline, every `every`-th iterate kept and, after the run, scored clamped (as a user gets it)."""
    kept: list[tuple[int, float, float, torch.Tensor | None]] = []
    cpu_started = time.process_time()

    def keep(seconds: float, _: float, x: torch.Tensor) -> None:
        n = len(kept) + 1
        kept.append((n, seconds, time.process_time() - cpu_started, x.clone() if n % every == 0 else None))

    image = run_baseline(net, content, style, steps, keep)
    bar = loss.value(image)
    points = [(n, float(n), t, c, loss.value(x)) for n, t, c, x in kept if x is not None]
    n, t, c, _ = kept[-1]
    points.append((n, float(n), t, c, bar))
    return first_at_bar(f"baseline, {n} steps", points, bar), points


def score_engine(
    name: str,
    run: EngineRun,
    settings: Settings,
    schedule: Schedule,
    image_size: tuple[int, int],
    loss: BaselineLoss,
    full: tuple[int, int],
    bar: float,
) -> tuple[Result, list[Point]]:
    """Score every Progress image of a run made with `schedule` (the scales depend on it)."""
    # In full-size step equivalents: a step at a scale costs that scale's pixels over the full size's.
    work = [pixels / (full[0] * full[1]) for pixels in work_done(plan(image_size, settings, schedule))]
    points = [
        (p.step, work[p.step - 1], t, c, loss.value(resize(p.pixels, full)))
        for p, t, c in zip(run.records, run.times, run.cpu_times, strict=True)
    ]
    return first_at_bar(name, points, bar), points


def measure(
    device: torch.device,
    size: int,
    baseline_steps: int,
    variants: list[str],
    *,
    reuse: bool = False,
    curve: bool = False,
    every: int = 3,
) -> tuple[list[Result], float]:
    content_image, style_image = load_images()
    content, style = load_pair(size, device)
    net = textbook_vgg(device)
    loss = BaselineLoss(net, content, style)
    saved = OUT / f"baseline_{device.type}_{size}_{baseline_steps}.json"
    if reuse and saved.exists():
        base = Result(**json.loads(saved.read_text()))
        base.name += " (reused)"
    else:
        base, points = run_baseline_scored(net, content, style, baseline_steps, loss, every)
        if curve:
            print_curve(f"baseline, every {every}th iterate clamped", points, base.final_loss)
        OUT.mkdir(exist_ok=True)
        saved.write_text(json.dumps(asdict(base)))
    results, bar = [base], base.final_loss

    full = (content.shape[-1], content.shape[-2])
    for variant in variants:
        overrides, schedule = parse_variant(variant)
        settings = engine_settings(device, **{"size": size, **overrides})
        run = run_engine(content_image, style_image, settings, device, schedule=schedule)
        result, points = score_engine(f"engine {variant}", run, settings, schedule, content_image.size, loss, full, bar)
        results.append(result)
        print(
            f"{result.name}: {result.steps_to_bar} steps, {result.work_to_bar:.1f} full-size steps, "
            f"{result.seconds_to_bar:.1f} s to the bar; final {result.final_seconds:.1f} s, "
            f"loss / bar {result.final_loss / bar:.3f}",
            flush=True,
        )
        if curve:
            print_curve(result.name, points, bar)
    return results, bar


def print_curve(name: str, points: list[Point], bar: float) -> None:
    print(f"\n{name}: loss / bar along the run")
    print(
        table(
            ["step", "full-size steps", "s", "loss / bar"],
            [[n, w, t, v / bar] for n, w, t, _, v in points[:: max(1, len(points) // 25)] + points[-1:]],
        ),
        flush=True,
    )


def parse_variant(text: str) -> tuple[dict[str, object], Schedule]:
    """'name=steps:400,optimizer:adam,step_decay:0.5' -> (Settings overrides, the engine's schedule with the
    Schedule fields named)."""
    settings: dict[str, object] = {}
    schedule: dict[str, float] = {}
    _, _, spec = text.partition("=")
    for item in filter(None, spec.split(",")):
        key, value = item.split(":")
        if key in {f.name for f in fields(Schedule)}:
            schedule[key] = float(value) if "." in value or "e" in value else int(value)
        elif key in ("optimizer", "init", "preserve_colors", "precision"):
            settings[key] = value
        else:
            settings[key] = int(value) if key in ("steps", "size", "seed") else float(value)
    return settings, replace(SCHEDULE, **schedule)


def report(results: list[Result], bar: float, size: int, baseline_steps: int) -> str:
    base = results[0]

    def ratio(a: float, b: float) -> str:
        return "not reached" if math.isnan(b) else f"{a / b:.2f}x"

    rows = [
        [
            r.name,
            r.steps,
            r.steps_to_bar if r.steps_to_bar >= 0 else "-",
            r.work_to_bar,
            r.seconds_to_bar,
            r.cpu_to_bar,
            r.final_seconds,
            r.final_loss / bar,
            ratio(base.final_seconds, r.seconds_to_bar),
            ratio(base.final_cpu, r.cpu_to_bar),
            ratio(base.steps, r.work_to_bar),
            ratio(base.work_to_bar, r.work_to_bar),
        ]
        for r in results
    ]
    return (
        f"\nTime to the baseline's final loss ({baseline_steps} steps at {size} px, final image clamped; "
        f"bar = {bar:.5f})\n"
        f"speed-up = baseline's time to its final image / engine's time to the bar, in wall s, CPU s and "
        f"full-size step equivalents (work); last column: work against the baseline's earliest kept "
        f"iterate that already scores at the bar\n"
        + table(
            [
                "run",
                "steps",
                "steps to bar",
                "full-size steps to bar",
                "s to bar",
                "CPU s to bar",
                "s total",
                "final loss / bar",
                "speed-up wall",
                "speed-up CPU",
                "speed-up work",
                "vs earliest (work)",
            ],
            rows,
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--baseline-steps", type=int, default=300)
    p.add_argument(
        "--engine",
        nargs="*",
        default=["default"],
        metavar="NAME=K:V,...",
        help="engine runs: 'default', or NAME=KEY:VALUE,... with Settings fields "
        "(adam=optimizer:adam) or Schedule fields (d5=step_decay:0.5)",
    )
    p.add_argument("--quick", action="store_true", help="256 px, 100 baseline steps")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="take the baseline's bar and times from bench/out/ if an earlier run saved them "
        "(for comparing engine variants; ratios then cross processes)",
    )
    p.add_argument("--every", type=int, default=3, help="score every N-th baseline iterate")
    p.add_argument("--curve", action="store_true", help="print each engine run's loss along the run")
    args, device = start(p)
    if args.quick:
        args.size, args.baseline_steps = 256, 100
    results, bar = measure(
        device, args.size, args.baseline_steps, args.engine, reuse=args.reuse, curve=args.curve, every=args.every
    )
    print(report(results, bar, args.size, args.baseline_steps))


if __name__ == "__main__":
    main()
