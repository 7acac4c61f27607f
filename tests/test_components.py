"""The app's gradio components (stylize.components) do what they override, without a server."""

import gradio as gr
import pytest
from gradio.data_classes import FileData

from stylize.components import INPUT_MODELS, Number, Page, Radio, RegionEditor, Slider, Upload


@pytest.mark.parametrize(
    ("component", "parent"),
    [
        (Upload(), gr.Image),
        (RegionEditor(), gr.ImageEditor),
        (Slider(), gr.Slider),
        (Number(), gr.Number),
        (Radio(), gr.Radio),
    ],
)
def test_each_component_is_drawn_as_its_gradio_parent(component, parent):
    assert component.get_block_name() == parent().get_block_name()


def test_an_upload_reaches_the_job_as_its_path_unopened(tmp_path):
    path = tmp_path / "not-an-image.jpg"
    path.write_text("hello")
    assert Upload(type="filepath").preprocess(FileData(path=str(path))) == str(path)
    assert Upload(type="filepath").preprocess(None) is None


def test_the_region_editor_hands_on_paths_and_has_no_blob_route(tmp_path):
    editor = RegionEditor(type="pil")
    layers = [FileData(path=str(tmp_path / f"layer{i}.png")) for i in range(2)]
    payload = editor.data_model(background=None, layers=layers, composite=None)
    assert editor.preprocess(payload) == [layer.path for layer in layers]
    assert editor.preprocess(None) == []
    # gradio's component_server route calls getattr(block, fn_name) if it is a server function: none here.
    assert editor.accept_blobs is None
    assert "accept_blobs" not in [fn.__name__ for fn in editor.server_fns]
    assert "accept_blobs" in [fn.__name__ for fn in gr.ImageEditor().server_fns]  # gradio's own has one


@pytest.mark.parametrize("control", [Slider(0, 10), Number(1), Radio(["a", "b"])])
def test_settings_controls_hand_values_on_as_sent(control):
    for value in ("huge", 5000, float("nan"), "c"):
        assert control.preprocess(value) == value or value != value


def test_the_page_amends_the_api_description_and_names_malformed_inputs():
    def handler(size: float, name: str) -> str:
        return f"{size} {name}"

    with Page(api_help={"/go": {"size": "How big.", "name": "Who."}}, api_defaults={"/go": {"size": None}}) as page:
        size, name, out = gr.Number(3), gr.Textbox("x"), gr.Textbox()
        gr.Button().click(handler, [size, name], out, api_name="go")
    parameters = page.get_api_info()["named_endpoints"]["/go"]["parameters"]
    assert [p["python_type"]["description"] for p in parameters] == ["How big.", "Who."]
    assert [p["parameter_default"] for p in parameters] == [None, "x"]
    # The names of gradio's input models that Page.preprocess_data says in its message (tests/test_public.py
    # sends malformed ones to a live app).
    assert {model.__name__ for model in (gr.Image.data_model, gr.Gallery.data_model, gr.ImageEditor.data_model)} == set(
        INPUT_MODELS
    )
