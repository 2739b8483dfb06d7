"""The baselines VKD is measured against: the same encoders and classifier, one path, no latent sampling.

image_only  masked BCE on the prior mean (same image backbone, no report)
text_only   masked BCE on the posterior mean (the text teacher; an upper bound that reads the report)
"""

from __future__ import annotations

from vkd_dist.objectives.base import IMAGE, TEXT, Objective, register
from vkd_dist.objectives.losses import masked_bce


@register
class ImageOnly(Objective):
    name = "image_only"
    model_mode = IMAGE

    def terms(self, out, batch, step):
        bce = masked_bce(out.prior_logits, batch.targets, batch.target_mask, self.pos_weight(batch.targets.device))
        return {"loss": bce, "bce": bce.detach()}


@register
class TextOnly(Objective):
    name = "text_only"
    model_mode = TEXT
    inference = TEXT

    def terms(self, out, batch, step):
        bce = masked_bce(out.post_logits, batch.targets, batch.target_mask, self.pos_weight(batch.targets.device))
        return {"loss": bce, "bce": bce.detach()}
