"""Each quality preset's cost in bare steps, its first preview, and its picture against the presets as they were.

The unit of cost is the bare step: one forward and backward of the engine's network (auto precision,
channels-last) at 512 px and nothing else, timed in the same process (common.bare_step_seconds), so a preset's
cost reads the same on a fast and a slow machine. Each preset runs twice on the same inputs, as it is now and as
it was before the schedule was re-measured on trained features (BEFORE: the steps, optimizer and schedule of that time),
and both final pictures are scored with the engine's objective in float32 (common.score). Weights are loaded
first and timed on their own. "standard" runs once more with a consumer that does what the UI does with every
preview (to PIL, then PNG-encode), which shows what preview encoding costs on the optimizer's thread.
Pictures side by side, before and now: bench/out/presets_<preset>.png.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import torch
from common import (
    WEIGHTS,
    add_image_arguments,
    bare_step_seconds,
    load_engine_weights,
    load_images,
    machine_header,
    run_engine,
    score,
    table,
    warm_up,
)
from precision import side_by_side

from stylize import Progress, Settings
from stylize.device import pick_device
from stylize.plan import SCHEDULE, Schedule
from stylize.settings import PRESET_NAMES

OUT = Path(__file__).resolve().parent / "out"  # git-ignored
UNIT_SIZE = 512  # the bare step's size
# The presets before the schedule was re-measured with trained features: (steps per preset, optimizer, schedule).
BEFORE = (
    {"cpu": {"draft": 120, "standard": 250, "fine": 400}, "gpu": {"draft": 250, "standard": 400, "fine": 600}},
    "adam",
    Schedule(start_side=128, step_decay=0.9, final_boost=1.0, learning_rate=0.02, average_decay=0.8),
)


def ui_consumer(progress: Progress) -> None:
    """What the web UI does with a preview: a PIL image, encoded for the browser."""
    progress.image().save(io.BytesIO(), format="PNG")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_image_arguments(p)
    p.add_argument("--presets", nargs="+", default=list(PRESET_NAMES), choices=PRESET_NAMES)
    p.add_argument("--quick", action="store_true", help="draft and standard only")
    p.add_argument("--no-before", action="store_true", help="skip the runs as the presets were")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    if args.quick:
        args.presets = ["draft", "standard"]
    device = pick_device(args.device)
    print(machine_header(device))
    print(report(device, args.presets, before=not args.no_before))


def report(device: torch.device, presets: list[str], before: bool = True) -> str:
    kind = "cpu" if device.type == "cpu" else "gpu"
    weights_seconds = load_engine_weights(device)
    content, style = load_images()
    warm_up(device)
    rows, standard_ui = [], None
    for name in presets:
        runs = {"now": (Settings.from_preset(name, kind, weights=WEIGHTS, device=device.type), SCHEDULE)}
        if before:
            runs["before"] = (
                Settings.from_preset(
                    name, kind, steps=BEFORE[0][kind][name], optimizer=BEFORE[1], weights=WEIGHTS, device=device.type
                ),
                BEFORE[2],
            )
        pictures, costs, scores = [], {}, {}
        for when, (settings, schedule) in runs.items():
            bare = bare_step_seconds(device, UNIT_SIZE)  # timed next to each run: the machine's speed drifts
            run = run_engine(content, style, settings, device, schedule=schedule)
            final = run.records[-1]
            costs[when], scores[when] = run.final / bare, score(final.pixels, settings, content, style)
            pictures.append(final.image())
            rows.append(
                [
                    f"{name} ({when})",
                    settings.size,
                    settings.steps,
                    final.scales,
                    len(run.records),
                    run.first_preview,
                    f"{run.first_preview / bare:.2f}",
                    run.final,
                    bare,
                    f"{costs[when]:.1f}",
                    scores[when],
                    f"{scores[when] / scores['now']:.3f}" if when != "now" else "1.000",
                ]
            )
            if name == "standard" and when == "now":
                ui = run_engine(content, style, settings, device, consumer=ui_consumer)
                standard_ui = (run.final, ui)
        if before:
            rows.append(
                [
                    f"{name}: now / before",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    f"{costs['now'] / costs['before']:.2f}",
                    "",
                    f"{scores['now'] / scores['before']:.3f}",
                ]
            )
            OUT.mkdir(exist_ok=True)
            side_by_side(pictures).save(OUT / f"presets_{name}.png")
    out = (
        f"\nPresets on {kind} (weights load, cold: {weights_seconds:.2f} s, not counted below); cost in bare "
        f"steps = seconds / one bare forward+backward at {UNIT_SIZE} px timed beside the run; objective: the "
        f"final picture scored in float32\n"
        + table(
            [
                "preset",
                "size",
                "steps",
                "scales",
                "previews",
                "first preview s",
                "first / bare step",
                "final s",
                "bare step s",
                "bare steps",
                "objective",
                "objective / now",
            ],
            rows,
        )
    )
    if before:
        out += f"\npictures (now, before): {OUT}/presets_<preset>.png"
    if standard_ui is not None:
        plain, ui = standard_ui
        out += (
            f"\n\n'standard' with a UI-like consumer (PIL + PNG per preview, {len(ui.records)} previews): "
            f"final {ui.final:.1f} s vs {plain:.1f} s with a no-op consumer ({ui.final / plain - 1:+.1%})"
        )
    return out


if __name__ == "__main__":
    main()
