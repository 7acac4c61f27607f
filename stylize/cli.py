"""`python -m stylize CONTENT STYLE [STYLE ...] -o OUT.png`: stylize from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import replace
from pathlib import Path, PurePath

from .decoding import ImageError, LimitError  # Pillow and numpy only: no torch before the arguments hold
from .settings import INITS, PRESET_NAMES, PRESETS, InputError, Settings, SettingsError, brief, format_number, knob

# CLI flag -> Settings field, for the flags that map one to one.
FLAGS = {
    "size": "size",
    "steps": "steps",
    "style_strength": "style_strength",
    "content_strength": "content_strength",
    "tv": "smoothing",
    "style_scale": "style_scale",
    "style_weights": "style_weights",
    "preserve_colors": "preserve_colors",
    "optimizer": "optimizer",
    "seed": "seed",
    "weights": "weights",
    "device": "device",
    "precision": "precision",
    "tile_size": "tile_size",
    "temporal_weight": "temporal_weight",
    "later_frames": "later_frames",
}


def program() -> str:
    """How the user called this: `stylize`, the console command `pip install .` makes, or `python -m stylize`."""
    return "stylize" if Path(sys.argv[0]).name == "stylize" else "python -m stylize"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=program(),
        description="Repaint a photo in the style of one or more artworks (neural style transfer on VGG19).",
    )
    p.add_argument("content", nargs="?", help="the photo to repaint, or a video clip (MP4, WebM, MOV)")
    p.add_argument("styles", nargs="*", metavar="style", help="one or more style images")
    p.add_argument("-o", "--output", help="output PNG, or MP4 for a clip (default: out.png, out.mp4)")
    p.add_argument(
        "--from",
        dest="from_png",
        metavar="PNG",
        help="repeat the run recorded in a PNG this tool or the web app wrote (flags given here "
        "override it; for the web app's, give the photo and style images too)",
    )
    p.add_argument(
        "--bigger",
        action="store_true",
        help="with --from: make that PNG's picture bigger, to --size: it is the start, and only the scales above "
        "its size are made (with the steps they have in a run of --steps at --size)",
    )
    p.add_argument(
        "--preset", choices=PRESET_NAMES, help="quality preset: sets size and steps for this machine's device"
    )
    for flag, name in FLAGS.items():
        info = knob(name)
        kind = {int: int, float: float, str: str, tuple: float}[type(info["default"])]
        p.add_argument(
            "--" + flag.replace("_", "-"),
            type=kind,
            choices=info["choices"],
            nargs="+" if isinstance(info["default"], tuple) else None,
            help=f"{info['help']} ({_range(info)}default: {_show(info['default'])})",
        )
    p.add_argument(
        "--mask", metavar="PATH", help="greyscale image over the photo: white = full style, black = keep the photo"
    )
    p.add_argument(
        "--init",
        metavar="{content,noise,PATH}",
        default=None,
        help="start from the photo (default), noise, or an image such as a previous result",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)  # before torch is imported: a usage error takes no seconds
    try:
        run(args)
    except LimitError as error:  # the limits are an upload's; here the files are the user's own
        print(f"error: {error} Or raise the limit: {error.setting}=... in the environment.", file=sys.stderr)
        return 2
    except (InputError, ImageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def run(args: argparse.Namespace) -> None:
    if args.bigger and not (args.from_png and args.size):
        raise SettingsError(
            f"--bigger makes a result bigger: give it with --from and the new --size, e.g. {program()} PHOTO STYLE "
            "--from result.png --bigger --size 2048"
        )
    recorded = _recorded_run(args.from_png) if args.from_png else {}
    # Only the files named here are read: a PNG given to --from names files, at most, as a hint.
    content_path, style_paths, mask_path = args.content, args.styles, args.mask
    if recorded and not (content_path and style_paths):
        raise SettingsError(
            f"{args.from_png} gives the settings; give the photo and style images too: {program()} "
            f"PHOTO STYLE --from {args.from_png}{_hint(recorded, 'content', 'styles')}"
        )
    if not content_path or not style_paths:
        raise SettingsError("Give a content image and at least one style image, or --from a PNG made by this tool.")
    if recorded.get("mask") and not mask_path:
        raise SettingsError(f"The recorded run used a mask{_hint(recorded, 'mask')}; give it with --mask PATH.")
    settings = recorded.get("settings", Settings())
    init = args.init or recorded.get("init") or settings.init  # the web app records no init image, only its kind
    if init not in INITS and not args.init:
        raise SettingsError(
            f"The recorded run started from an image{_hint(recorded, 'init')}; give it with --init PATH."
        )
    if args.preset:
        from .device import pick_device

        device_kind = "cpu" if pick_device(args.device or settings.device).type == "cpu" else "gpu"
        settings = Settings.from_preset(
            args.preset, device_kind, **{k: v for k, v in vars(settings).items() if k not in ("size", "steps")}
        )
    overrides = {name: getattr(args, flag) for flag, name in FLAGS.items() if getattr(args, flag) is not None}
    settings = replace(settings, **overrides, init=init if init in INITS else "content")
    if recorded:
        _say_if_costly(settings, args.from_png)

    clip = _is_clip(content_path)
    output = Path(args.output or ("out.mp4" if clip else "out.png"))
    if not output.parent.is_dir():
        raise SettingsError(f"The output folder {output.parent} does not exist.")
    if clip:
        if mask_path or args.bigger or init not in INITS:
            raise SettingsError("A clip takes no --mask, --init image or --bigger (those are for pictures).")
        return _run_clip(content_path, style_paths, settings, output)
    from tqdm import tqdm

    from .engine import transfer  # torch: seconds to import, so only once the arguments hold
    from .images import bigger_metadata, load_image, png_metadata, result_metadata, save_png
    from .vgg import UntrainedWeightsWarning

    content = load_image(content_path, "content image")
    styles = [load_image(path, f"style image {path}") for path in style_paths]
    mask = load_image(mask_path, "mask") if mask_path else None
    init_image = None if init in INITS else load_image(init, "init image")
    bigger_from = load_image(args.from_png, "result to make bigger") if args.bigger else None

    with warnings.catch_warnings(record=True) as warned:  # said before the progress bar, not after the run
        warnings.simplefilter("always", UntrainedWeightsWarning)
        stream = transfer(content, styles, settings, mask=mask, init_image=init_image, bigger_from=bigger_from)
    for warning in warned:
        print(f"warning: {warning.message}", file=sys.stderr)
    with tqdm(total=None, unit="step", dynamic_ncols=True) as bar:
        for progress in stream:
            bar.total = progress.total  # a result made bigger takes only its larger scales' steps
            bar.update(progress.step - bar.n)
            tile = {"tile": f"{progress.tile}/{progress.tiles}"} if progress.tiles else {}
            bar.set_postfix(scale=f"{progress.scale}/{progress.scales}", **tile, loss=f"{progress.losses['total']:.4g}")
    inputs = {
        "content": str(content_path),
        "styles": [str(p) for p in style_paths],
        "mask": mask_path and str(mask_path),
        "init": init,
    }
    picture = progress.image()
    bigger = {} if bigger_from is None else bigger_metadata(bigger_from.size, png_metadata(args.from_png))
    save_png(picture, output, {**result_metadata(settings, progress), **bigger, "stylize:inputs": json.dumps(inputs)})
    print(
        f"wrote {output} ({picture.width}x{picture.height}, {progress.elapsed:.1f} s, weights: {progress.weights}, "
        f"{progress.device} {progress.precision})"
    )


def _is_clip(path: str) -> bool:
    """Whether the content is a video, by its first bytes (whatever its name)."""
    from .video import looks_like_clip

    try:
        return looks_like_clip(path)
    except OSError:
        return False  # load_image says what is wrong with the file


def _run_clip(clip_path: str, style_paths: list[str], settings: Settings, output: Path) -> None:
    """Stylize a clip into an MP4 with its sound, a progress bar over its frames."""
    from tqdm import tqdm

    from .engine import transfer_clip
    from .images import load_image
    from .vgg import UntrainedWeightsWarning
    from .video import ClipWriter, probe, read_frames

    clip = probe(clip_path)  # the container's header, checked before a frame is decoded
    styles = [load_image(path, f"style image {path}") for path in style_paths]
    frames = read_frames(clip)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always", UntrainedWeightsWarning)
        stream = transfer_clip(frames, styles, settings, count=clip.frames)
    for warning in warned:
        print(f"warning: {warning.message}", file=sys.stderr)
    with ClipWriter(output, clip.rate, audio_from=clip) as writer, tqdm(total=clip.frames, unit="frame") as bar:
        try:
            for progress in stream:
                bar.set_postfix(step=f"{progress.step}/{progress.total}", loss=f"{progress.losses['total']:.4g}")
                if progress.final:
                    writer.add(progress.image())
                    bar.update(1)
        finally:  # Ctrl+C keeps the frames made so far, as a shorter clip
            stream.close()
            frames.close()
    print(
        f"wrote {output} ({writer.frames} frames, {progress.size[0]}x{progress.size[1]}, {progress.elapsed:.1f} s, "
        f"weights: {progress.weights}, {progress.device} {progress.precision})"
    )


def _recorded_run(path: str) -> dict:
    """The run a PNG records: "settings" (a Settings), and the files it names (content, styles, mask, init)."""
    from PIL import Image

    from .images import png_metadata

    try:
        text = png_metadata(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # ValueError: text past Pillow's limits
        raise ImageError(f"Cannot read {path}; --from needs a PNG written by this tool or the web app.") from None
    if "stylize:settings" not in text:
        raise ImageError(f"{path} carries no recorded run; --from needs a PNG written by this tool or the web app.")
    try:
        settings = Settings.from_json(text["stylize:settings"])
        inputs = json.loads(text.get("stylize:inputs", "{}"))
        if not isinstance(inputs, dict):
            raise TypeError
    except SettingsError as error:
        raise SettingsError(f"{path} records a setting this tool does not take: {error}") from None
    except (ValueError, TypeError, AttributeError, RecursionError):
        raise ImageError(
            f"{path} records its run in a form this tool cannot read; --from needs a PNG written by "
            "this tool or the web app."
        ) from None
    return {**inputs, "settings": settings}


def _hint(recorded: dict, *names: str) -> str:
    """ " (the run used ...)": the names of the files a PNG names (their folders are another machine's, or long),
    cut short, for a message."""
    named: list = []
    for name in names:
        value = recorded.get(name)
        named += value if isinstance(value, list) else [value]
    named = [brief(PurePath(item).name if isinstance(item, str) else item) for item in named if item]
    return f" (the run used {', '.join(named[:4])})" if named else ""


def _say_if_costly(settings: Settings, path: str) -> None:
    """A recorded run heavier than this device's finest preset is said before it starts: it may take hours."""
    from .device import pick_device

    device_kind = "cpu" if pick_device(settings.device).type == "cpu" else "gpu"
    fine = PRESETS[device_kind]["fine"]
    times = settings.size**2 * settings.steps / (fine["size"] ** 2 * fine["steps"])
    if times > 1.5:
        print(
            f"note: this run ({settings.size} px, {settings.steps} steps: {path}'s, with the flags given here) is "
            f"about {times:.0f} times the fine preset's work on this {device_kind.upper()}: it may take a long time. "
            "Ctrl+C stops it; --size and --steps make it smaller.",
            file=sys.stderr,
        )


def _range(info: dict) -> str:
    """ "64 to 2048; " for a numeric knob, "" for one with choices (argparse lists those) or none."""
    if info["low"] is None:
        return ""
    each = "each " if isinstance(info["default"], tuple) else ""
    return f"{each}{format_number(info['low'])} to {format_number(info['high'])}; "


def _show(value: object) -> str:
    return "equal" if value == () else str(value)
