"""Content, style (Gram) and total-variation losses.

Each layer's loss is a relative error (squared error divided by the target's
squared size), so a weight means the same at any resolution and with
pretrained, Caffe or untrained features, whose activations differ in scale.
"""

from __future__ import annotations

import torch

EPS = 1e-8


class _SymmetricProduct(torch.autograd.Function):
    """F·diag(w)·Fᵀ for (N, C, P) features F and (N, 1, P) position weights w (or none).

    The product is symmetric, so its gradient is (dG + dGᵀ)·F·diag(w): one matrix product,
    where autograd's generic rule for A·B takes two. The Gram matrices are most of a step's
    cost outside VGG19 itself (bench/README.md).
    """

    @staticmethod
    def forward(ctx, flat: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(flat, weights)
        return (flat if weights is None else flat * weights) @ flat.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        flat, weights = ctx.saved_tensors
        grad_flat = (grad + grad.transpose(1, 2)) @ flat
        return (grad_flat if weights is None else grad_flat * weights), None


def gram(features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Channel correlations averaged over positions (weighted by `mask`, if given): (N, C, C)."""
    flat = features.flatten(2)
    if mask is None:
        return _SymmetricProduct.apply(flat, None) / flat.shape[2]
    weights = mask.flatten(2)
    return _SymmetricProduct.apply(flat, weights) / (weights.sum() + EPS)


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
