"""Projection heads for image-report contrastive pre-training (CLIP, Radford et al., 2021; ConVIRT, Zhang et al.,
2020): each encoder's pooled features go through a linear projection into one shared space, L2-normalised, and
a learned temperature scales their cosine similarities."""

from __future__ import annotations

import math

import torch
from torch import nn

# CLIP's initial temperature 0.07, and open_clip's ceiling on the scale (100): past it training destabilises.
INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100)


class ContrastiveHeads(nn.Module):
    def __init__(self, image_dim: int, text_dim: int, dim: int):
        super().__init__()
        self.image_proj = nn.Linear(image_dim, dim, bias=False)
        self.text_proj = nn.Linear(text_dim, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(unit image embeddings [B, dim], unit text embeddings [B, dim], the scale exp(logit_scale)). The scale
        is clamped in the forward pass (open_clip clamps the parameter after each step): the train loop stays
        the same for every objective, and past the ceiling the scale takes no gradient."""
        img = nn.functional.normalize(self.image_proj(image_features).float(), dim=-1)
        txt = nn.functional.normalize(self.text_proj(text_features.to(self.text_proj.weight.dtype)).float(), dim=-1)
        return img, txt, self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
