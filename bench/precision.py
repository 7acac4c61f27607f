"""A preset's run in each precision of the network: its time against float32's, its final picture scored in
float32 (the baseline's objective, bench/baseline.py) against float32's, and the pictures side by side
(bench/out/precision.png). Step times per precision and size are in bench/step_time.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from baseline import BaselineLoss, textbook_vgg
from common import engine_settings, load_images, run_engine, start, table
from PIL import Image
from step_time import precisions

from stylize import Settings
from stylize.images import fit, to_tensor
from stylize.settings import PRESET_NAMES

OUT = Path(__file__).resolve().parent / "out"  # git-ignored


def report(device: torch.device, preset: str, rounds: int) -> str:
    content_image, style_image = load_images()
    kind = "cpu" if device.type == "cpu" else "gpu"
    preset_settings = Settings.from_preset(preset, kind)
    size, steps = preset_settings.size, preset_settings.steps
    full = fit(content_image.size, size)
    loss = BaselineLoss(
        textbook_vgg(device),
        to_tensor(content_image, full).to(device),
        to_tensor(style_image, fit(style_image.size, size)).to(device),
    )
    seconds: dict[str, float] = {}
    scores: dict[str, float] = {}
    pictures: dict[str, Image.Image] = {}
    for _ in range(rounds):  # interleaved, the fastest kept: a shared machine's noise only ever adds
        for precision in precisions(device):
            run = run_engine(
                content_image, style_image, engine_settings(device, size=size, steps=steps, precision=precision), device
            )
            seconds[precision] = min(seconds.get(precision, float("inf")), run.final)
            scores[precision] = loss.value(run.records[-1].pixels)  # the same in every round: same pixels
            pictures[precision] = run.records[-1].image()
    rows = [
        [
            precision,
            seconds[precision],
            f"{seconds[precision] / seconds['fp32']:.2f}",
            scores[precision],
            f"{scores[precision] / scores['fp32'] - 1:+.2%}",
        ]
        for precision in seconds
    ]
    sheet = OUT / "precision.png"
    OUT.mkdir(exist_ok=True)
    side_by_side(list(pictures.values())).save(sheet)
    return (
        f"\n'{preset}' preset on {kind} ({size} px, {steps} steps) per precision; fastest of {rounds} rounds; "
        f"final picture scored in float32\n"
        + table(["precision", "s", "time / fp32", "final loss (fp32)", "loss vs fp32"], rows)
        + f"\nsheet ({', '.join(pictures)}): {sheet}"
    )


def side_by_side(pictures: list[Image.Image]) -> Image.Image:
    sheet = Image.new("RGB", (sum(p.width for p in pictures) + 8 * (len(pictures) - 1), pictures[0].height), "white")
    x = 0
    for picture in pictures:
        sheet.paste(picture, (x, 0))
        x += picture.width + 8
    return sheet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=PRESET_NAMES, default="standard")
    p.add_argument("--rounds", type=int, default=2)
    args, device = start(p)
    print(report(device, args.preset, args.rounds))


if __name__ == "__main__":
    main()
