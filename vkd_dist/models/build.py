"""Model construction from the config: which encoders an objective needs, and loading exported weights."""

from __future__ import annotations

from vkd_dist.models.encoders import ImageEncoder, build_text_encoder
from vkd_dist.labels import NUM_LABELS
from vkd_dist.models.vkd import VKDModel

NEEDS_IMAGE = {"vkd": True, "image_only": True, "kd": True, "text_only": False}
NEEDS_TEXT = {"vkd": True, "image_only": False, "kd": False, "text_only": True}


def build_model(cfg, vocab_size: int, objective: str | None = None, with_text: bool | None = None,
                num_labels: int = NUM_LABELS) -> VKDModel:
    """`cfg` is the root Config; `num_labels` the data set's label count. `with_text=False` builds the
    image-only deployable model."""
    objective = objective or cfg.objective.name
    m = cfg.model
    image = ImageEncoder(m.image_encoder, cfg.data.image_size, m.in_chans, m.image_weights,
                         m.image_encoder_kwargs, m.gradient_checkpointing) if NEEDS_IMAGE[objective] else None
    need_text = NEEDS_TEXT[objective] if with_text is None else with_text
    text = build_text_encoder(m, vocab_size) if need_text and not cfg.data.text_features else None
    text_dim = None
    if need_text and cfg.data.text_features:  # frozen-text fast path: features come precomputed
        from vkd_dist.data.text_features import feature_dim

        text_dim = feature_dim(cfg.data.text_features)
    model = VKDModel(image, text, latent_dim=m.latent_dim, hidden_dim=m.hidden_dim,
                     posterior=m.posterior if objective == "vkd" else "text", dropout=m.dropout, text_dim=text_dim,
                     num_labels=num_labels)
    if objective != "vkd":  # deterministic baselines use the means only; keep DDP free of unused parameters
        for head in (model.prior_head, model.posterior_head):
            if head is not None:
                head.logvar.requires_grad_(False)
    return model
