"""A value a user sends may be anything, of any length: messages name the setting and echo the value briefly."""

import subprocess
import sys
from pathlib import Path

import pytest

from stylize import Settings, SettingsError
from stylize.settings import ECHO_LENGTH, knob

HIGH = knob("size")["high"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (int("9" * 400), "9" * (ECHO_LENGTH - 1) + "…"),  # too large for a float: OverflowError
        (1e308, "1e+308"),  # a float whose whole-number form has 309 digits
        (-1e300, "-1e+300"),
    ],
    ids=["400 digits", "1e308", "-1e300"],
)
def test_a_huge_number_gets_the_range_message_with_a_short_echo(value, shown):
    with pytest.raises(SettingsError) as error:
        Settings(size=value)
    assert str(error.value) == f"size must be between 64 and {HIGH}; got {shown}."


@pytest.mark.parametrize(
    ("settings", "start"),
    [
        ({"size": "7" * 400}, "size must be a finite number, got '777"),  # float() makes it inf
        ({"size": "x" * 10**6}, "size must be a number, got 'xxx"),
        ({"optimizer": "y" * 10**6}, "optimizer must be one of lbfgs, adam; got 'yyy"),
        ({"style_weights": "z" * 10**6}, "style_weights must be a list, got 'zzz"),
        ({"seed": 1e100}, "seed must be between"),
    ],
    ids=["400 digits as text", "junk", "choice", "list", "1e100"],
)
def test_a_long_value_is_echoed_cut_short(settings, start):
    with pytest.raises(SettingsError) as error:
        Settings(**settings)
    message = str(error.value)
    assert message.startswith(start) and len(message) < 120, message


def test_a_long_preset_name_is_echoed_cut_short():
    with pytest.raises(SettingsError) as error:
        Settings.from_preset("u" * 10**6, "cpu")
    assert "got 'uuu" in str(error.value) and len(str(error.value)) < 120


def test_no_help_text_points_to_a_file_a_visitor_cannot_open():
    from dataclasses import fields

    from stylize.settings import Settings, knob

    for field in fields(Settings):
        assert ".md" not in knob(field.name)["help"], field.name


def imported_by(module: str) -> set[str]:
    """The top-level packages a fresh interpreter holds after importing `module`."""
    script = f"import sys, {module}; print(' '.join(sorted({{name.split('.')[0] for name in sys.modules}})))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT, check=True
    )
    return set(result.stdout.split())


def test_the_settings_import_without_torch():
    """The command line checks its arguments before torch's seconds of importing (stylize.cli)."""
    assert "torch" not in imported_by("stylize.settings")


@pytest.mark.parametrize(
    "module", ["stylize.jobs", "stylize.guard", "stylize.link_preview", "stylize.ssr", "stylize.cli", "stylize"]
)
def test_only_the_page_and_its_components_import_gradio(module):
    assert "gradio" not in imported_by(module)
