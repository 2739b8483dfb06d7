"""vkd: masked BCE on z ~ q(z|t), averaged over K samples (the mean of the log-likelihoods, not the likelihood
of the mean sample) + beta * KL(q || p) + prior_bce_weight * BCE on z ~ p(z|x)."""

from __future__ import annotations

import torch

from vkd_dist.models.vkd import kl_diag_gaussians
from vkd_dist.objectives.base import BOTH, Objective, register
from vkd_dist.objectives.losses import beta_at, masked_bce


@register
class VKD(Objective):
    name = "vkd"
    model_mode = BOTH
    stochastic = True
    configurable_posterior = True

    def terms(self, out, batch, step):
        pw = self.pos_weight(batch.targets.device)
        bce = masked_bce(out.post_logits, batch.targets, batch.target_mask, pw)
        prior_bce = masked_bce(out.prior_logits, batch.targets, batch.target_mask, pw)
        kl = kl_diag_gaussians(out.posterior, out.prior).mean()
        beta = beta_at(step, self.cfg)
        loss = bce + beta * kl + self.cfg.prior_bce_weight * prior_bce
        return {"loss": loss, "bce": bce.detach(), "prior_bce": prior_bce.detach(), "kl": kl.detach(),
                "beta": torch.tensor(beta)}
