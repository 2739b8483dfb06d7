"""vkd: masked BCE on z ~ q(z|t), averaged over K samples (the mean of the log-likelihoods, not the likelihood
of the mean sample) + beta * KL(q || p) + prior_bce_weight * BCE on z ~ p(z|x).

Knobs (objective.*): image_bce=mean puts the image path's BCE on mu_p, the input inference reads, instead of on
K samples of p; detach_posterior=true makes the KL KL(stopgrad(q) || p), so the report path learns from its own
BCE only and the prior regresses onto its code; free_bits > 0 counts each latent dimension's batch-mean KL as at
least free_bits nats (Kingma et al., 2016), so dimensions under the floor get no gradient. "kl" logs the raw KL.
"""

from __future__ import annotations

import torch

from vkd_dist.models.vkd import Gaussian, kl_per_dim
from vkd_dist.objectives.base import BOTH, Objective, register
from vkd_dist.objectives.losses import beta_at, masked_bce


@register
class VKD(Objective):
    name = "vkd"
    model_mode = BOTH
    stochastic = True
    configurable_posterior = True

    def __call__(self, model, batch, step):
        out = model(batch, mode=BOTH, num_samples=self.num_samples, prior_logits=self.cfg.image_bce)
        return self.terms(out, batch, step)

    def kl_term(self, q: Gaussian, p: Gaussian) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the loss weighs by beta, the raw KL(q || p) averaged over the batch)."""
        if self.cfg.detach_posterior:
            q = Gaussian(q.mu.detach(), q.logvar.detach())
        per_dim = kl_per_dim(q, p)  # [B, D]
        kl = per_dim.sum(-1).mean()
        if self.cfg.free_bits > 0:
            return per_dim.mean(0).clamp(min=self.cfg.free_bits).sum(), kl
        return kl, kl

    def terms(self, out, batch, step):
        pw = self.pos_weight(batch.targets.device)
        bce = masked_bce(out.post_logits, batch.targets, batch.target_mask, pw)
        prior_bce = masked_bce(out.prior_logits, batch.targets, batch.target_mask, pw)
        kl_loss, kl = self.kl_term(out.posterior, out.prior)
        beta = beta_at(step, self.cfg)
        loss = bce + beta * kl_loss + self.cfg.prior_bce_weight * prior_bce
        return {"loss": loss, "bce": bce.detach(), "prior_bce": prior_bce.detach(), "kl": kl.detach(),
                "beta": torch.tensor(beta)}
