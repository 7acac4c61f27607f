"""The plain textbook baseline: one scale, L-BFGS, float32, VGG19 cut after relu5_1.

Written the way tutorials write it: torchvision's vgg19().features (seed-0 initialisation,
the same untrained weights the engine uses with weights="untrained", the first convolution
padding by replication as the reference's does), content at relu4_2, style at
relu1_1..relu5_1, and torch.optim.LBFGS started from the content photo. The objective is
the engine's own (stylize.losses: the reference objective with the untrained balance), so
both optimize the same thing and only the method differs. L-BFGS runs without its default
tolerances and sees the loss in units of its value at the photo (as the engine's optimizer does):
its curvature test and tolerances are absolute, and untrained features' losses are small.

`python bench/baseline.py` runs it alone and prints its loss curve.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torchvision
from common import add_image_arguments, load_pair, machine_header

from stylize.device import pick_device
from stylize.losses import BALANCES, StyleTarget, content_loss, gaussian, style_loss, tv_loss

STYLE_LAYERS = {"relu1_1": 1, "relu2_1": 6, "relu3_1": 11, "relu4_1": 20, "relu5_1": 29}
CONTENT_LAYER = ("relu4_2", 22)
BALANCE = BALANCES["untrained"]  # the engine's, at strength 1, for the weights both run on
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def textbook_vgg(device: torch.device) -> torch.nn.Module:
    """VGG19 features up to relu5_1 with seed-0 (untrained) weights, the first convolution padding by replication."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torchvision.models.vgg19().features[:30]
    net[0].padding_mode = "replicate"
    return net.eval().requires_grad_(False).to(device)


def features(net: torch.nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    mean = torch.tensor(MEAN, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=image.device).view(1, 3, 1, 1)
    x = (image - mean) / std
    wanted = {index: name for name, index in (*STYLE_LAYERS.items(), CONTENT_LAYER)}
    out = {}
    for i, layer in enumerate(net):
        x = layer(x)
        if i in wanted:
            out[wanted[i]] = x
    return out


class BaselineLoss:
    """The objective, with targets for one content and one style image at one size."""

    def __init__(self, net: torch.nn.Module, content: torch.Tensor, style: torch.Tensor):
        self.net = net
        with torch.no_grad():
            self.content_target = features(net, content)[CONTENT_LAYER[0]]
            style_features = features(net, style)
            self.style_targets = {name: StyleTarget.of(gaussian(style_features[name])) for name in STYLE_LAYERS}

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        f = features(self.net, image)
        style = sum(BALANCE.style_layers[name] * style_loss(f[name], self.style_targets[name]) for name in STYLE_LAYERS)
        return (
            BALANCE.content * content_loss(f[CONTENT_LAYER[0]], self.content_target)
            + style
            + BALANCE.tv * tv_loss(image)
        )

    @torch.no_grad()
    def value(self, image: torch.Tensor) -> float:
        return self(image.clamp(0, 1)).item()


def run_baseline(
    net: torch.nn.Module,
    content: torch.Tensor,
    style: torch.Tensor,
    steps: int,
    on_step: Callable[[float, float, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Optimize from the content photo for `steps` loss evaluations; returns the clamped image.

    `on_step(seconds, loss, x)` is called after every evaluation, with seconds since the start
    (target computation included), the loss at the evaluated point and that point (unclamped).
    """
    sync = torch.cuda.synchronize if content.device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    loss_fn = BaselineLoss(net, content, style)
    x = content.clone(memory_format=torch.contiguous_format).requires_grad_(True)
    optimizer = torch.optim.LBFGS([x], max_iter=steps, tolerance_grad=-1, tolerance_change=-1)
    unit: list[float] = []  # the loss at the photo: L-BFGS sees the loss in its units, as the engine's does

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn(x)
        if not unit:
            unit.append(loss.item())
        (loss / unit[0]).backward()
        if on_step is not None:
            value = loss.item()  # synchronizes on a GPU
            on_step(time.perf_counter() - started, value, x.detach())
        return loss.detach() / unit[0]

    optimizer.step(closure)
    return x.detach().clamp(0, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_image_arguments(p)
    p.add_argument("--size", type=int, default=512, help="long side in pixels")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = pick_device(args.device)
    print(machine_header(device))
    content, style = load_pair(args.size, device)
    net = textbook_vgg(device)
    curve: list[tuple[float, float]] = []
    image = run_baseline(net, content, style, args.steps, lambda t, loss, _: curve.append((t, loss)))
    final = BaselineLoss(net, content, style).value(image)
    print(f"{'step':>6} {'seconds':>9} {'loss':>10}")
    for i, (t, loss) in enumerate(curve, start=1):
        if i in (1, 2, 5) or i % 25 == 0 or i == len(curve):
            print(f"{i:>6} {t:>9.2f} {loss:>10.5f}")
    print(f"final image (clamped): loss {final:.5f} after {curve[-1][0]:.1f} s")


if __name__ == "__main__":
    main()
