"""The objective: content, style and total-variation losses, and their balance for each kind of weights.

With torchvision's ImageNet VGG19 the objective is the published one of the reference implementation
style-transfer-pytorch, which was tuned with exactly those weights:
- content: mean squared error between the output's and the photo's relu4_2 activations;
- style: at each style layer, the squared 2-Wasserstein distance between Gaussians fitted to the output's
  and the style's activations (per-channel mean and covariance over positions), layers weighted 256:64:16:4:1;
- total variation: mean of dx² + dy² with forward differences (zero at the last row and column);
- total = 0.015·content + style + 2·tv.
All statistics are computed in float32 (features from a reduced-precision network are cast up first).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .settings import Settings, SettingsError
from .vgg import stride


@dataclass(frozen=True)
class Balance:
    """What strength 1 means for one kind of weights: the weight of each term, and of each style layer."""

    content: float
    style_layers: dict[str, float]  # sums to 1
    tv: float
    temporal: float  # a clip's later frames: the squared difference to the warped previous one (see TEMPORAL)


def _normalised(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {name: weight / total for name, weight in weights.items()}


# A clip's temporal loss is measured in units of the frame's objective at its first step (objective.py), so one
# weight gives the same look with every kind of features: 100 makes a mean squared difference of 0.01 (an RMS of
# 0.1 on pixels in [0, 1]) cost as much as the whole objective did at the start of the frame.
TEMPORAL = 100.0
REFERENCE = Balance(
    content=0.015,
    tv=2.0,
    temporal=TEMPORAL,
    style_layers=_normalised({"relu1_1": 256, "relu2_1": 64, "relu3_1": 16, "relu4_1": 4, "relu5_1": 1}),
)
BALANCES = {
    "imagenet": REFERENCE,
    # vgg.py puts a Caffe-converted network's activations on torchvision's scale, so the reference balance holds.
    "caffe": REFERENCE,
    # Untrained features: tuned here by looking (bench/contact_sheet.py and bench/README.md) for the most texture
    # that keeps the photo readable. Their activations, and so the style and content terms, are some hundred
    # times smaller than trained ones, while total variation is measured on the picture itself.
    "untrained": Balance(content=4.0, tv=0.02, temporal=TEMPORAL, style_layers=REFERENCE.style_layers),
}


def style_layer_weights(settings: Settings, balance: Balance) -> dict[str, float]:
    """Each style layer's share of the style loss: the settings' own weights, else the balance's; summing to 1."""
    if settings.style_layer_weights:
        weights = dict(zip(settings.style_layers, settings.style_layer_weights, strict=True))
    else:
        unknown = [name for name in settings.style_layers if name not in balance.style_layers]
        if unknown:
            raise SettingsError(
                f"Give style_layer_weights for the style layers {', '.join(unknown)}: "
                "the loss balance has weights for relu1_1 to relu5_1 only."
            )
        weights = {name: balance.style_layers[name] for name in settings.style_layers}
    total = sum(weights.values())
    if total <= 0:
        raise SettingsError("At least one style layer weight must be above zero.")
    return {name: weight / total for name, weight in weights.items()}


class _SymmetricProduct(torch.autograd.Function):
    """A·Aᵀ for a (C, n) matrix A. The product is symmetric, so its gradient is (dG + dGᵀ)·A: one matrix
    product where autograd's generic rule for A·B takes two."""

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a)
        return a @ a.T

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (a,) = ctx.saved_tensors
        return (grad + grad.T) @ a


def gram(a: torch.Tensor) -> torch.Tensor:
    """A·Aᵀ of a (C, n) matrix."""
    return _SymmetricProduct.apply(a)


class _TraceSqrt(torch.autograd.Function):
    """tr(M^½) of a symmetric positive semi-definite matrix M, from its eigenvalues.

    The eigendecomposition runs in float64: the square root of an eigenvalue near zero magnifies round-off, and
    the many small eigenvalues of a float32 M, taken in float32, put the loss 0.1-0.5% off (bench/README.md).
    Eigenvalues below float64's round-off (relative to the largest) count as zero. The gradient is ½·M^-½ on the
    rest and zero on the null space, where the square root has no derivative (a pseudo-inverse).
    """

    @staticmethod
    def forward(ctx, m: torch.Tensor) -> torch.Tensor:
        values, vectors = torch.linalg.eigh(m.double())
        kept = values > values[-1].clamp_min(0) * m.shape[-1] * torch.finfo(torch.float64).eps
        roots = torch.where(kept, values, 0).sqrt()
        ctx.save_for_backward(vectors, torch.where(kept, 0.5 / roots, 0))
        return roots.sum().to(m.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        vectors, half_inverse_roots = ctx.saved_tensors
        return grad * ((vectors * half_inverse_roots) @ vectors.T).to(grad.dtype)


class _TraceSqrtNewtonSchulz(torch.autograd.Function):
    """tr(M^½) by coupled Newton-Schulz iterations, as the reference does: only matrix products, which a GPU runs
    far faster than an eigendecomposition (cuSOLVER's `eigh` also waits for the host). M is divided by its trace
    first, so every eigenvalue lies in [0, 1], where the iterations converge; Y tends to (M/t)^½ and Z to
    (M/t)^-½, which gives the gradient ½·M^-½ for free. Eigenvalues far below the largest converge last and
    stay damped, which acts as the pseudo-inverse does on the null space. bench/gpu.sh prints its error and time
    against `_TraceSqrt`."""

    ITERATIONS = 25

    @staticmethod
    def forward(ctx, m: torch.Tensor) -> torch.Tensor:
        dtype, m = m.dtype, m.double()  # float32 products lose the small eigenvalues (bench/README.md)
        scale = m.trace().clamp_min(torch.finfo(m.dtype).tiny)
        identity = torch.eye(m.shape[-1], device=m.device, dtype=m.dtype)
        y, z = m / scale, identity
        for _ in range(_TraceSqrtNewtonSchulz.ITERATIONS):
            t = 1.5 * identity - 0.5 * (z @ y)
            y, z = y @ t, t @ z
        ctx.save_for_backward((z + z.T) / (4 * scale.sqrt()))
        return (y.trace() * scale.sqrt()).to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (half_inverse_root,) = ctx.saved_tensors
        return grad * half_inverse_root.to(grad.dtype)


# How tr(M^½) is taken on each kind of device, chosen by measurement (bench/step_time.py on a CPU, bench/gpu.sh
# on a GPU): the float64 eigendecomposition where it is fast, the reference's matrix-product iterations on GPUs.
TRACE_SQRT = {"cuda": _TraceSqrtNewtonSchulz}


def trace_sqrt(m: torch.Tensor) -> torch.Tensor:
    """tr(M^½) of a symmetric positive semi-definite matrix, with its gradient, by the device's method."""
    return TRACE_SQRT.get(m.device.type, _TraceSqrt).apply(m)


def sqrtm(m: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (in float64, as above)."""
    values, vectors = torch.linalg.eigh(m.double())
    return ((vectors * values.clamp_min(0).sqrt()) @ vectors.T).to(m.dtype)


@dataclass(frozen=True)
class Gaussian:
    """Per-channel mean (C,) and covariance (C, C) of a layer's activations over positions."""

    mean: torch.Tensor
    cov: torch.Tensor


class _Moments(torch.autograd.Function):
    """Per-channel mean (C,) and covariance (C, C) of (1, C, H, W) features over their n positions, each position
    weighted by `share` (n,), summing to 1, or equally when it is None.

    Written out because autograd's generic rules for the centring, the product and the mean make a dozen passes
    over the features, which at relu1_1 are hundreds of MB: most of the style loss's cost (bench/README.md).
    Here the forward makes one centred copy and one product, the backward one product. The gradient has no term
    through the mean: the weighted centred features sum to zero, so moving the mean leaves the covariance as it
    is. Products run on the positions × channels side, a view of channels-last features (what vgg.py returns)."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, share: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        mean, centred = _centred(features, share)
        if share is None:
            cov = centred @ centred.T / centred.shape[1]
        else:
            cov = (centred * share) @ centred.T
        ctx.save_for_backward(centred, share)
        ctx.features = (features.shape, features.dtype)
        return mean, cov

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor, grad_cov: torch.Tensor) -> tuple[torch.Tensor, None]:
        centred, share = ctx.saved_tensors
        shape, dtype = ctx.features
        both_sides = grad_cov + grad_cov.T
        if share is None:  # 1/n folded into the small matrices: no extra pass over the big one
            positions = centred.shape[1]
            rows = torch.addmm(grad_mean[None, :] / positions, centred.T, both_sides / positions)
        else:
            rows = torch.addmm(grad_mean[None, :], centred.T, both_sides).mul_(share[:, None])
        return rows.T.reshape(shape).to(dtype), None  # (n, C) rows are channels-last features


def _centred(features: torch.Tensor, share: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted mean of (1, C, H, W) features over positions, (C,), and the features less it, (C, n)."""
    # (C, n): a view in either memory format (vgg.py's channels-last, or MPS's contiguous one). A crop of them (a
    # statistics pass's piece) is copied in its own order: a channels-last one copied channel by channel made its
    # statistics take 1.8x as long.
    if features.stride(1) == 1:  # channels-last
        flat = features[0].permute(1, 2, 0).reshape(-1, features.shape[1]).T
    else:
        flat = features[0].flatten(1)
    flat = _at_least_float32(flat)
    mean = flat.mean(1) if share is None else flat @ share
    return mean, flat - mean[:, None]


def _share(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A (1, 1, H, W) mask as each position's share of the statistics, summing to 1."""
    if mask is None:
        return None
    share = _at_least_float32(mask.flatten())
    return share / share.sum().clamp_min(1e-12)


def gaussian(features: torch.Tensor, mask: torch.Tensor | None = None) -> Gaussian:
    """The Gaussian of (1, C, H, W) features over positions, weighted by a (1, 1, H, W) mask where given."""
    return Gaussian(*_Moments.apply(features, _share(mask)))


def mixture(parts: list[Gaussian], shares: list[float]) -> Gaussian:
    """The mean and covariance of a mixture: how several style images blend by weight."""
    total = sum(shares)
    mean = sum(share / total * part.mean for part, share in zip(parts, shares, strict=True))
    cov = sum(
        share / total * (part.cov + torch.outer(part.mean - mean, part.mean - mean))
        for part, share in zip(parts, shares, strict=True)
    )
    return Gaussian(mean, cov)


@dataclass(frozen=True)
class StyleTarget:
    """A style Gaussian with what the loss needs of it, computed once per scale."""

    mean: torch.Tensor
    cov_sqrt: torch.Tensor
    cov_trace: torch.Tensor

    @classmethod
    def of(cls, target: Gaussian) -> StyleTarget:
        return cls(target.mean, sqrtm(target.cov), target.cov.trace())


def style_loss(features: torch.Tensor, target: StyleTarget, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Squared 2-Wasserstein distance between the Gaussians of `features` and of the style:
    mean_c((μ - μₛ)²) + tr(Σ + Σₛ - 2(Σₛ^½ Σ Σₛ^½)^½) / C.

    With Σ = X·Xᵀ for the centred features X (C, n), the square root's trace is that of (Aᵀ·A)^½ for
    A = Σₛ^½·X, so it is taken on the smaller of the C×C and n×n matrices: deep layers at small scales
    have far fewer positions than channels.
    """
    channels, positions = features.shape[1], features[0, 0].numel()
    if positions >= channels:
        stats = gaussian(features, mask)
        mean, inner, spread = stats.mean, target.cov_sqrt @ stats.cov @ target.cov_sqrt, stats.cov.trace()
    else:  # few positions: autograd's generic rules cost little, and the covariance is never formed
        share = _share(mask)
        mean, centred = _centred(features, share)
        centred = centred * (share.sqrt() if share is not None else positions**-0.5)
        inner = gram((target.cov_sqrt @ centred).T)
        spread = centred.square().sum()
    cov_term = spread + target.cov_trace - 2 * trace_sqrt(inner)
    return (mean - target.mean).square().mean() + cov_term / channels


def gaussian_style_loss(stats: Gaussian, target: StyleTarget) -> torch.Tensor:
    """`style_loss` of features whose Gaussian is already known (a tiled picture's, gathered in pieces)."""
    inner = target.cov_sqrt @ stats.cov @ target.cov_sqrt
    cov_term = stats.cov.trace() + target.cov_trace - 2 * trace_sqrt(inner)
    return (stats.mean - target.mean).square().mean() + cov_term / stats.mean.shape[0]


def content_loss(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over channels and positions."""
    return (_at_least_float32(features) - _at_least_float32(target)).square().mean()


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Statistics in float32 (or float64 where given): bfloat16 and float16 lack the digits."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def tv_loss(image: torch.Tensor) -> torch.Tensor:
    """Mean over channels and pixels of dx² + dy², forward differences (zero at the last row and column)."""
    dx = torch.nn.functional.pad(image[..., :, 1:] - image[..., :, :-1], (0, 1, 0, 0))
    dy = torch.nn.functional.pad(image[..., 1:, :] - image[..., :-1, :], (0, 0, 0, 1))
    return (dx.square() + dy.square()).mean()


CELL = 16  # relu5_1's stride: crops cut on multiples of it line up with the whole picture's positions at every layer
STATISTICS_MARGIN = 64  # px of context around a piece whose statistics are taken (more is free: no gradients)


def piece_shapes(size: tuple[int, int], side: int) -> list[tuple[int, int]]:
    """The (width, height) a (width, height) picture's pieces may have, none more than side² px: the square, or a
    strip across the picture, one side uncut. Memory follows a piece's pixels, not its shape, and the shape that
    computes the fewest margins wins: 1024 x 539 px in 512 px squares runs 1.26 of its pixels, in strips as tall
    as it 1.12."""
    width, height = size
    area = side * side
    return [(side, side), (max(1, area // height), height), (width, max(1, area // width))]


def piece_grid(size: tuple[int, int], tile: int) -> list[tuple[slice, slice, slice, slice]]:
    """(rows, columns, seen rows, seen columns) of the pieces a picture's statistics are taken in: cores on whole
    cells covering the picture once, each seen with STATISTICS_MARGIN px of context, none more than tile² px (one
    piece, the whole, where it fits or `tile` is 0), shaped as `piece_shapes` allows to see the fewest pixels. A side
    that fits in a piece is not cut, and one that does not into the fewest cores that cover it (cut every core's
    side from the top left, 1024 x 768 px in 768 px pieces ran 1.31 times the picture's pixels; now 1.13 times)."""
    width, height = size
    if not tile or width * height <= tile * tile:
        return [(slice(0, height), slice(0, width)) * 2]

    def cuts(length: int, piece: int) -> list[slice]:
        core = max(CELL, (piece - 2 * STATISTICS_MARGIN) // CELL * CELL)
        return [slice(0, length)] if length <= piece else even_cuts(length, -(-length // core))

    def seen(span: slice, length: int) -> slice:
        return slice(max(0, span.start - STATISTICS_MARGIN), min(length, span.stop + STATISTICS_MARGIN))

    def pieces(shape: tuple[int, int]) -> list[tuple[slice, slice, slice, slice]]:
        return [
            (rows, columns, seen(rows, height), seen(columns, width))
            for rows in cuts(height, shape[1])
            for columns in cuts(width, shape[0])
        ]

    def pixels(grid: list[tuple[slice, slice, slice, slice]]) -> int:
        return sum((rows.stop - rows.start) * (columns.stop - columns.start) for _, _, rows, columns in grid)

    return min((pieces(shape) for shape in piece_shapes(size, tile)), key=pixels)


def even_cuts(length: int, count: int, shift: int = 0) -> list[slice]:
    """A side `length` px long cut into `count` cores of about the same size on whole cells, their inner borders
    moved by `shift` cells."""
    cells = -(-length // CELL)
    bounds = [0, *(CELL * (i * cells // count + shift) for i in range(1, count)), length]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def at_layer(features: torch.Tensor, rows: slice, columns: slice, step: int) -> torch.Tensor:
    """The positions of a map of stride `step` that lie under `rows` x `columns` px of the picture it was made of:
    cuts on whole cells, and the partial last cell where the picture ends (VGG19 pools in ceil mode)."""
    return features[..., rows.start // step : -(-rows.stop // step), columns.start // step : -(-columns.stop // step)]


def feature_pieces(
    vgg: torch.nn.Module, crop: Callable[[slice, slice], torch.Tensor], size: tuple[int, int], tile: int
) -> Iterator[tuple[slice, slice, dict[str, torch.Tensor]]]:
    """VGG19's features of a (width, height) picture in pieces (`piece_grid`), without gradients: (rows, columns,
    features) of each piece's core, its features cut to the core so that every position counts once.
    `crop(rows, columns)` gives the picture's pixels there."""
    for rows, columns, seen_rows, seen_columns in piece_grid(size, tile):
        with torch.no_grad():  # never around a yield: it would turn gradients off for the caller too
            features = vgg(crop(seen_rows, seen_columns))
        core_rows = slice(rows.start - seen_rows.start, rows.stop - seen_rows.start)
        core_columns = slice(columns.start - seen_columns.start, columns.stop - seen_columns.start)
        yield rows, columns, {name: at_layer(f, core_rows, core_columns, stride(name)) for name, f in features.items()}


class GaussianSums:
    """The Gaussians of a picture taken in pieces, per layer: each piece's Gaussian (centred, as a whole picture's
    is) merged into a running weight, mean and scatter (Σ w·(f - mean)(f - mean)ᵀ) in float64 by the pairwise update
    of means and scatters. Summing raw products instead needs float64 features (a sum over millions of positions
    less the mean's product): two more copies of each piece's features and a float64 product, twice the time (at
    1184 px, a fifth of the statistics pass)."""

    def __init__(self) -> None:
        self.sums: dict[str, tuple[float, torch.Tensor, torch.Tensor]] = {}  # name -> (weight, mean, scatter)

    def add(self, name: str, features: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """A piece's (1, C, h, w) features, weighted by a (1, 1, h, w) mask where given."""
        channels = features.shape[1]
        zero = features.new_zeros(channels, dtype=torch.float64)
        total, mean, scatter = self.sums.setdefault(name, (0.0, zero, torch.outer(zero, zero)))
        weight = features[0, 0].numel() if mask is None else float(mask.sum())
        if weight == 0:  # no position of the piece counts
            return
        part = gaussian(features, mask)
        apart, merged = part.mean.double() - mean, total + weight
        self.sums[name] = (
            merged,
            mean + apart * (weight / merged),
            scatter + weight * part.cov.double() + torch.outer(apart, apart) * (total * weight / merged),
        )

    def weight(self, name: str) -> torch.Tensor:
        """The total weight of a layer's positions: how many there are, or the mask's sum."""
        return torch.as_tensor(self.sums[name][0], dtype=torch.float32)

    def gaussians(self) -> dict[str, Gaussian]:
        return {
            name: Gaussian(mean.float(), (scatter / max(weight, 1e-12)).float())
            for name, (weight, mean, scatter) in self.sums.items()
        }


@torch.no_grad()
def tiled_gaussians(vgg: torch.nn.Module, image: torch.Tensor, layers: list[str], tile: int) -> dict[str, Gaussian]:
    """Gaussians of an image's activations; where it is bigger than `tile`, summed over pieces that see a margin
    of context around them, so that memory follows the tile and every position counts once, as in the whole."""
    height, width = image.shape[-2:]
    if not tile or height * width <= tile * tile:
        features = vgg(image)
        return {name: gaussian(features[name]) for name in layers}
    sums = GaussianSums()
    for _, _, features in feature_pieces(vgg, lambda rows, columns: image[..., rows, columns], (width, height), tile):
        for name in layers:
            sums.add(name, features[name])
    return sums.gaussians()
