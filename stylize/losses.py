"""Content, style (Gram) and total-variation losses.

Each layer's loss is a relative error (squared error divided by the target's
squared size), so a weight means the same at any resolution and with
pretrained, Caffe or untrained features, whose activations differ in scale.
"""

from __future__ import annotations

import torch

EPS = 1e-8


def gram(features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Channel correlations averaged over positions (weighted by `mask`, if given): (N, C, C)."""
    flat = features.flatten(2)
    if mask is None:
        return flat @ flat.transpose(1, 2) / flat.shape[2]
    weights = mask.flatten(2)
    return (flat * weights) @ flat.transpose(1, 2) / (weights.sum() + EPS)


def relative_error(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (value - target).square().mean() / (target.square().mean() + EPS)


def content_loss(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return relative_error(features, target)


def style_loss(features: dict[str, torch.Tensor], target_grams: dict[str, torch.Tensor],
               layer_weights: dict[str, float], masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Weighted mean over layers of the relative Gram error."""
    total = sum(layer_weights.values())
    return sum(weight / total * relative_error(gram(features[name], masks and masks[name]), target_grams[name])
               for name, weight in layer_weights.items())


def tv_loss(image: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between neighbouring pixels."""
    dx = image[..., :, 1:] - image[..., :, :-1]
    dy = image[..., 1:, :] - image[..., :-1, :]
    return dx.square().mean() + dy.square().mean()
