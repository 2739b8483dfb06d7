"""contrastive: image-report pre-training with the symmetric InfoNCE of CLIP / ConVIRT on every pair, labels
unused. Each study's image should pick its own report out of the batch's reports, and each report its own image:
the mean of the two cross-entropies over the scaled cosine similarities (projection heads and a learned
temperature: vkd_dist/models/contrastive.py). The negatives are the other studies of the same process's batch.

It pre-trains encoders: its own image path's classifier is never trained, so its validation scores are chance.
A run with model.init_from=THIS_RUN starts from its encoders and learns the labels (fine-tuning, or a linear
probe with model.freeze_image=true)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vkd_dist.objectives.base import PAIRED, PAIRS, Objective, register


@register
class Contrastive(Objective):
    name = "contrastive"
    model_mode = PAIRS
    learns_from = PAIRED

    def terms(self, out, batch, step):
        loss = info_nce(out.image_embed, out.text_embed, out.logit_scale)
        return {"loss": loss, "info_nce": loss.detach(), "logit_scale": out.logit_scale.detach()}


def info_nce(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of unit embeddings [B, D]: pair i is the right answer in row i and in column i."""
    logits = scale * image @ text.T
    target = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
