"""A labelled sheet of results: each example pair at a grid of style strength x content strength.

It is for checking the loss balance by eye with the weights at hand. With the ImageNet weights (a Space, or
any machine that has downloaded them) the middle cell, strength 1 x 1, is the reference objective's look:
structure readable, texture of the painting. A balance that is off shows as a whole sheet that is too
photographic (style too weak) or dissolved (style too strong).

    python bench/contact_sheet.py                              # the app's examples, weights as the app resolves them
    python bench/contact_sheet.py --pairs shared --size 384    # the classic test images in ../shared/images
    python bench/contact_sheet.py --weights untrained -o sheet.png
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

from common import IMAGES, ROOT
from PIL import Image, ImageDraw, ImageFont

from stylize import Settings, load_image, transfer
from stylize.device import pick_device
from stylize.images import fit
from stylize.settings import knob

OUT = Path(__file__).resolve().parent / "out"  # git-ignored
SHARED_PAIRS = [
    ("tubingen.jpg", "starry_night.jpg"),
    ("hoovertowernight.jpg", "shipwreck.jpg"),
    ("tubingen.jpg", "picasso_selfport1907.jpg"),
]
LABEL_HEIGHT = 22


def example_pairs() -> list[tuple[Path, Path]]:
    from stylize.ui import ASSETS, EXAMPLES  # the app's own examples, one place for the list

    return [(ASSETS / photo, ASSETS / art) for photo, art in EXAMPLES]


def render(
    pairs: list[tuple[Path, Path]], style_strengths: list[float], content_strengths: list[float], settings: Settings
) -> tuple[Image.Image, str]:
    """The sheet, and the weights kind its pictures were made with. A block per pair: the photo and the style
    on the left, then a row per content strength and a column per style strength."""
    font = ImageFont.load_default(size=14)
    side = settings.size
    loaded = [(load_image(a, "photo"), load_image(b, "style"), f"{a.name} + {b.name}") for a, b in pairs]
    heights = [fit(photo.size, side)[1] + LABEL_HEIGHT for photo, _, _ in loaded]
    sheet = Image.new(
        "RGB",
        ((len(style_strengths) + 2) * side, sum(LABEL_HEIGHT + len(content_strengths) * h for h in heights)),
        "white",
    )
    draw = ImageDraw.Draw(sheet)
    kind, top = "?", 0
    for (photo, art, title), height in zip(loaded, heights, strict=True):
        draw.text((4, top + 4), title, fill="black", font=font)
        top += LABEL_HEIGHT
        for column, picture in enumerate((photo, art)):
            sheet.paste(_fitted(picture, side, height - LABEL_HEIGHT), (column * side, top))
        for content_strength in content_strengths:
            for column, style_strength in enumerate(style_strengths, start=2):
                cell_settings = replace(settings, style_strength=style_strength, content_strength=content_strength)
                final = deque(transfer(photo, art, cell_settings), maxlen=1)[0]
                kind = final.weights
                sheet.paste(final.image(), (column * side, top))
                draw.text(
                    (column * side + 4, top + height - LABEL_HEIGHT + 3),
                    f"style {style_strength:g} · content {content_strength:g}",
                    fill="black",
                    font=font,
                )
            top += height
    return sheet, kind


def _fitted(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` shrunk to fit width x height, centred on white."""
    image = image.copy()
    image.thumbnail((width, height), Image.Resampling.LANCZOS)
    box = Image.new("RGB", (width, height), "white")
    box.paste(image, ((width - image.width) // 2, (height - image.height) // 2))
    return box


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--pairs",
        choices=("examples", "shared"),
        default="examples",
        help="the app's example pairs (assets/) or the classic test images (../shared/images)",
    )
    p.add_argument("--style-strengths", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    p.add_argument("--content-strengths", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    p.add_argument("--size", type=int, default=256, help="long side of each picture (default: 256)")
    p.add_argument("--steps", type=int, default=knob("steps")["default"])
    p.add_argument("--weights", default="auto", help="auto (as the app resolves them), untrained, or a file")
    p.add_argument("--device", default="auto")
    p.add_argument("-o", "--output", type=Path, default=OUT / "contact_sheet.png")
    args = p.parse_args(argv)
    pairs = example_pairs() if args.pairs == "examples" else [(IMAGES / a, IMAGES / b) for a, b in SHARED_PAIRS]
    settings = Settings(size=args.size, steps=args.steps, weights=args.weights, device=args.device)
    started = time.perf_counter()
    sheet, kind = render(pairs, args.style_strengths, args.content_strengths, settings)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.output)
    print(
        f"wrote {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}: "
        f"{len(pairs)} pairs, weights {kind}, device {pick_device(args.device).type}, "
        f"{time.perf_counter() - started:.0f} s"
    )
    return args.output


if __name__ == "__main__":
    main()
