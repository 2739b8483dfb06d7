"""CXR training augmentation, applied batch-wise on the device after the loader.

Small rotation, scale and translation (one `grid_sample` per batch, zeros outside the image like a PIL
affine), an optional horizontal flip (off by default: laterality matters in chest X-rays), then
brightness/contrast around each image's mean. The loader workers only decode, so the data pipeline runs at
the decode rate and the augmentation costs a fraction of a millisecond per batch on a GPU.

Parameters are drawn from a generator seeded by (seed, rank, micro-batch index), so a resumed run that
continues at the same micro-batch augments exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from vkd_dist.config import DataConfig


class BatchAugment:
    """`augment(batch, index)` -> the batch with its image augmented: float [B, 1, S, S] in 0..255."""

    def __init__(self, cfg: DataConfig, seed: int = 0, rank: int = 0):
        self.enabled = cfg.augment
        self.rotate, self.translate, self.scale = math.radians(cfg.max_rotate_deg), cfg.max_translate, cfg.scale_range
        self.brightness, self.contrast, self.hflip = cfg.brightness, cfg.contrast, cfg.hflip
        self.seed, self.rank = seed, rank

    def generator(self, index: int) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, self.rank, index]).generate_state(2, dtype=np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def params(self, n: int, index: int) -> dict[str, torch.Tensor]:
        """Per-sample parameters (CPU, fp32), uniform within the configured ranges."""
        g = self.generator(index)

        def uniform(half_width: float, centre: float = 0.0) -> torch.Tensor:
            return centre + half_width * (2 * torch.rand(n, generator=g) - 1)

        flip = torch.rand(n, generator=g) < 0.5 if self.hflip else torch.zeros(n, dtype=torch.bool)
        return {"angle": uniform(self.rotate), "scale": uniform(self.scale, 1.0),
                "shift": torch.stack([uniform(self.translate), uniform(self.translate)], 1),
                "flip": flip, "contrast": uniform(self.contrast, 1.0), "brightness": uniform(self.brightness)}

    def __call__(self, batch, index: int):
        if not self.enabled:
            return batch
        p = {k: v.to(batch.image.device, non_blocking=True) for k, v in self.params(len(batch), index).items()}
        return replace(batch, image=apply(batch.image, **p))


def affine_theta(angle: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """[B, 2, 3] for `affine_grid`: the output at normalised point p samples the input at
    F R(-angle) (p - 2 shift) / scale, i.e. the image is flipped (F), rotated by `angle` (counter-clockwise as
    displayed), scaled by `scale` about its centre and moved by `shift` (fractions of its side; +x right,
    +y down)."""
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    sign = 1.0 - 2.0 * flip.to(angle.dtype)
    m = torch.stack([torch.stack([sign * cos, sign * -sin], 1), torch.stack([sin, cos], 1)], 1)  # [B, 2, 2]
    offset = -(m @ (2 * shift).unsqueeze(-1))
    return torch.cat([m, offset], 2)


def apply(image: torch.Tensor, angle, scale, shift, flip, contrast, brightness) -> torch.Tensor:
    """uint8 or float [B, C, H, W] (0..255) -> float [B, C, H, W] (0..255)."""
    x = image.float()
    theta = affine_theta(angle.float(), scale.float(), shift.float(), flip)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    c, b = contrast.float().view(-1, 1, 1, 1), brightness.float().view(-1, 1, 1, 1) * 255
    return ((x - mean) * c + mean + b).clamp_(0, 255)
