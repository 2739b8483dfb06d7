"""The VKD model: prior p(z|x) from the image, posterior q(z|t) or q(z|x,t) from the report, one classifier
p(y|z) shared by both paths. Diagonal Gaussians, reparameterised samples, analytic KL(q || p).

Image-only prediction (`predict`) takes images alone: the deployed model never sees a report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from vkd_dist.labels import NUM_LABELS
from vkd_dist.models.encoders import ImageEncoder, TextEncoder


@dataclass
class Gaussian:
    mu: torch.Tensor  # [B, D]
    logvar: torch.Tensor  # [B, D]; log sigma^2 (never used as a standard deviation)

    def sample(self, k: int) -> torch.Tensor:
        """K reparameterised samples [K, B, D]: mu + exp(logvar / 2) * eps."""
        eps = torch.randn((k, *self.mu.shape), dtype=self.mu.dtype, device=self.mu.device)
        return self.mu + torch.exp(0.5 * self.logvar) * eps


def kl_per_dim(q: Gaussian, p: Gaussian) -> torch.Tensor:
    """KL(q || p) per sample and latent dimension [B, D], computed in fp32."""
    mq, lq, mp, lp = (t.float() for t in (q.mu, q.logvar, p.mu, p.logvar))
    return 0.5 * (lp - lq + (lq.exp() + (mq - mp) ** 2) / lp.exp() - 1.0)


def kl_diag_gaussians(q: Gaussian, p: Gaussian) -> torch.Tensor:
    """KL(q || p) per sample [B], summed over latent dimensions."""
    return kl_per_dim(q, p).sum(-1)


@dataclass
class VKDOutput:
    prior: Optional[Gaussian] = None
    posterior: Optional[Gaussian] = None
    post_logits: Optional[torch.Tensor] = None  # [K, B, L] from z ~ q
    prior_logits: Optional[torch.Tensor] = None  # [K, B, L] from z ~ p (or [1, B, L] from the prior mean)


class GaussianHead(nn.Module):
    """features -> (mu, logvar) of a diagonal Gaussian."""

    def __init__(self, in_dim: int, hidden: int, latent: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout))
        self.mu = nn.Linear(hidden, latent)
        self.logvar = nn.Linear(hidden, latent)
        nn.init.zeros_(self.logvar.weight)
        nn.init.constant_(self.logvar.bias, -2.0)  # start with small variance so early samples are informative

    def forward(self, features: torch.Tensor) -> Gaussian:
        h = self.net(features)
        return Gaussian(self.mu(h), self.logvar(h).clamp(-10.0, 10.0))

    def mean(self, features: torch.Tensor) -> torch.Tensor:
        """mu alone. Where only the mean is used, logvar is not run: ZeRO-3 fails in backward on a module whose
        forward ran but whose output takes no gradient."""
        return self.mu(self.net(features))


class VKDModel(nn.Module):
    """`image_encoder` / `text_encoder` map inputs to feature vectors; either may be None for baselines."""

    def __init__(self, image_encoder: Optional[ImageEncoder], text_encoder: Optional[TextEncoder], *, latent_dim: int,
                 hidden_dim: int, posterior: str = "text", dropout: float = 0.1, text_dim: Optional[int] = None,
                 num_labels: int = NUM_LABELS):
        super().__init__()
        self.image_encoder, self.text_encoder, self.posterior_kind = image_encoder, text_encoder, posterior
        img_dim = image_encoder.out_dim if image_encoder is not None else 0
        txt_dim = text_encoder.out_dim if text_encoder is not None else (text_dim or 0)
        self.prior_head: Optional[GaussianHead] = None
        self.posterior_head: Optional[GaussianHead] = None
        if image_encoder is not None:
            self.prior_head = GaussianHead(img_dim, hidden_dim, latent_dim, dropout)
        if txt_dim:
            post_in = txt_dim + (img_dim if posterior == "image_text" else 0)
            self.posterior_head = GaussianHead(post_in, hidden_dim, latent_dim, dropout)
        self.classifier = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, num_labels))

    # -- the two paths --------------------------------------------------------------------------------
    def _image_path(self) -> tuple[ImageEncoder, GaussianHead]:
        if self.image_encoder is None or self.prior_head is None:
            raise ValueError("this model has no image path (its objective reads reports only)")
        return self.image_encoder, self.prior_head

    def _posterior(self) -> GaussianHead:
        if self.posterior_head is None:
            raise ValueError("this model has no posterior (its objective reads images only)")
        return self.posterior_head

    def prior(self, image: torch.Tensor) -> tuple[Gaussian, torch.Tensor]:
        encoder, head = self._image_path()
        feats = encoder(image)
        return head(feats), feats

    def prior_mean(self, image: torch.Tensor) -> torch.Tensor:
        encoder, head = self._image_path()
        return head.mean(encoder(image))

    def _posterior_input(self, input_ids, attention_mask, image_features, text_features) -> torch.Tensor:
        if text_features is None:
            if self.text_encoder is None:
                raise ValueError("this model has no text encoder: batches must carry precomputed text_features")
            text_features = self.text_encoder(input_ids, attention_mask)
        text_features = text_features.to(self.classifier[0].weight.dtype)
        if self.posterior_kind == "image_text":
            text_features = torch.cat([text_features, image_features], dim=-1)
        return text_features

    def posterior(self, input_ids=None, attention_mask=None, image_features=None, text_features=None) -> Gaussian:
        return self._posterior()(self._posterior_input(input_ids, attention_mask, image_features, text_features))

    def posterior_mean(self, input_ids=None, attention_mask=None, text_features=None) -> torch.Tensor:
        """The text-only posterior's mean (text_only objective and teacher; q(z|t) only)."""
        return self._posterior().mean(self._posterior_input(input_ids, attention_mask, None, text_features))

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(z)

    # -- training forward -----------------------------------------------------------------------------
    def forward(self, batch, mode: str = "both", num_samples: int = 1) -> VKDOutput:
        """mode: both (both paths, K samples each) | image (prior mean) | text (posterior mean)."""
        if mode == "image":
            return VKDOutput(prior_logits=self.classify(self.prior_mean(batch.image))[None])
        if mode == "text":
            mu = self.posterior_mean(batch.input_ids, batch.attention_mask, batch.text_features)
            return VKDOutput(post_logits=self.classify(mu)[None])
        p, img_feats = self.prior(batch.image)
        q = self.posterior(batch.input_ids, batch.attention_mask, img_feats, batch.text_features)
        return VKDOutput(prior=p, posterior=q, post_logits=self.classify(q.sample(num_samples)),
                         prior_logits=self.classify(p.sample(num_samples)))

    # -- deployment -------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, image: torch.Tensor, mode: str = "prior_mean", num_samples: int = 16):
        """Image-only probabilities [B, L] and, for mode='mc', their spread over K prior samples."""
        if mode == "prior_mean":
            return torch.sigmoid(self.classify(self.prior_mean(image)).float()), None
        p, _ = self.prior(image)
        probs = torch.sigmoid(self.classify(p.sample(num_samples)).float())
        return probs.mean(0), probs.std(0)

    @torch.no_grad()
    def predict_text(self, input_ids, attention_mask, text_features=None):
        """Report-only probabilities (the text_only teacher / upper bound)."""
        return torch.sigmoid(self.classify(self.posterior_mean(input_ids, attention_mask, text_features)).float()), None

    def deploy_state_dict(self) -> dict:
        """The deployable part: image encoder, prior head and classifier; everything for a text-only model."""
        if self.image_encoder is None:
            return self.state_dict()
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("text_encoder.", "posterior_head."))}
