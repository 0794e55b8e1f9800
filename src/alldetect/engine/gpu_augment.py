"""The training augmentations on whole batches on the device (`augment_on=gpu`), so loader workers only copy
bytes. Same probabilities as the CPU pipeline (aug.*), decided per image from a generator seeded per step."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from alldetect.config import AugConfig


class BatchAugment:
    """x: float N x 3 x S x S in [0, 1] -> augmented x (square images: rotations keep the shape)."""

    def __init__(self, aug: AugConfig):
        self.aug = aug

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        g = torch.Generator(device=x.device).manual_seed(seed % 2**63)
        n = len(x)

        def chosen(p: float) -> torch.Tensor:
            return torch.rand(n, generator=g, device=x.device) < p

        a = self.aug
        x = _where(chosen(a.rot90), torch.rot90(x, 1, (2, 3)), x)
        x = _where(chosen(a.rot270), torch.rot90(x, 3, (2, 3)), x)
        x = _where(chosen(a.hflip), x.flip(3), x)
        x = _where(chosen(a.vflip), x.flip(2), x)
        if a.rotate:
            angles = (torch.rand(n, generator=g, device=x.device) * 2 - 1) * math.radians(a.rotate_limit)
            x = _where(chosen(a.rotate), rotate(x, angles, reflect=a.border == "reflect"), x)
        if a.color_jitter:
            x = _where(chosen(a.color_jitter), _jitter(x, g, a.jitter_strength), x)
        return x


def _where(mask: torch.Tensor, yes: torch.Tensor, no: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), yes, no)


def rotate(x: torch.Tensor, angles: torch.Tensor, fill: torch.Tensor | None = None,
           reflect: bool = False) -> torch.Tensor:
    """Rotation by any angle (radians, one per image) about the centre, bilinear; the corners fill with zeros, or
    with `fill` (1 x C x 1 x 1: the value of black in normalised images), like the cell's black background, or
    (reflect) with the image mirrored at its edges, for full-frame images."""
    if fill is not None and not reflect:
        return rotate(x - fill, angles) + fill
    cos, sin = torch.cos(angles), torch.sin(angles)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection" if reflect else "zeros",
                         align_corners=False)


def _jitter(x: torch.Tensor, g: torch.Generator, strength: float) -> torch.Tensor:
    """Brightness, contrast and saturation by up to `strength` each, as the CPU pipeline's ColorJitter."""
    n = len(x)

    def factor() -> torch.Tensor:
        return (1 + (torch.rand(n, generator=g, device=x.device) * 2 - 1) * strength).view(-1, 1, 1, 1)

    grey = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = x * factor()
    x = (x - grey.mean((2, 3), keepdim=True)) * factor() + grey.mean((2, 3), keepdim=True)
    x = (x - grey) * factor() + grey
    return x.clamp(0, 1)
