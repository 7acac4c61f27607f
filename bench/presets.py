"""Time to the first preview and to the final image for each quality preset.

Weights are loaded first and timed on their own ("weights load": building the untrained
VGG19 here; reading 548 MB of ImageNet weights elsewhere), so preview times are counted from
the moment a transfer is asked for with the weights in memory, as the issue's target reads.
Each preset runs with a consumer that does nothing; "standard" runs once more with a
consumer that does what a UI does with every preview (to PIL, then PNG-encode), which
shows what preview encoding costs while it sits on the optimizer's thread.
The baseline column is the textbook method at the preset's size and step count, estimated
from a few timed L-BFGS evaluations (set-up + steps x seconds per step).
"""

from __future__ import annotations

import argparse
import io
import time

import common
import torch
from baseline import run_baseline, textbook_vgg
from common import add_image_arguments, load_engine_weights, load_images, load_pair, machine_header, run_engine, table

from stylize import Progress, Settings
from stylize.engine import pick_device
from stylize.settings import PRESET_NAMES


def ui_consumer(progress: Progress) -> None:
    """What the web UI does with a preview: a PIL image, encoded for the browser."""
    progress.image().save(io.BytesIO(), format="PNG")


def baseline_estimate(net: torch.nn.Module, size: int, steps: int, device: torch.device,
                      timed: int) -> tuple[float, float]:
    """(seconds to the first iterate, estimated seconds for `steps`) of the textbook method at `size`."""
    content, style = load_pair(size, device)
    stamps: list[float] = []
    run_baseline(net, content, style, timed + 1, lambda t, *_: stamps.append(t))
    per_step = (stamps[-1] - stamps[0]) / timed
    return stamps[0], stamps[0] + (steps - 1) * per_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_image_arguments(p)
    p.add_argument("--presets", nargs="+", default=list(PRESET_NAMES), choices=PRESET_NAMES)
    p.add_argument("--baseline-steps", type=int, default=3, help="timed baseline evaluations per estimate")
    p.add_argument("--quick", action="store_true", help="draft and standard only")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    if args.quick:
        args.presets = ["draft", "standard"]
    device = pick_device(args.device)
    print(machine_header(device))
    print(report(device, args.presets, args.baseline_steps))


def report(device: torch.device, presets: list[str], baseline_steps: int) -> str:
    kind = "cpu" if device.type == "cpu" else "gpu"
    weights_seconds = load_engine_weights(device)
    content, style = load_images()
    common.warm_up(device)
    net = textbook_vgg(device)
    rows = []
    standard_ui = None
    for name in presets:
        settings = Settings.from_preset(name, kind, weights="untrained", device=device.type)
        run = run_engine(content, style, settings, device)
        started = time.perf_counter()
        ui_consumer(run.records[0])
        shown = run.first_preview + time.perf_counter() - started
        first, total = baseline_estimate(net, settings.size, settings.steps, device, baseline_steps)
        rows.append([name, settings.size, settings.steps, run.records[-1].scales, len(run.records),
                     run.first_preview, shown, run.final, first, total, f"{total / run.final:.1f}x"])
        if name == "standard":
            standard_ui = (run.final, run_engine(content, style, settings, device, consumer=ui_consumer))
    out = (f"\nPresets on {kind} (weights load, cold: {weights_seconds:.2f} s, not counted below)\n"
           + table(["preset", "size", "steps", "scales", "previews", "first preview s", "first shown s",
                    "final s", "baseline first s", "baseline final s (est.)", "baseline / engine"], rows))
    if standard_ui is not None:
        bare, ui = standard_ui
        out += (f"\n\n'standard' with a UI-like consumer (PIL + PNG per preview, {len(ui.records)} previews): "
                f"final {ui.final:.1f} s vs {bare:.1f} s with a no-op consumer ({ui.final / bare - 1:+.1%})")
    return out


if __name__ == "__main__":
    main()
