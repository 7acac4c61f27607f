"""The app's gradio components: subclasses of gradio's, each overriding one supported method, and why; and the
controls made of them for the settings.

This is the only place that changes how gradio behaves. Each component is a template of its gradio parent
(`is_template`, as gradio's own gr.Text is of gr.Textbox): the page draws it with the parent's frontend, and only
its server side differs. Each override has a test that fails when it stops working (named below).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import gradio as gr
import httpx
import pydantic

from .settings import knob


class Upload(gr.Image):
    """An image input whose file reaches the job unopened (gradio's own preprocess opens it with PIL), so that
    stylize.decoding alone judges an untrusted upload and a file that is no image gets its message, not a bare
    "Error". tests/test_reliability.py: test_bad_files_get_a_message_and_the_next_job_runs."""

    is_template = True

    def preprocess(self, payload: Any) -> str | None:
        return payload.path if payload else None


class ClipUpload(gr.Video):
    """A video input whose file reaches the job unopened: gradio's own preprocess may hand an upload to the
    system's ffmpeg (to convert or mute it); stylize.video alone judges an untrusted clip, from its container
    first. tests/test_ui_clip.py: test_a_hostile_clip_gets_a_message_and_the_server_still_serves."""

    is_template = True

    def preprocess(self, payload: Any) -> str | None:
        return payload.path if payload else None


class RegionEditor(gr.ImageEditor):
    """The region editor, hardened for the public. Its painted layers reach the job as paths, unopened: gradio
    would decode every file the editor sends, at full size; the job checks, counts and shrinks the layers one at a
    time (tests/test_public.py: test_a_scan_bomb_as_a_painted_layer_is_refused_too). Its blob route, which would
    keep whatever anyone posts to it in server memory until a run claims it, is gone: the page sends files
    (tests/test_reliability.py: test_nothing_can_park_data_in_server_memory_through_the_mask_editor)."""

    is_template = True
    accept_blobs = None  # gradio lists a component's server functions, and its route finds them, by this name

    def preprocess(self, payload: Any) -> list[str]:
        return [layer.path for layer in payload.layers] if payload else []


# Controls whose value is handed on as sent: `Settings` checks every value, with a message that names the setting
# (gradio's own check would answer an API caller's "huge" or 5000 with a bare "Error" or an unnamed range).
# tests/test_reliability.py: test_out_of_range_numbers_get_a_message_naming_the_setting.


class Slider(gr.Slider):
    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return payload


class Number(gr.Number):
    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return payload


class Radio(gr.Radio):
    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return payload


# What each of gradio's input models is, to a caller who sent something else in its place.
INPUT_MODELS = {
    "ImageData": "The photo or the style artwork",
    "GalleryData": "The extra style images",
    "EditorData": "The painted region",
}


class Page(gr.Blocks):
    """The app's Blocks, with two changes to what gradio does for an API caller.

    - Its API description (the API page, gradio_client's view_api(), MCP tools) takes each parameter's description
      from `api_help` ({endpoint: {parameter: text}}) and its default from `api_defaults`: gradio takes parameter
      descriptions only from a docstring (MCP) and from components, and defaults only from the controls' values
      (tests/test_ui.py: test_the_api_describes_its_parameters_with_the_apps_help_texts).
    - A malformed image, gallery or region gets a message: gradio checks each input against its component's model
      before any handler runs and answers a failed check with an empty error
      (tests/test_public.py: test_a_malformed_image_gallery_or_region_gets_a_message).
    """

    def __init__(
        self,
        *args: Any,
        api_help: dict[str, dict[str, str]] | None = None,
        api_defaults: dict[str, dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        self.api_help = api_help or {}
        self.api_defaults = api_defaults or {}
        super().__init__(*args, **kwargs)

    def get_api_info(self, *args: Any, **kwargs: Any) -> dict:
        info = super().get_api_info(*args, **kwargs)
        for endpoint, helps in self.api_help.items():
            defaults = self.api_defaults.get(endpoint, {})
            for parameter in info["named_endpoints"].get(endpoint, {}).get("parameters", []):
                name = parameter["parameter_name"]
                parameter["python_type"]["description"] = helps[name]
                if name in defaults:
                    parameter["parameter_default"] = defaults[name]
        return info

    async def preprocess_data(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().preprocess_data(*args, **kwargs)
        except pydantic.ValidationError as error:
            what = INPUT_MODELS.get(error.title, "An input")
            raise gr.Error(
                f"{what} sent is not in the form this app takes: send each image as a file "
                "(gradio_client's handle_file), a gallery as a list of them, a region as the image "
                "editor's value."
            ) from None


# The controls of settings, each over its knob's range, default, label and help (settings.py).


def image_input(label: str, elem_id: str) -> Upload:
    """An image input (upload, paste or webcam) whose file reaches the job unopened (components.Upload)."""
    return Upload(label=label, type="filepath", sources=["upload", "clipboard", "webcam"], height=340, elem_id=elem_id)


def clip_input(label: str, elem_id: str) -> ClipUpload:
    """A video input (upload only: a clip is a few seconds a visitor already has) whose file reaches the job
    unopened (components.ClipUpload)."""
    return ClipUpload(label=label, sources=["upload"], height=340, elem_id=elem_id)


def setting_slider(name: str, step: float, value: float | None = None, high: float | None = None) -> Slider:
    """A slider over a setting's range, or up to `high` where this server allows less (said in its help)."""
    info = knob(name)
    help_text = info["help"] if high is None else f"{info['help']} Up to {high:g} px on this server."
    return Slider(
        info["low"],
        info["high"] if high is None else high,
        step=step,
        value=info["default"] if value is None else value,
        label=info["label"],
        info=help_text,
    )


def setting_number(name: str) -> Number:
    """A whole-number box over a setting's range."""
    info = knob(name)
    return Number(
        info["default"], precision=0, minimum=info["low"], maximum=info["high"], label=info["label"], info=info["help"]
    )


def setting_radio(name: str) -> Radio:
    """A choice of a setting's values."""
    info = knob(name)
    return Radio(list(info["choices"]), value=info["default"], label=info["label"], info=info["help"])


def _mcp_tool_calls_as_the_page_makes_them() -> None:
    """Two fixes to gradio 6.31's MCP server, which makes each tool call through gradio_client:
    - called without a progress token, it wraps the outputs of an event that has several (a tuple from
      gradio_client) in a list as if they were one, and the tool returns the tuple's text, not the picture;
    - a join the guard refuses reaches the caller as httpx's error, which names the server's internal queue URL
      and not the reason; the caller gets the reason, as the page does.
    gradio makes its MCP server itself, so no subclass can stand in: this replaces the two methods that wait for
    a call's job on its class, the one place the app reaches into gradio (tests/test_deploy.py's MCP tests fail
    if a gradio upgrade changes them)."""
    try:
        from gradio.mcp import GradioMCPServer
    except ImportError:  # no MCP extra: no MCP server
        return
    with_progress = GradioMCPServer._execute_tool_with_progress

    async def without_progress_fixed(self: Any, job: Any) -> list[Any]:
        with _refusal_in_words():
            result = await asyncio.to_thread(job.result)
        return list(result) if isinstance(result, tuple) else [result]

    async def with_progress_fixed(self: Any, job: Any, progress_token: str | int) -> Any:
        with _refusal_in_words():
            return await with_progress(self, job, progress_token)

    GradioMCPServer._execute_tool_without_progress = without_progress_fixed
    GradioMCPServer._execute_tool_with_progress = with_progress_fixed


@contextlib.contextmanager
def _refusal_in_words() -> Iterator[None]:
    """A request the server refused (guard.py's refusals have a `detail`) raises its reason."""
    try:
        yield
    except httpx.HTTPStatusError as error:
        try:
            reason = error.response.json()["detail"]
        except (ValueError, KeyError, TypeError):
            reason = f"The server refused the job ({error.response.status_code}); try again later."
        raise RuntimeError(str(reason)) from None


_mcp_tool_calls_as_the_page_makes_them()
