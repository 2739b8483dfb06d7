"""kd: logit distillation from a trained text_only teacher (Hinton et al., 2015), the classic alternative to
VKD: (1 - alpha) * BCE(student, y) + alpha * T^2 * BCE(student / T, sigmoid(teacher / T)).

objective.distil_on=unlabelled puts the soft targets on the studies without labels only, and the labelled ones
learn from their labels alone at full weight: BCE(student, y) + alpha * T^2 * soft(unlabelled studies), each
averaged over the whole batch. With T = 1 and alpha = 1 that is pseudo-labelling with the teacher's
probabilities as soft labels; on a fully labelled batch it is the supervised BCE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vkd_dist.objectives.base import IMAGE, MIXED, TEXT, Objective, register
from vkd_dist.objectives.losses import distilled_rows, masked_bce, row_mean


@register
class LogitKD(Objective):
    name = "kd"
    model_mode = IMAGE
    needs_teacher = True
    learns_from = MIXED

    def terms(self, out, batch, step):
        logits = out.prior_logits
        bce = masked_bce(logits, batch.targets, batch.target_mask, self.pos_weight(batch.targets.device))
        with torch.no_grad():
            teacher = self.teacher(batch, mode=TEXT).post_logits.float()
        temp, alpha = self.cfg.kd_temperature, self.cfg.kd_alpha
        # Distil on every label the report speaks to, masked or not: the teacher has an opinion on all.
        per_study = F.binary_cross_entropy_with_logits(logits[0].float() / temp, torch.sigmoid(teacher[0] / temp),
                                                       reduction="none").sum(-1)
        rows = distilled_rows(batch, self.cfg.distil_on)
        soft = row_mean(per_study, rows)
        label_weight = 1.0 if rows is not None else 1 - alpha
        loss = label_weight * bce + alpha * temp**2 * soft
        return {"loss": loss, "bce": bce.detach(), "kd": soft.detach()}
