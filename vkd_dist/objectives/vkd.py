"""vkd: masked BCE on z ~ q(z|t), averaged over K samples (the mean of the log-likelihoods, not the likelihood
of the mean sample) + beta * KL(q || p) + prior_bce_weight * BCE on z ~ p(z|x).

Knobs (objective.*): image_bce=mean puts the image path's BCE on mu_p, the input inference reads, instead of on
K samples of p; detach_posterior=true makes the KL KL(stopgrad(q) || p), so the report path learns from its own
BCE only and the prior regresses onto its code; free_bits > 0 counts each latent dimension's batch-mean KL as at
least free_bits nats (Kingma et al., 2016), so dimensions under the floor get no gradient. "kl" logs the raw KL.
predictive_weight > 0 adds the posterior's predictive as a target for the image path on every study, labelled or
not: BCE(image path's logits, E_q[p(y|z)]) summed over labels, q's side detached. The KL moves the whole code
towards the report's; this moves what the labels read of it (the report path's opinion on each label).
distil_on=unlabelled puts both distillation terms (the KL and the predictive one) on the studies without labels
only, each still averaged over the whole batch: on a fully labelled batch the loss is bce + prior_bce_weight *
prior_bce, the supervised part.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vkd_dist.models.vkd import Gaussian, kl_per_dim
from vkd_dist.objectives.base import BOTH, MIXED, Objective, register
from vkd_dist.objectives.losses import beta_at, distilled_rows, masked_bce, row_mean


@register
class VKD(Objective):
    name = "vkd"
    model_mode = BOTH
    stochastic = True
    configurable_posterior = True
    learns_from = MIXED

    def __call__(self, model, batch, step):
        out = model(batch, mode=BOTH, num_samples=self.num_samples, prior_logits=self.cfg.image_bce)
        return self.terms(out, batch, step)

    def kl_term(self, q: Gaussian, p: Gaussian, rows: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the loss weighs by beta, the raw KL(q || p) averaged over the batch). `rows` (distil_on): the
        studies the first acts on; free bits then floor the mean over those rows, scaled by their share."""
        if self.cfg.detach_posterior:
            q = Gaussian(q.mu.detach(), q.logvar.detach())
        per_dim = kl_per_dim(q, p)  # [B, D]
        kl = per_dim.sum(-1).mean()
        if self.cfg.free_bits > 0:
            if rows is None:
                return per_dim.mean(0).clamp(min=self.cfg.free_bits).sum(), kl
            share = rows.mean()
            if share == 0:  # no study to distil on: no term, not a constant floor
                return per_dim.sum() * 0, kl
            per_dim_mean = (per_dim * rows[:, None]).sum(0) / rows.sum()
            return share * per_dim_mean.clamp(min=self.cfg.free_bits).sum(), kl
        return row_mean(per_dim.sum(-1), rows), kl

    def terms(self, out, batch, step):
        pw = self.pos_weight(batch.targets.device)
        bce = masked_bce(out.post_logits, batch.targets, batch.target_mask, pw)
        prior_bce = masked_bce(out.prior_logits, batch.targets, batch.target_mask, pw)
        rows = distilled_rows(batch, self.cfg.distil_on)
        kl_loss, kl = self.kl_term(out.posterior, out.prior, rows)
        beta = beta_at(step, self.cfg)
        loss = bce + beta * kl_loss + self.cfg.prior_bce_weight * prior_bce
        terms = {"bce": bce.detach(), "prior_bce": prior_bce.detach(), "kl": kl.detach(), "beta": torch.tensor(beta)}
        if self.cfg.predictive_weight > 0:
            pred = predictive_distillation(out.prior_logits, out.post_logits, rows)
            loss = loss + self.cfg.predictive_weight * pred
            terms["pred"] = pred.detach()
        return {"loss": loss, **terms}


def predictive_distillation(image_logits: torch.Tensor, report_logits: torch.Tensor,
                            rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """BCE of the image path's logits [K', B, L] against the report path's predictive E_q[p(y|z)] (the mean of
    its K samples' probabilities, detached): summed over labels, averaged over samples and studies (`rows`: the
    studies it acts on, the others counting 0)."""
    target = torch.sigmoid(report_logits.detach().float()).mean(0)
    logits = image_logits.float()
    per = F.binary_cross_entropy_with_logits(logits, target.expand_as(logits), reduction="none").sum(-1)
    return row_mean(per, rows)
