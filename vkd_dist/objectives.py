"""Objectives: each maps (model, batch, step) to named loss terms; the train loop only sums and logs them.

vkd         masked BCE on z ~ q(z|t), averaged over K samples (the mean of the log-likelihoods, not the
            likelihood of the mean sample) + beta * KL(q || p) + prior_bce_weight * BCE on z ~ p(z|x)
image_only  masked BCE on the prior mean (same image backbone, no report)
text_only   masked BCE on the posterior mean (the text teacher; an upper bound)
kd          (1 - alpha) * BCE(student, y) + alpha * T^2 * BCE(student / T, sigmoid(teacher / T)),
            the teacher being a trained text_only model
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vkd_dist.models.vkd import kl_diag_gaussians

MODEL_MODE = {"vkd": "vkd", "image_only": "image", "kd": "image", "text_only": "text"}


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


def beta_at(step: int, cfg) -> float:
    """`cfg` is an ObjectiveConfig: constant, linear warm-up, or cyclical annealing (Fu et al., 2019)."""
    if cfg.beta_schedule == "constant":
        return cfg.beta
    if cfg.beta_schedule == "warmup":
        return cfg.beta * min(1.0, step / max(1, cfg.beta_warmup_steps))
    phase = (step % cfg.beta_cycle_steps) / cfg.beta_cycle_steps
    return cfg.beta * min(1.0, phase / max(cfg.beta_cycle_ramp, 1e-8))


class Objective:
    def __init__(self, cfg, num_samples: int, teacher: Optional[torch.nn.Module] = None):
        self.cfg, self.num_samples, self.teacher = cfg, num_samples, teacher
        self.name = cfg.name
        self.mode = MODEL_MODE[cfg.name]
        self._pos_weight = torch.tensor(cfg.pos_weight, dtype=torch.float32) if cfg.pos_weight else None

    def pos_weight(self, device) -> Optional[torch.Tensor]:
        return None if self._pos_weight is None else self._pos_weight.to(device)

    def __call__(self, model, batch, step: int) -> dict[str, torch.Tensor]:
        out = model(batch, mode=self.mode, num_samples=self.num_samples)
        pw = self.pos_weight(batch.targets.device)
        if self.name == "vkd":
            bce = masked_bce(out.post_logits, batch.targets, batch.target_mask, pw)
            prior_bce = masked_bce(out.prior_logits, batch.targets, batch.target_mask, pw)
            kl = kl_diag_gaussians(out.posterior, out.prior).mean()
            beta = beta_at(step, self.cfg)
            loss = bce + beta * kl + self.cfg.prior_bce_weight * prior_bce
            return {"loss": loss, "bce": bce.detach(), "prior_bce": prior_bce.detach(), "kl": kl.detach(),
                    "beta": torch.tensor(beta)}
        logits = out.prior_logits if self.mode == "image" else out.post_logits
        bce = masked_bce(logits, batch.targets, batch.target_mask, pw)
        if self.name != "kd":
            return {"loss": bce, "bce": bce.detach()}
        with torch.no_grad():
            teacher = self.teacher(batch, mode="text").post_logits.float()
        temp, alpha = self.cfg.kd_temperature, self.cfg.kd_alpha
        # Distil on every label the report speaks to, masked or not: the teacher has an opinion on all.
        soft = F.binary_cross_entropy_with_logits(logits[0].float() / temp, torch.sigmoid(teacher[0] / temp),
                                                  reduction="none").sum(-1).mean()
        loss = (1 - alpha) * bce + alpha * temp ** 2 * soft
        return {"loss": loss, "bce": bce.detach(), "kd": soft.detach()}
