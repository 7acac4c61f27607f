"""Optical flow between a clip's frames, where it is reliable, and moving a picture along it: what keeps a clip's
frames from flickering (engine.transfer_clip). The flow is OpenCV's DIS (dense inverse search): dense, fast on a
CPU (milliseconds at 256 px), and without learned weights.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

# Forward-backward consistency (Ruder, Dosovitskiy and Brox 2016, section 3.2): a pixel's flow is trusted where
# following it there and back returns near the start, and where the flow does not change abruptly.
CONSISTENCY = (0.01, 0.5)  # |f + b|² <= 0.01·(|f|² + |b|²) + 0.5 (px²)
MOTION_BOUNDARY = (0.01, 0.002)  # |∇b|² > 0.01·|b|² + 0.002


def grey(picture: torch.Tensor) -> np.ndarray:
    """A (1, 3, H, W) picture in [0, 1] as an 8-bit grey (H, W) array, what DIS flow takes."""
    y = 0.299 * picture[0, 0] + 0.587 * picture[0, 1] + 0.114 * picture[0, 2]
    return y.clamp(0, 1).mul(255).round().byte().cpu().numpy()


def optical_flow(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(H, W, 2) float32: where each pixel of `source` went in `target`, (dx, dy) in px: source(p) ≈ target(p +
    flow(p)). DIS at its "medium" preset, on grey 8-bit frames."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    return dis.calc(source, target, None)


def consistency_mask(backward: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """(H, W) float32, 1 where the flow of a frame back to the previous one (`backward`) is reliable: the previous
    frame's flow (`forward`) at where it points brings it back (else the pixel was occluded or disoccluded), it
    points inside the previous frame, and it is not at a motion boundary."""
    height, width = backward.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    to_x, to_y = xs + backward[..., 0], ys + backward[..., 1]
    forward_there = cv2.remap(forward, to_x, to_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    round_trip = np.square(backward + forward_there).sum(-1)
    lengths = np.square(backward).sum(-1) + np.square(forward_there).sum(-1)
    consistent = round_trip <= CONSISTENCY[0] * lengths + CONSISTENCY[1]
    inside = (to_x >= 0) & (to_x <= width - 1) & (to_y >= 0) & (to_y <= height - 1)
    gradient = sum(np.square(np.gradient(backward[..., c])).sum(0) for c in range(2))
    boundary = gradient > MOTION_BOUNDARY[0] * np.square(backward).sum(-1) + MOTION_BOUNDARY[1]
    return (consistent & inside & ~boundary).astype(np.float32)


def temporal_guide(previous: torch.Tensor, current: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For two consecutive (1, 3, H, W) input frames: the flow from `current` back to `previous` ((1, H, W, 2),
    for `warp`) and where it is reliable ((1, 1, H, W) of 0 and 1), on `current`'s device."""
    a, b = grey(previous), grey(current)
    backward, forward = optical_flow(b, a), optical_flow(a, b)
    mask = consistency_mask(backward, forward)
    return torch.from_numpy(backward)[None].to(current.device), torch.from_numpy(mask)[None, None].to(current.device)


def warp(picture: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """`picture` (N, C, H, W) moved along `flow` (N, H, W, 2) in px: out(p) = picture(p + flow(p)), bilinear,
    the border repeated where the flow points outside (such pixels are masked out)."""
    height, width = picture.shape[-2:]
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=flow.dtype, device=flow.device),
        torch.arange(width, dtype=flow.dtype, device=flow.device),
        indexing="ij",
    )
    x = (xs + flow[..., 0]) * 2 / max(width - 1, 1) - 1  # grid_sample's coordinates: -1 to 1 across the centres
    y = (ys + flow[..., 1]) * 2 / max(height - 1, 1) - 1
    grid = torch.stack([x, y], dim=-1).to(picture.dtype)
    return F.grid_sample(picture, grid, mode="bilinear", padding_mode="border", align_corners=True)


def flicker(previous: torch.Tensor, current: torch.Tensor, flow: torch.Tensor, mask: torch.Tensor) -> float:
    """How much two consecutive output frames differ where the input's flow is reliable: the mean absolute
    difference of `current` and `previous` warped along `flow` (current back to previous), over `mask`."""
    difference = (current - warp(previous, flow)).abs().mean(1, keepdim=True)
    return float((difference * mask).sum() / mask.sum().clamp_min(1))
