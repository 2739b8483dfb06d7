"""Model construction from the config: the encoders the objective needs (asked of the objective registry)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from vkd_dist.labels import NUM_LABELS
from vkd_dist.models.encoders import ImageEncoder, build_text_encoder
from vkd_dist.models.vkd import VKDModel
from vkd_dist.objectives import PAIRS, get_objective

if TYPE_CHECKING:
    from vkd_dist.config import Config


def build_model(cfg: Config, vocab_size: int, objective: Optional[str] = None, with_text: Optional[bool] = None,
                num_labels: int = NUM_LABELS) -> VKDModel:
    """`objective` defaults to the configured one; `num_labels` is the data set's label count. `with_text=False`
    builds the image-only deployable model, `with_text=True` the text path whatever the objective needs."""
    spec = get_objective(objective or cfg.objective.name)
    m = cfg.model
    image = ImageEncoder(m.image_encoder, cfg.data.image_size, m.in_chans, m.image_weights,
                         m.image_encoder_kwargs, m.gradient_checkpointing) if spec.needs_image() else None
    need_text = spec.needs_text() if with_text is None else with_text
    text = build_text_encoder(m, vocab_size) if need_text and not cfg.data.text_features else None
    text_dim = None
    if need_text and cfg.data.text_features:  # frozen-text fast path: features come precomputed
        from vkd_dist.data.text_features import feature_dim

        text_dim = feature_dim(cfg.data.text_features)
    model = VKDModel(image, text, latent_dim=m.latent_dim, hidden_dim=m.hidden_dim,
                     posterior=m.posterior if spec.configurable_posterior else "text", dropout=m.dropout,
                     text_dim=text_dim, num_labels=num_labels, image_head=m.image_head,
                     projection_dim=m.projection_dim if spec.model_mode == PAIRS and need_text else None)
    if spec.model_mode == PAIRS:  # the heads its loss never reads: DDP would wait for their gradients
        for head in (model.prior_head, model.posterior_head, model.classifier, model.image_classifier):
            if head is not None:
                head.requires_grad_(False)
    if m.freeze_image and model.image_encoder is not None:
        model.image_encoder.requires_grad_(False)
    if not spec.stochastic:  # deterministic objectives use the means only; keep DDP free of unused parameters
        for head in (model.prior_head, model.posterior_head):
            if head is not None:
                head.logvar.requires_grad_(False)
    return model
