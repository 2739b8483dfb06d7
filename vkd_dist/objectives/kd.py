"""kd: logit distillation from a trained text_only teacher (Hinton et al., 2015), the classic alternative to
VKD: (1 - alpha) * BCE(student, y) + alpha * T^2 * BCE(student / T, sigmoid(teacher / T))."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vkd_dist.objectives.base import IMAGE, TEXT, Objective, register
from vkd_dist.objectives.losses import masked_bce


@register
class LogitKD(Objective):
    name = "kd"
    model_mode = IMAGE
    needs_teacher = True

    def terms(self, out, batch, step):
        logits = out.prior_logits
        bce = masked_bce(logits, batch.targets, batch.target_mask, self.pos_weight(batch.targets.device))
        with torch.no_grad():
            teacher = self.teacher(batch, mode=TEXT).post_logits.float()
        temp, alpha = self.cfg.kd_temperature, self.cfg.kd_alpha
        # Distil on every label the report speaks to, masked or not: the teacher has an opinion on all.
        soft = F.binary_cross_entropy_with_logits(logits[0].float() / temp, torch.sigmoid(teacher[0] / temp),
                                                  reduction="none").sum(-1).mean()
        loss = (1 - alpha) * bce + alpha * temp**2 * soft
        return {"loss": loss, "bce": bce.detach(), "kd": soft.detach()}
