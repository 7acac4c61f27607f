import urllib.error
import warnings

import pytest
import torch
from torchvision.models import vgg19

from stylize import Settings, UntrainedWeightsWarning, WeightsError, transfer
from stylize.vgg import CAFFE_FEATURE_SCALE, LAYER_NAMES, VGGFeatures, resolve_weights

LAYERS = ("relu1_1", "relu2_1")


@pytest.fixture(autouse=True)
def fresh_cache():
    resolve_weights.cache_clear()
    yield
    resolve_weights.cache_clear()


def small_vgg_state() -> dict[str, torch.Tensor]:
    """A torchvision-style state dict with recognisable (non-default) weights, first two blocks only."""
    torch.manual_seed(123)
    return {f"features.{k}": v for k, v in vgg19().features[:10].state_dict().items()}


def test_torchvision_state_dict_is_loaded_as_imagenet(tmp_path):
    state = small_vgg_state()
    path = tmp_path / "vgg19.pth"
    torch.save({**state, "classifier.0.weight": torch.zeros(2, 2)}, path)
    weights = resolve_weights(str(path))
    assert weights.kind == "imagenet" and not weights.untrained
    extractor = VGGFeatures(LAYERS, weights)
    assert torch.equal(extractor.net[0].weight, state["features.0.weight"])
    # ImageNet preprocessing: mean/std normalisation of RGB in [0, 1].
    x = torch.rand(1, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = torch.relu(
        torch.nn.functional.conv2d(replicated((x - mean) / std), state["features.0.weight"], state["features.0.bias"])
    )
    assert torch.allclose(extractor(x)["relu1_1"], expected, atol=1e-5)


def test_caffe_state_dict_is_detected_by_its_keys_and_gets_bgr_0_255_input(tmp_path):
    state = small_vgg_state()
    caffe = {f"{LAYER_NAMES[int(k.split('.')[1])]}.{k.split('.')[2]}": v for k, v in state.items()}
    assert "conv1_1.weight" in caffe
    path = tmp_path / "vgg_conv.pth"
    torch.save(caffe, path)
    weights = resolve_weights(str(path))
    assert weights.kind == "caffe"
    extractor = VGGFeatures(LAYERS, weights)
    x = torch.rand(1, 3, 32, 32)
    bgr = x.flip(1) * 255 - torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    # The network as converted, fed as Caffe feeds it...
    net = vgg19().features[:7]
    net[0] = torch.nn.Conv2d(3, 64, 3, padding=1, padding_mode="replicate")
    net.load_state_dict({k.removeprefix("features."): v for k, v in state.items() if int(k.split(".")[1]) < 7})
    with torch.no_grad():
        as_caffe = {"relu1_1": net[:2](bgr), "relu2_1": net(bgr)}
    # ...gives our activations times the factor between its input scale and torchvision's, at every layer.
    for name in LAYERS:
        assert torch.allclose(extractor(x)[name] * CAFFE_FEATURE_SCALE, as_caffe[name], rtol=1e-4, atol=1e-2)


def replicated(x: torch.Tensor) -> torch.Tensor:
    """`x` padded by one pixel, repeating the edge: the reference network's first convolution pads this way."""
    return torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")


def test_a_weights_file_lacking_needed_layers_is_refused(tmp_path):
    path = tmp_path / "short.pth"
    torch.save(small_vgg_state(), path)  # two blocks only
    with pytest.raises(WeightsError, match="lack"):
        VGGFeatures(("relu5_1",), resolve_weights(str(path)))


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_missing_or_bad_weights_files_get_a_clear_error(tmp_path, content):
    path = tmp_path / "weights.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match="weights file|not found"):
        resolve_weights(str(path))


def test_offline_auto_falls_back_to_untrained_features_with_a_note(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    weights = resolve_weights("auto")
    assert weights.untrained and "STYLIZE_WEIGHTS" in weights.note


def test_untrained_results_are_labelled(content_image, style_image):
    final = list(transfer(content_image, style_image, Settings(size=64, steps=3)))[-1]
    assert final.weights == "untrained" and "untrained" in final.note


def test_the_environment_variable_chooses_the_weights(tmp_path, monkeypatch, content_image, style_image):
    monkeypatch.setenv("STYLIZE_WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(WeightsError, match="not found"):
        list(transfer(content_image, style_image, Settings(size=64, steps=3)))


def test_the_python_api_warns_of_untrained_features_before_the_work(content_image, style_image):
    with pytest.warns(UntrainedWeightsWarning, match="untrained VGG19 features") as warned:
        steps = transfer(content_image, style_image, Settings(size=64, steps=3))  # not started yet
    ours = [warning for warning in warned if warning.category is UntrainedWeightsWarning]
    assert len(ours) == 1 and ours[0].filename == __file__  # said once, pointing at the caller's line
    steps.close()


def test_trained_weights_give_no_warning(tmp_path, content_image, style_image):
    path = tmp_path / "vgg19.pth"
    torch.save({f"features.{k}": v for k, v in vgg19().features.state_dict().items()}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedWeightsWarning)
        list(transfer(content_image, style_image, Settings(size=64, steps=2, weights=str(path))))


def test_the_right_and_bottom_edges_are_pulled_as_hard_as_the_left_and_top():
    """A picture whose sides are no multiple of 16 lost its last rows and columns at each floored pooling: they
    got a weaker pull from the deep layers and showed a dotted fringe along the right and bottom edges."""
    extractor = VGGFeatures(("relu5_1",), resolve_weights("untrained"))
    torch.manual_seed(0)
    x = torch.rand(1, 3, 37, 53, requires_grad=True)
    extractor(x)["relu5_1"].square().sum().backward()
    pull = x.grad.abs().sum(1)[0]
    assert pull[-2:].mean() >= 0.8 * pull[:2].mean()
    assert pull[:, -2:].mean() >= 0.8 * pull[:, :2].mean()
