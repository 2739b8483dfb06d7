"""Loss pieces the objectives share."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from vkd_dist.config import ObjectiveConfig
    from vkd_dist.data.pipeline import Batch


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
               pos_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Negative log-likelihood of the unmasked labels: summed over labels, averaged over the batch.

    Summing over labels keeps it on the ELBO's scale (log p(y|z) of a study is the sum over its labels),
    so beta weighs the KL against the whole study's likelihood, not against one label's. `logits` may carry
    a leading K axis [K, B, L]: the result is then the mean over the K samples of their log-likelihoods."""
    logits = logits.float()
    t = targets.float().expand_as(logits)
    m = mask.to(logits.dtype).expand_as(logits)
    per = F.binary_cross_entropy_with_logits(logits, t, pos_weight=pos_weight, reduction="none") * m
    return per.sum(-1).mean()


def distilled_rows(batch: Batch, distil_on: str) -> Optional[torch.Tensor]:
    """objective.distil_on: None (every study) for `all`; for `unlabelled`, a float [B] that is 1 on the studies
    without labels (Batch.labelled; a batch built without it: those with no unmasked label)."""
    if distil_on == "all":
        return None
    labelled = batch.labelled if batch.labelled is not None else batch.target_mask.any(-1)
    return (~labelled.bool()).float()


def row_mean(per_row: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """The mean of per-study values [..., B] over every axis, the studies outside `rows` counting as 0 (as
    masked_bce counts a study without labels): the batch's scale whichever studies a term acts on."""
    if rows is None:
        return per_row.mean()
    return (per_row * rows.to(per_row.dtype)).mean()


def beta_at(step: int, cfg: ObjectiveConfig) -> float:
    """Constant, linear warm-up, or cyclical annealing (Fu et al., 2019)."""
    if cfg.beta_schedule == "constant":
        return cfg.beta
    if cfg.beta_schedule == "warmup":
        return cfg.beta * min(1.0, step / max(1, cfg.beta_warmup_steps))
    phase = (step % cfg.beta_cycle_steps) / cfg.beta_cycle_steps
    return cfg.beta * min(1.0, phase / max(cfg.beta_cycle_ramp, 1e-8))
