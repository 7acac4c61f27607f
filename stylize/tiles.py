"""Tiles: a picture too big to optimize at once, optimized one tile at a time as the one picture it is.

A tiled scale goes in sweeps, each one step of the whole picture. At the start of a sweep a pass without
gradients gathers the whole picture's mean and covariance per style layer in pieces (losses.feature_pieces: each
position once, each piece seeing a margin of context), and the style loss's gradients with respect to those
statistics are taken once (`WholeStyle`). Then each tile (a core of the picture with a margin of context around
it, the cores covering the picture once) runs VGG19 with gradients and backpropagates the linear surrogate of the
whole objective (engine._Objective.gradient), and Adam updates the tile's core in a picture-sized state (`Adam`):
nothing restarts at a tile. The margin is computed and discarded; the grid moves every sweep, so no border stays in
one place.

The surrogate sums over all the positions a tile sees, margin included, each weighted by its share of the whole
picture: a position's gradient reaches the pixels within VGG19's receptive field of it, so a core pixel gets the
contributions of its neighbours in the margin too, and its gradient is the whole picture's wherever the margin
covers the receptive field (tests/test_tiles.py checks this).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .losses import (
    CELL,
    Gaussian,
    GaussianSums,
    StyleTarget,
    at_layer,
    even_cuts,
    feature_pieces,
    gaussian,
    gaussian_style_loss,
    piece_shapes,
)
from .vgg import stride

MARGIN = 32  # px of context each side of a tile's core (bench/README.md: seams and time)
# A pass without gradients holds about a third of the memory per pixel that one with them does (bench/README.md),
# so the statistics pass takes pieces this many times a tile's side: fewer margins to compute.
STATISTICS_TILE = 1.5
# The grid's shift each sweep: this share of its room, onwards; two sweeps running differ by over a third of it.
GOLDEN = (math.sqrt(5) - 1) / 2


def core_side(tile: int) -> int:
    """The side of a tile's core: the tile less its margins, in whole cells."""
    return max(CELL, (tile - 2 * MARGIN) // CELL * CELL)


def shape(size: tuple[int, int], tile: int) -> tuple[int, int]:
    """(width, height) of the tiles of a (width, height) picture made in `tile` px tiles: at most tile² px each,
    square or a strip across the picture, whichever computes fewer margins (losses.piece_shapes); the same at
    every sweep, as the number of cores a side is cut into is."""
    if size[0] * size[1] <= tile * tile:
        return size
    return min(piece_shapes(size, tile), key=lambda shape: work(size, _grid(size, shape, 1)))


def grid(size: tuple[int, int], tile: int, sweep: int) -> list[tuple[slice, slice]]:
    """(rows, columns) of each tile's core at a sweep: the cores cover the (width, height) picture once, cut on
    whole cells, moved by a different shift each sweep. A side that fits in one tile is not cut."""
    return _grid(size, shape(size, tile), sweep)


def _grid(size: tuple[int, int], shape: tuple[int, int], sweep: int) -> list[tuple[slice, slice]]:
    rows, columns = _cuts(size[1], shape[1], sweep), _cuts(size[0], shape[0], sweep)
    return [(row, column) for row in rows for column in columns]


def _cuts(length: int, tile: int, sweep: int) -> list[slice]:
    """One side's cores at a sweep, its tiles `tile` px long on that side: as few as cover it, of even size, so that
    the fewest margins are computed (cut every core_side px from a moving offset, 1024 px in 512 px tiles took 6%
    more work). Their borders move together each sweep within the room the cores leave, at least a cell each way
    (one core more where the fewest leave none), to a different place each sweep."""
    if length <= tile:
        return [slice(0, length)]
    cells, most = -(-length // CELL), core_side(tile) // CELL

    def room(count: int) -> int:  # cells a border may move each way: cores within core_side and over half their size
        return max(0, min(most - -(-cells // count), cells // count // 2))

    fewest = -(-cells // most)
    count = next((n for n in range(fewest, cells + 1) if room(n) > 0), fewest)  # none: tiles of one or two cells
    moves = room(count)
    return even_cuts(length, count, int((sweep * GOLDEN) % 1 * (2 * moves + 1)) - moves)


def with_margin(core: slice, length: int) -> slice:
    """The span a tile sees along one axis: its core and MARGIN px of context each side, within the picture."""
    return slice(max(0, core.start - MARGIN), min(length, core.stop + MARGIN))


def work(size: tuple[int, int], cores: list[tuple[slice, slice]]) -> int:
    """Pixels the tiles of a grid run through VGG19, margins included."""

    def span(core: slice, length: int) -> int:
        seen = with_margin(core, length)
        return seen.stop - seen.start

    return sum(span(rows, size[1]) * span(columns, size[0]) for rows, columns in cores)


def statistics_side(tile: int) -> int:
    """The side of the pieces a sweep's statistics pass takes at a scale made in `tile` px tiles."""
    return round(tile * STATISTICS_TILE)


def stitched(vgg: torch.nn.Module, image: torch.Tensor, layer: str, tile: int) -> torch.Tensor:
    """One layer's features of a whole image, computed in pieces no larger than `tile` (0: at once)."""
    (height, width), step = image.shape[-2:], stride(layer)
    out = None
    for rows, columns, features in feature_pieces(vgg, lambda r, c: image[..., r, c], (width, height), tile):
        if out is None:
            channels = features[layer].shape[1]
            out = features[layer].new_empty((1, channels, -(-height // step), -(-width // step)))
        at_layer(out, rows, columns, step).copy_(features[layer])
    return out


def tv_sum(image: torch.Tensor, rows: slice, columns: slice) -> torch.Tensor:
    """Σ dx² + dy² over the pixels `rows` x `columns` of `image`, forward differences, zero past its last row and
    column: a piece of losses.tv_loss's sum, reading one pixel past the piece."""
    seen = image[..., rows.start : rows.stop + 1, columns.start : columns.stop + 1]
    dx = seen[..., :, 1:] - seen[..., :, :-1]
    dy = seen[..., 1:, :] - seen[..., :-1, :]
    height, width = rows.stop - rows.start, columns.stop - columns.start
    return dx[..., :height, :].square().sum() + dy[..., :, :width].square().sum()


@dataclass(frozen=True)
class WholeStyle:
    """The whole picture's style statistics at the start of a sweep, the style loss on them, and its gradients
    with respect to them: what each tile's surrogate (`surrogate`) is built on."""

    gaussians: dict[str, Gaussian]
    weights: dict[str, torch.Tensor]  # each layer's positions' total weight: their count, or the region's sum
    gradients: dict[str, tuple[torch.Tensor, torch.Tensor]]  # the loss's, with respect to mean and covariance
    loss: torch.Tensor  # the style loss, layers weighted

    @classmethod
    def of(cls, sums: GaussianSums, targets: dict[str, StyleTarget], layer_weights: dict[str, float]) -> WholeStyle:
        gaussians, gradients, loss = sums.gaussians(), {}, 0.0
        for name, weight in layer_weights.items():
            mean = gaussians[name].mean.clone().requires_grad_(True)
            cov = gaussians[name].cov.clone().requires_grad_(True)
            with torch.enable_grad():
                layer_loss = gaussian_style_loss(Gaussian(mean, cov), targets[name])
                layer_loss.backward()
            loss += weight * layer_loss.detach()
            gradients[name] = (mean.grad, cov.grad)
        return cls(gaussians, {name: sums.weight(name) for name in layer_weights}, gradients, loss)

    def surrogate(
        self,
        features: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor] | None,
        layer_weights: dict[str, float],
    ) -> torch.Tensor:
        """The style loss's linear surrogate over a tile's positions (`masks` cut to the tile): each layer's share
        of the whole picture's mean and covariance (about the whole's mean), whose gradients are the whole's
        position by position."""
        style = 0.0
        for name, weight in layer_weights.items():
            mask = None if masks is None else masks[name]
            share = (features[name][0, 0].numel() if mask is None else mask.sum()) / self.weights[name]
            part = gaussian(features[name], mask)
            apart = part.mean - self.gaussians[name].mean
            grad_mean, grad_cov = self.gradients[name]
            style += weight * share * (grad_mean @ part.mean + (grad_cov * part.cov).sum() + apart @ grad_cov @ apart)
        return style


class Adam:
    """Adam over a whole picture whose regions (tiles, or the whole) are stepped one at a time, clamped to [0, 1]
    after each step, with a bias-corrected exponential moving average of the iterates: what is shown and kept.
    Moments and average are picture-sized, so a tile's visit continues where its last one stopped."""

    BETAS = (0.9, 0.999)
    EPSILON = 1e-8  # torch.optim.Adam's defaults (tests/test_tiles.py compares the two)

    def __init__(self, start: torch.Tensor, lr: float, average_decay: float):
        self.x = start.detach().clone(memory_format=torch.contiguous_format)
        self.m = torch.zeros_like(self.x)
        self.v = torch.zeros_like(self.x)
        self.average = self.x.clone()
        self.lr, self.average_decay = lr, average_decay

    def step(self, rows: slice, columns: slice, gradient: torch.Tensor, step: int) -> None:
        """Step number `step` (1-based; the sweep, at a tiled scale) on the region, given its gradient."""
        x, m, v, average = (t[..., rows, columns] for t in (self.x, self.m, self.v, self.average))
        beta1, beta2 = self.BETAS
        m.mul_(beta1).add_(gradient, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
        denominator = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(self.EPSILON)
        x.addcdiv_(m, denominator, value=-self.lr / (1 - beta1**step)).clamp_(0, 1)
        average_into(average, x, step, self.average_decay)


def average_into(average: torch.Tensor, x: torch.Tensor, step: int, decay: float) -> None:
    """The bias-corrected moving average after step number `step` (1-based), updated in place: at the first step
    the iterate itself."""
    average.lerp_(x, (1 - decay) / (1 - decay**step))
