"""With torchvision-format weights the engine computes the reference objective, checked against an independent
computation of its formulas; and the statistics behind the style loss (masks, blends) are what they claim."""

import numpy as np
import pytest
import torch
import torchvision
from helpers import artwork, photo
from PIL import Image

from stylize import Settings, transfer
from stylize.losses import (
    BALANCES,
    Gaussian,
    StyleTarget,
    _TraceSqrt,
    _TraceSqrtNewtonSchulz,
    gaussian,
    mixture,
    style_loss,
)
from stylize.vgg import LAYER_NAMES

# The reference, as published: layers by index in torchvision's vgg19().features, and its weights.
CONTENT_LAYER = 22  # relu4_2
STYLE_LAYERS = {1: 256, 6: 64, 11: 16, 20: 4, 29: 1}  # relu1_1 ... relu5_1
CONTENT_WEIGHT, TV_WEIGHT = 0.015, 2.0
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    """A torchvision VGG19 state dict with weights of its own (not the engine's untrained seed), saved to a file."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2024)
        features = torchvision.models.vgg19().features[:30]
    for layer in features:
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.uniform_(layer.bias, -0.05, 0.05)  # biases too, so nothing is zero by accident
    path = tmp_path_factory.mktemp("weights") / "vgg19-random.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


def reference_features(path, image: torch.Tensor) -> dict[int, torch.Tensor]:
    """The reference's network on its own: torchvision's VGG19 with the file's weights, its first convolution
    padding by replication, ImageNet normalisation of RGB in [0, 1]; float64 throughout."""
    net = torchvision.models.vgg19().features[:30]
    net[0] = torch.nn.Conv2d(3, 64, 3, padding=1, padding_mode="replicate")
    net.load_state_dict({k.removeprefix("features."): v for k, v in torch.load(path).items()})
    net = net.double().eval()
    x = (image.double() - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    out = {}
    with torch.no_grad():
        for i, layer in enumerate(net):
            x = layer(x)
            out[i] = x[0].flatten(1).numpy()  # (C, positions)
    return out


def symmetric_sqrt(m: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(m)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def wasserstein(f: np.ndarray, s: np.ndarray) -> float:
    """Squared 2-Wasserstein distance between Gaussians fitted to two (C, n) activations, as published."""
    mu, mu_s = f.mean(1), s.mean(1)
    cov = (f - mu[:, None]) @ (f - mu[:, None]).T / f.shape[1]
    cov_s = (s - mu_s[:, None]) @ (s - mu_s[:, None]).T / s.shape[1]
    root = symmetric_sqrt(cov_s)
    cross = symmetric_sqrt(root @ cov @ root)
    return float(np.mean((mu - mu_s) ** 2) + np.trace(cov + cov_s - 2 * cross) / f.shape[0])


def tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float64) / 255).permute(2, 0, 1)[None]


@pytest.mark.parametrize(
    "strengths",
    [{}, {"content_strength": 2.5, "style_strength": 0.4, "smoothing": 3.0}],
    ids=["strength 1", "other strengths"],
)
def test_imagenet_weights_compute_the_reference_objective(torchvision_file, strengths):
    content, style = photo(64, 48), artwork(64, 48, period=6)
    start = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    settings = Settings(size=64, steps=1, weights=str(torchvision_file), precision="fp32", **strengths)
    records = list(transfer(content, style, settings, init_image=start))
    assert records[-1].weights == "imagenet"
    losses = records[-1].losses  # one step: the losses of the starting picture

    x = tensor(start)
    f, c, s = (reference_features(torchvision_file, image) for image in (x, tensor(content), tensor(style)))
    content_term = float(np.mean((f[CONTENT_LAYER] - c[CONTENT_LAYER]) ** 2))
    total_weight = sum(STYLE_LAYERS.values())
    style_term = sum(w / total_weight * wasserstein(f[i], s[i]) for i, w in STYLE_LAYERS.items())
    padded = torch.nn.functional.pad(x, (0, 1, 0, 1), mode="replicate")
    dx, dy = padded[..., :-1, 1:] - padded[..., :-1, :-1], padded[..., 1:, :-1] - padded[..., :-1, :-1]
    tv_term = float((dx**2 + dy**2).mean())
    total = (
        CONTENT_WEIGHT * strengths.get("content_strength", 1) * content_term
        + strengths.get("style_strength", 1) * style_term
        + TV_WEIGHT * strengths.get("smoothing", 1) * tv_term
    )

    assert losses["content"] == pytest.approx(content_term, rel=1e-4)
    assert losses["style"] == pytest.approx(style_term, rel=2e-3)
    assert losses["tv"] == pytest.approx(tv_term, rel=1e-5)
    assert losses["total"] == pytest.approx(total, rel=2e-3)


def test_the_balance_table_holds_the_reference_for_imagenet_weights():
    imagenet = BALANCES["imagenet"]
    assert (imagenet.content, imagenet.tv) == (CONTENT_WEIGHT, TV_WEIGHT)
    total = sum(STYLE_LAYERS.values())
    assert imagenet.style_layers == pytest.approx({LAYER_NAMES[i]: w / total for i, w in STYLE_LAYERS.items()})


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_a_mask_weights_the_statistics_by_region(memory_format):
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(1, 5, 6, 8, dtype=torch.float64, generator=generator).contiguous(memory_format=memory_format)
    mask = torch.zeros(1, 1, 6, 8, dtype=torch.float64)
    mask[..., :, :3] = 1  # the left three columns
    masked = gaussian(features, mask)
    alone = gaussian(features[..., :, :3])
    assert torch.allclose(masked.mean, alone.mean) and torch.allclose(masked.cov, alone.cov)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_the_statistics_of_a_crop_are_its_positions_mean_and_covariance(memory_format):
    """A statistics pass's pieces are crops of features in vgg.py's memory format (channels-last; contiguous on MPS),
    which the statistics read in their own order."""
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(1, 6, 20, 24, dtype=torch.float64, generator=generator).contiguous(
        memory_format=memory_format
    )
    crop = features[..., 3:17, 5:21]
    positions = crop[0].reshape(6, -1).numpy()
    statistics = gaussian(crop)
    assert np.allclose(statistics.mean.numpy(), positions.mean(axis=1))
    assert np.allclose(statistics.cov.numpy(), np.cov(positions, bias=True))


def test_blended_styles_have_the_statistics_of_both_together():
    generator = torch.Generator().manual_seed(4)
    a = torch.randn(1, 4, 5, 5, dtype=torch.float64, generator=generator)
    b = torch.randn(1, 4, 5, 10, dtype=torch.float64, generator=generator) + 2
    blended = mixture([gaussian(a), gaussian(b)], [25, 50])  # shares in proportion to their positions
    together = gaussian(torch.cat([a, b], dim=3))
    assert torch.allclose(blended.mean, together.mean) and torch.allclose(blended.cov, together.cov)


@pytest.mark.parametrize("positions", [(2, 3), (9, 9)], ids=["fewer positions than channels", "more positions"])
def test_the_style_loss_is_the_wasserstein_distance_by_eigendecomposition(positions):
    generator = torch.Generator().manual_seed(5)
    f = torch.randn(1, 12, *positions, dtype=torch.float64, generator=generator) ** 2
    s = torch.randn(1, 12, 7, 7, dtype=torch.float64, generator=generator) ** 2 + 0.3
    ours = style_loss(f, StyleTarget.of(gaussian(s))).item()
    assert ours == pytest.approx(wasserstein(f[0].flatten(1).numpy(), s[0].flatten(1).numpy()), rel=1e-7)


def test_newton_schulz_iterations_give_the_eigendecomposition_s_square_root_trace():
    """The GPU's way to tr(M^½) (losses.TRACE_SQRT) against the CPU's, on a covariance whose eigenvalues spread
    over six orders of magnitude, as VGG activations' do; gradients compared where the matrix is well conditioned."""
    generator = torch.Generator().manual_seed(8)
    basis, _ = torch.linalg.qr(torch.randn(48, 48, dtype=torch.float64, generator=generator))
    spread = (basis * torch.logspace(0, -6, 48, dtype=torch.float64)) @ basis.T
    assert _TraceSqrtNewtonSchulz.apply(spread).item() == pytest.approx(_TraceSqrt.apply(spread).item(), rel=1e-4)
    conditioned = ((basis * torch.linspace(1, 0.05, 48, dtype=torch.float64)) @ basis.T).requires_grad_(True)
    gradients = [
        torch.autograd.grad(method.apply(conditioned), conditioned)[0]
        for method in (_TraceSqrtNewtonSchulz, _TraceSqrt)
    ]
    assert torch.allclose(*gradients, rtol=1e-5, atol=1e-8)


def test_a_style_matched_exactly_costs_nothing():
    s = torch.rand(1, 6, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    assert style_loss(s, StyleTarget.of(gaussian(s))).item() == pytest.approx(0, abs=1e-12)
    shifted = Gaussian(gaussian(s).mean + 1, gaussian(s).cov)
    assert style_loss(s, StyleTarget.of(shifted)).item() == pytest.approx(1.0)  # mean term: mean of 1²


@pytest.mark.parametrize("masked", [False, True], ids=["whole", "masked"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("positions", [(2, 2), (4, 6)], ids=["fewer positions than channels", "more positions"])
def test_the_style_loss_gradient_is_its_derivative(positions, layout, masked):
    """The statistics' hand-written backward (losses._Moments) against finite differences, in float64."""
    generator = torch.Generator().manual_seed(7)
    f = (torch.randn(1, 8, *positions, dtype=torch.float64, generator=generator) ** 2).contiguous(memory_format=layout)
    s = torch.randn(1, 8, 7, 7, dtype=torch.float64, generator=generator) ** 2 + 0.3
    mask = torch.rand(1, 1, *positions, dtype=torch.float64, generator=generator) if masked else None
    target = StyleTarget.of(gaussian(s))
    x = f.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: (gaussian(x, mask).mean, gaussian(x, mask).cov), (x,))
    assert torch.autograd.gradcheck(lambda x: style_loss(x, target, mask), (x,))
