import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import artwork, photo
from PIL import Image, PngImagePlugin

from stylize import Settings, load_image, transfer
from stylize.cli import FLAGS, main
from stylize.images import png_metadata, result_metadata, save_png
from stylize.settings import format_number, knob

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def inputs(tmp_path):
    photo().save(tmp_path / "photo.jpg")
    artwork().save(tmp_path / "art.png")
    artwork(period=16).save(tmp_path / "art2.png")
    mask = Image.new("L", photo().size, 0)
    mask.paste(255, (0, 0, 48, 72))
    mask.save(tmp_path / "mask.png")
    return tmp_path


def test_end_to_end_writes_a_png_that_records_how_it_was_made(inputs, capsys):
    out = inputs / "out.png"
    assert (
        main(
            [
                str(inputs / "photo.jpg"),
                str(inputs / "art.png"),
                "-o",
                str(out),
                "--size",
                "80",
                "--steps",
                "12",
                "--seed",
                "7",
            ]
        )
        == 0
    )
    image = Image.open(out)
    assert image.size == (80, 60)
    meta = png_metadata(out)
    settings = Settings.from_json(meta["stylize:settings"])
    assert (settings.size, settings.steps, settings.seed) == (80, 12, 7)
    assert meta["stylize:weights"] == "untrained" and "untrained" in meta["stylize:warning"]
    err = capsys.readouterr().err
    assert "warning: Running on untrained VGG19 features" in err


def test_from_reproduces_a_run_exactly(inputs):
    first, again = inputs / "first.png", inputs / "again.png"
    assert (
        main(
            [
                str(inputs / "photo.jpg"),
                str(inputs / "art.png"),
                "-o",
                str(first),
                "--size",
                "80",
                "--steps",
                "10",
                "--init",
                "noise",
                "--seed",
                "5",
            ]
        )
        == 0
    )
    assert main([str(inputs / "photo.jpg"), str(inputs / "art.png"), "--from", str(first), "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


def test_every_artistic_flag_is_accepted_and_recorded(inputs):
    out = inputs / "out.png"
    assert (
        main(
            [
                str(inputs / "photo.jpg"),
                str(inputs / "art.png"),
                str(inputs / "art2.png"),
                "-o",
                str(out),
                "--size",
                "80",
                "--steps",
                "8",
                "--style-weights",
                "0.7",
                "0.3",
                "--preserve-colors",
                "luminance",
                "--style-scale",
                "0.5",
                "--style-strength",
                "2",
                "--content-strength",
                "0.5",
                "--tv",
                "3",
                "--mask",
                str(inputs / "mask.png"),
                "--init",
                "noise",
                "--optimizer",
                "adam",
                "--weights",
                "untrained",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    meta = png_metadata(out)
    settings = Settings.from_json(meta["stylize:settings"])
    assert settings.style_weights == (0.7, 0.3) and settings.preserve_colors == "luminance"
    assert (settings.style_scale, settings.style_strength, settings.content_strength, settings.smoothing) == (
        0.5,
        2,
        0.5,
        3,
    )
    assert settings.init == "noise" and settings.optimizer == "adam"
    assert json.loads(meta["stylize:inputs"])["mask"].endswith("mask.png")


def test_init_from_a_previous_result(inputs):
    first, second = inputs / "first.png", inputs / "second.png"
    common = [str(inputs / "photo.jpg"), str(inputs / "art.png"), "--size", "80"]
    assert main([*common, "-o", str(first), "--steps", "10"]) == 0
    assert main([*common, "-o", str(second), "--steps", "2", "--init", str(first)]) == 0
    assert json.loads(png_metadata(second)["stylize:inputs"])["init"] == str(first)


def test_preset_sets_size_and_steps(inputs):
    out = inputs / "out.png"
    assert (
        main([str(inputs / "photo.jpg"), str(inputs / "art.png"), "-o", str(out), "--preset", "draft", "--steps", "5"])
        == 0
    )
    settings = Settings.from_json(png_metadata(out)["stylize:settings"])
    assert settings.size == Settings.from_preset("draft", "cpu").size and settings.steps == 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.jpg", "{d}/art.png"], "does not exist"),
        (["{d}/notes.png", "{d}/art.png"], "not an image"),
        (["{d}/photo.jpg", "{d}/art.png", "--size", "5"], "size must be between"),
        (["{d}/photo.jpg", "{d}/art.png", "--style-strength", "nan"], "finite"),
        (["{d}/photo.jpg", "{d}/art.png", "--style-weights", "1", "2"], "one style weight per style image"),
        (["{d}/photo.jpg", "{d}/art.png", "-o", "{d}/no/such/dir/out.png"], "output folder"),
        (["{d}/photo.jpg", "{d}/art.png", "--weights", "{d}/nope.pth"], "Weights file not found"),
        (["--from", "{d}/art.png"], "carries no recorded run"),
        (["{d}/photo.jpg"], "at least one style image"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code_2(inputs, args, message):
    (inputs / "notes.png").write_text("hello")
    command = [sys.executable, "-m", "stylize", *[a.format(d=inputs) for a in args]]
    if "-o" not in args:
        command += ["-o", str(inputs / "out.png")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert "Upload" not in lines[0]  # nothing is uploaded on the command line


@pytest.mark.parametrize(
    "args",
    [
        ["photo.jpg"],
        ["photo.jpg", "art.png", "--size", "5"],
        ["--steps", "x"],
        ["photo.jpg", "art.png", "-o", "no/such/dir/out.png"],
    ],
)
def test_a_usage_error_is_said_before_torch_is_imported(args):
    """torch takes seconds to import: arguments that cannot work are refused without it."""
    script = (
        f"import sys; from stylize.cli import main\ntry: main({args!r})\nexcept SystemExit: pass\n"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.stdout.strip() == "False" and "error" in result.stderr, result.stderr


def test_help_shows_each_flags_range(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag, name in FLAGS.items():
        info = knob(name)
        if info["low"] is not None:
            assert f"{format_number(info['low'])} to {format_number(info['high'])}" in text, flag
    assert "{off,luminance,histogram}" in text and "{lbfgs,adam}" in text  # choices are listed by argparse


def test_the_untrained_warning_comes_before_the_work(inputs, capfd):
    assert (
        main(
            [
                str(inputs / "photo.jpg"),
                str(inputs / "art.png"),
                "-o",
                str(inputs / "out.png"),
                "--size",
                "64",
                "--steps",
                "3",
            ]
        )
        == 0
    )
    err = capfd.readouterr().err
    assert err.startswith("warning: Running on untrained VGG19 features"), err[:200]
    assert err.count("warning:") == 1


def test_from_accepts_a_png_saved_by_the_web_app(inputs):
    """The web app records the settings, not its uploads' names: the photo and style come from the command line."""
    settings = Settings(size=80, steps=10, init="noise", seed=5, style_strength=2)
    final = list(transfer(load_image(inputs / "photo.jpg"), load_image(inputs / "art.png"), settings))[-1]
    web = inputs / "stylized.png"
    save_png(final.image(), web, result_metadata(settings, final))  # what the web app's download holds

    again = inputs / "again.png"
    assert main([str(inputs / "photo.jpg"), str(inputs / "art.png"), "--from", str(web), "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(web)), np.asarray(Image.open(again)))
    assert Settings.from_json(png_metadata(again)["stylize:settings"]) == Settings.from_json(
        png_metadata(web)["stylize:settings"]
    )


def test_from_a_web_app_png_without_pictures_says_to_give_them(inputs, capsys):
    web = inputs / "stylized.png"
    save_png(Image.new("RGB", (32, 32)), web, {"stylize:settings": Settings().to_json()})
    assert main(["--from", str(web), "-o", str(inputs / "out.png")]) == 2
    assert "give the photo and style images too" in capsys.readouterr().err


def test_called_as_the_stylize_command_its_messages_say_so(inputs, capsys, monkeypatch):
    web = inputs / "stylized.png"
    save_png(Image.new("RGB", (32, 32)), web, {"stylize:settings": Settings().to_json()})
    monkeypatch.setattr(sys, "argv", [str(Path(sys.prefix) / "bin" / "stylize")])
    assert main(["--from", str(web), "-o", str(inputs / "out.png")]) == 2
    error = capsys.readouterr().err
    assert f"stylize PHOTO STYLE --from {web}" in error and "python -m" not in error


def test_the_precision_is_chosen_said_and_recorded(inputs, capsys):
    out = inputs / "out.png"
    assert (
        main(
            [
                str(inputs / "photo.jpg"),
                str(inputs / "art.png"),
                "-o",
                str(out),
                "--size",
                "64",
                "--steps",
                "3",
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    assert "cpu fp32" in capsys.readouterr().out
    meta = png_metadata(out)
    assert meta["stylize:precision"] == "fp32" and Settings.from_json(meta["stylize:settings"]).precision == "fp32"


def test_tiles_are_asked_for_by_size(inputs):
    out = inputs / "out.png"
    assert (
        main(
            [
                str(inputs / "photo.jpg"),
                str(inputs / "art.png"),
                "-o",
                str(out),
                "--size",
                "320",
                "--steps",
                "6",
                "--tile-size",
                "256",
            ]
        )
        == 0
    )
    assert Image.open(out).size == (320, 240)
    assert Settings.from_json(png_metadata(out)["stylize:settings"]).tile_size == 256


def crafted(path: Path, **text: str) -> Path:
    """A PNG carrying `text` chunks, as anyone can write: key "settings" is stylize:settings, and so on."""
    save_png(Image.new("RGB", (32, 32)), path, {f"stylize:{key}": value for key, value in text.items()})
    return path


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    "text",
    [
        {"settings": "not json"},
        {"settings": "[1, 2]"},
        {"settings": "7"},
        {"settings": DEEP},
        {"settings": Settings().to_json(), "inputs": "not json"},
        {"settings": Settings().to_json(), "inputs": "[1]"},
        {"settings": Settings().to_json(), "inputs": DEEP},
        {"settings": '{"size": "huge"}'},
        {"settings": Settings().to_json(), "inputs": '{"init": ["x"]}'},
    ],
    ids=[
        "not json",
        "a list",
        "a number",
        "nested deep",
        "inputs not json",
        "inputs a list",
        "inputs nested deep",
        "a bad value",
        "an odd init",
    ],
)
def test_from_a_crafted_png_gives_one_line_and_exit_code_2(inputs, capsys, text):
    png = crafted(inputs / "crafted.png", **text)
    assert (
        main([str(inputs / "photo.jpg"), str(inputs / "art.png"), "--from", str(png), "-o", str(inputs / "out.png")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and len(err) < 400


def test_from_a_png_with_a_text_bomb_gives_one_line_and_exit_code_2(inputs, capsys):
    """20 KB of compressed text that inflates to 20 MiB, past what Pillow reads of one chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text("stylize:settings", Settings(size=64, steps=2).to_json())
    info.add_text("stylize:comment", "x" * 20 * 2**20, zip=True)
    Image.new("RGB", (32, 32)).save(inputs / "bomb.png", pnginfo=info)
    assert (
        main(
            [
                str(inputs / "photo.jpg"),
                str(inputs / "art.png"),
                "--from",
                str(inputs / "bomb.png"),
                "-o",
                str(inputs / "out.png"),
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.startswith("error: Cannot read")


def test_from_reads_no_file_the_png_names(inputs, capsys, monkeypatch):
    """A PNG names any files it likes; only those on the command line are read, the PNG's at most named."""
    read = []
    monkeypatch.setattr("stylize.images.load_image", lambda path, *args, **kwargs: read.append(path))
    names = {
        "content": str(inputs / "photo.jpg"),
        "styles": [str(inputs / "art.png")],
        "mask": str(inputs / "mask.png"),
        "init": str(inputs / "art2.png"),
    }
    png = crafted(inputs / "names.png", settings=Settings().to_json(), inputs=json.dumps(names))
    assert main(["--from", str(png), "-o", str(inputs / "out.png")]) == 2
    assert "(the run used 'photo.jpg', 'art.png')" in capsys.readouterr().err
    assert main([str(inputs / "photo.jpg"), str(inputs / "art.png"), "--from", str(png)]) == 2
    assert "give it with --mask" in capsys.readouterr().err
    assert (
        main(
            [str(inputs / "photo.jpg"), str(inputs / "art.png"), "--mask", str(inputs / "mask.png"), "--from", str(png)]
        )
        == 2
    )
    assert "give it with --init" in capsys.readouterr().err
    assert read == []


def test_from_a_costly_recorded_run_says_so_before_it_starts(inputs, capsys, monkeypatch):
    def transfer(*args, **kwargs):
        raise KeyboardInterrupt  # stops the run where it would start

    monkeypatch.setattr("stylize.engine.transfer", transfer)
    png = crafted(inputs / "print.png", settings=Settings(size=8192, steps=5000).to_json())
    assert (
        main([str(inputs / "photo.jpg"), str(inputs / "art.png"), "--from", str(png), "-o", str(inputs / "out.png")])
        == 130
    )
    assert "this run (8192 px, 5000 steps: " in capsys.readouterr().err


def test_bigger_makes_a_result_bigger_from_itself_and_records_it(inputs, capsys):
    small, big = inputs / "small.png", inputs / "big.png"
    both = [str(inputs / "photo.jpg"), str(inputs / "art.png")]
    assert main([*both, "-o", str(small), "--size", "80", "--steps", "12"]) == 0
    assert main([*both, "--from", str(small), "--bigger", "--size", "160", "-o", str(big)]) == 0
    picture = Image.open(big)
    assert picture.size == (160, 120)
    meta = png_metadata(big)
    source = json.loads(meta["stylize:bigger_from"])
    assert source["size"] == [80, 60] and source["settings"]["size"] == 80
    assert Settings.from_json(meta["stylize:settings"]).size == 160
    fresh = inputs / "fresh.png"  # the same size made from scratch: another picture of the same style
    assert main([*both, "-o", str(fresh), "--size", "160", "--steps", "12"]) == 0

    def away_from_the_result(path: Path) -> float:
        shrunk = np.asarray(Image.open(path).convert("RGB").resize((80, 60), Image.Resampling.BOX), np.float64)
        return np.abs(shrunk - np.asarray(Image.open(small).convert("RGB"), np.float64)).mean()

    assert away_from_the_result(big) < 0.85 * away_from_the_result(fresh)  # untrained features: 16.5 vs 22.5 of 255
    assert main([*both, "--from", str(small), "--bigger", "--size", "64", "-o", str(big)]) == 2
    assert "choose a size above 80 px" in capsys.readouterr().err
    assert main([*both, "--from", str(small), "--bigger", "-o", str(big)]) == 2
    assert "--bigger makes a result bigger" in capsys.readouterr().err
