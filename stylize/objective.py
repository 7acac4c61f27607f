"""The objective of a picture being made, whole or tile by tile: content, style and total variation (losses.py),
weighted by the balance of its weights and the settings' strengths.

A scale made whole takes its gradient from the loss itself. A scale made in tiles takes the whole picture's
statistics and losses once per sweep, in pieces without gradients (`Objective.gather`), then each tile's gradient
from the loss's linear surrogate around those statistics (`Objective.gradient`, tiles.WholeStyle), which is the
whole picture's gradient on the tile's core.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import tiles
from .losses import (
    Balance,
    GaussianSums,
    StyleTarget,
    at_layer,
    content_loss,
    feature_pieces,
    style_layer_weights,
    style_loss,
    tv_loss,
)
from .settings import Settings
from .vgg import stride


class Objective:
    """The loss of a picture: style targets set once per scale (`aim_style`), the photo and the region too
    (`aim`). A whole scale's gradient comes from the loss itself; a tiled scale's from the whole picture's
    statistics gathered once per sweep (`gather`), then per tile from the loss's linear surrogate (`gradient`)."""

    def __init__(self, vgg: torch.nn.Module, settings: Settings, balance: Balance, precision: str):
        self.vgg = vgg
        self.settings = settings
        self.balance = balance
        self.layer_weights = style_layer_weights(settings, balance)
        # float16 gradients would underflow: its network sees the loss summed over pixels instead of averaged.
        self.gradient_scale = (lambda x: x.numel()) if precision == "fp16" else (lambda x: 1)
        self.losses: dict[str, torch.Tensor] = {}
        self.warped: torch.Tensor | None = None  # a clip's previous frame moved onto this one (aim_temporal)

    def aim_temporal(self, warped: torch.Tensor, reliable: torch.Tensor) -> None:
        """A clip's later frame: keep the picture close to `warped` (the previous result moved along the flow)
        where `reliable` (1 channel, 0 or 1) says the flow is."""
        self.warped, self.reliable = warped.detach(), reliable

    def _temporal_sum(self, x: torch.Tensor, rows: slice, columns: slice) -> torch.Tensor:
        """The temporal loss's sum of squares over the part `rows` x `columns` of the picture that `x` is."""
        difference = x - self.warped[..., rows, columns]
        return (self.reliable[..., rows, columns] * difference.square()).sum()

    def _temporal_weight(self) -> torch.Tensor:
        return self.balance.temporal * self.settings.temporal_weight * self.unit

    def aim_style(self, targets: dict[str, StyleTarget]) -> None:
        self.style_targets = targets

    @torch.no_grad()
    def aim(self, photo: torch.Tensor, region: torch.Tensor | None, tile: int) -> None:
        """The photo and the region at a scale made whole or in `tile` px tiles (0: whole)."""
        self.photo, self.region, self.tile = photo, region, tile
        self.content_target = tiles.stitched(self.vgg, photo, self.settings.content_layer, tile)
        height, width = photo.shape[-2:]
        self.masks = None
        if region is not None:  # at each layer's positions, a partial last cell included (ceil-mode pooling)
            sizes = {name: (-(-height // stride(name)), -(-width // stride(name))) for name in self.layer_weights}
            self.masks = {name: F.interpolate(region, size=size, mode="area") for name, size in sizes.items()}
        self.unit: torch.Tensor | None = None  # the loss at the first step of the scale

    def seen(self, x: torch.Tensor, rows: slice, columns: slice) -> torch.Tensor:
        """What VGG19 sees of a part of the picture: the region blended into the photo."""
        if self.region is None:
            return x[..., rows, columns]
        region = self.region[..., rows, columns]
        return region * x[..., rows, columns] + (1 - region) * self.photo[..., rows, columns]

    def closure(self, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        return self._backward(x)

    def _backward(self, x: torch.Tensor) -> torch.Tensor:
        """The whole picture's loss (in units of its first value), its gradient left in x.grad."""
        image = self.seen(x, slice(None), slice(None))
        features = self.vgg(image)
        masks = self.masks or dict.fromkeys(self.layer_weights)
        losses = {
            "content": content_loss(features[self.settings.content_layer], self.content_target),
            "style": sum(
                weight * style_loss(features[name], self.style_targets[name], masks[name])
                for name, weight in self.layer_weights.items()
            ),
            "tv": tv_loss(image),
        }
        if self.warped is not None:
            losses["temporal"] = self._temporal_sum(x, slice(None), slice(None)) / x.numel()
        total = self._total(losses)
        scale = self.gradient_scale(x)
        (total / self.unit * scale).backward()
        if scale != 1:
            x.grad.div_(scale)
        return total.detach() / self.unit

    def _total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of the losses, kept with them for `last_losses`."""
        s = self.settings
        total = (
            self.balance.content * s.content_strength * losses["content"]
            + s.style_strength * losses["style"]
            + self.balance.tv * s.smoothing * losses["tv"]
        )
        # The optimizer sees the loss in units of its value at the first step: L-BFGS's curvature test and
        # Adam's epsilon are absolute, and the losses of different weights differ in size by orders of magnitude.
        if self.unit is None:
            self.unit = total.detach().clamp_min(1e-12)
        if "temporal" in losses:  # in those units too (losses.TEMPORAL)
            total = total + self._temporal_weight() * losses["temporal"]
        self.losses = {"total": total.detach(), **{k: v.detach() for k, v in losses.items()}}
        return total

    @torch.no_grad()
    def gather(self, x: torch.Tensor) -> None:
        """At the start of a sweep of a tiled scale: the whole picture's losses, from its statistics gathered in
        pieces, and the style loss's gradients with respect to those statistics (tiles.WholeStyle)."""
        sums, content, tv = GaussianSums(), 0.0, 0.0
        (height, width), layer = x.shape[-2:], self.settings.content_layer
        crop, side = functools.partial(self.seen, x), tiles.statistics_side(self.tile)
        for rows, columns, features in feature_pieces(self.vgg, crop, (width, height), side):
            for name in self.layer_weights:
                mask = None if self.masks is None else at_layer(self.masks[name], rows, columns, stride(name))
                sums.add(name, features[name], mask)
            target = at_layer(self.content_target, rows, columns, stride(layer))
            content += (features[layer].float() - target.float()).square().sum()
            # The piece and one pixel past it: total variation's forward differences at the piece's far edges.
            past = self.seen(x, slice(rows.start, rows.stop + 1), slice(columns.start, columns.stop + 1))
            tv += tiles.tv_sum(past, slice(0, rows.stop - rows.start), slice(0, columns.stop - columns.start))
        self.whole_style = tiles.WholeStyle.of(sums, self.style_targets, self.layer_weights)
        content_mean, tv_mean = content / self.content_target.numel(), tv / x.numel()
        losses = {"content": content_mean, "style": self.whole_style.loss, "tv": tv_mean}
        if self.warped is not None:
            losses["temporal"] = self._temporal_sum(x, slice(None), slice(None)) / x.numel()
        self._total(losses)

    def gradient(self, x: torch.Tensor, rows: slice, columns: slice) -> torch.Tensor:
        """The gradient of the whole picture's loss on the core `rows` x `columns`: at a whole scale from the loss
        itself; at a tiled one from the tile with its margin, through the surrogate built on `gather`'s statistics,
        whose gradient is the loss's where the margin covers VGG19's receptive field."""
        if not self.tile:
            leaf = x.detach().requires_grad_(True)
            self._backward(leaf)
            return leaf.grad
        height, width = x.shape[-2:]
        seen_rows, seen_columns = tiles.with_margin(rows, height), tiles.with_margin(columns, width)
        leaf = x[..., seen_rows, seen_columns].detach().requires_grad_(True)
        region = None if self.region is None else self.region[..., seen_rows, seen_columns]
        image = leaf if region is None else region * leaf + (1 - region) * self.photo[..., seen_rows, seen_columns]
        features = self.vgg(image)
        masks = None
        if self.masks is not None:
            masks = {name: at_layer(m, seen_rows, seen_columns, stride(name)) for name, m in self.masks.items()}
        layer = self.settings.content_layer
        target = at_layer(self.content_target, seen_rows, seen_columns, stride(layer))
        content = (features[layer].float() - target.float()).square().sum() / self.content_target.numel()
        tv = tv_loss(image) * image.numel() / x.numel()  # the tile's share of the whole's mean
        s = self.settings
        total = (
            self.balance.content * s.content_strength * content
            + s.style_strength * self.whole_style.surrogate(features, masks, self.layer_weights)
            + self.balance.tv * s.smoothing * tv
        )
        if self.warped is not None:  # a sum over pixels: the tile's part of the whole's, exactly
            temporal = self._temporal_sum(leaf, seen_rows, seen_columns) / x.numel()
            total = total + self._temporal_weight() * temporal
        scale = self.gradient_scale(x)
        (total / self.unit * scale).backward()
        core = leaf.grad[
            ...,
            rows.start - seen_rows.start : rows.stop - seen_rows.start,
            columns.start - seen_columns.start : columns.stop - seen_columns.start,
        ]
        return core / scale if scale != 1 else core

    def last_losses(self) -> dict[str, float]:
        """The losses at the last step (at a tiled scale, the whole picture's at the start of the sweep)."""
        return {name: value.item() for name, value in self.losses.items()}
