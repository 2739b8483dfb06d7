"""The VKD model: prior p(z|x) from the image, posterior q(z|t) or q(z|x,t) from the report, one classifier
p(y|z) shared by both paths (model.image_head=shared) or, for the image path, its own classifier on
[z, pooled image features] (separate, as in the authors' released code). Diagonal Gaussians, reparameterised
samples, analytic KL(q || p).

Image-only prediction (`predict`) takes images alone: the deployed model never sees a report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from vkd_dist.labels import NUM_LABELS
from vkd_dist.models.contrastive import ContrastiveHeads
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
    image_embed: Optional[torch.Tensor] = None  # mode pairs: unit image embeddings [B, dim]
    text_embed: Optional[torch.Tensor] = None  # mode pairs: unit report embeddings [B, dim]
    logit_scale: Optional[torch.Tensor] = None  # mode pairs: the temperature's inverse, exp(logit_scale)


def _mlp(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out))


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
    """`image_encoder` / `text_encoder` map inputs to feature vectors; either may be None for baselines.
    `image_head`: shared (the image path reads `classifier`, p(y|z)) | separate (it reads `image_classifier`
    on [z, image features]; `classifier` is then built only for a report path)."""

    def __init__(self, image_encoder: Optional[ImageEncoder], text_encoder: Optional[TextEncoder], *, latent_dim: int,
                 hidden_dim: int, posterior: str = "text", dropout: float = 0.1, text_dim: Optional[int] = None,
                 num_labels: int = NUM_LABELS, image_head: str = "shared", projection_dim: Optional[int] = None):
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
        separate = image_head == "separate" and image_encoder is not None
        # Only classifiers some path reads: a parameter without gradient would stop DDP.
        self.classifier = _mlp(latent_dim, hidden_dim, num_labels) if txt_dim or not separate else None
        self.image_classifier = _mlp(latent_dim + img_dim, hidden_dim, num_labels) if separate else None
        # contrastive pre-training (mode pairs): both encoders into one space
        self.contrastive = (ContrastiveHeads(img_dim, txt_dim, projection_dim)
                            if projection_dim is not None and img_dim and txt_dim else None)

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

    def image_logits(self, image: torch.Tensor) -> torch.Tensor:
        """The deployed path's logits [B, L]: the image classifier on the prior mean."""
        encoder, head = self._image_path()
        feats = encoder(image)
        return self.classify_image(head.mean(feats), feats)

    def _posterior_input(self, input_ids, attention_mask, image_features, text_features) -> torch.Tensor:
        if text_features is None:
            if self.text_encoder is None:
                raise ValueError("this model has no text encoder: batches must carry precomputed text_features")
            text_features = self.text_encoder(input_ids, attention_mask)
        text_features = text_features.to(self._posterior().mu.weight.dtype)
        if self.posterior_kind == "image_text":
            text_features = torch.cat([text_features, image_features], dim=-1)
        return text_features

    def posterior(self, input_ids=None, attention_mask=None, image_features=None, text_features=None) -> Gaussian:
        return self._posterior()(self._posterior_input(input_ids, attention_mask, image_features, text_features))

    def posterior_mean(self, input_ids=None, attention_mask=None, text_features=None) -> torch.Tensor:
        """The text-only posterior's mean (text_only objective and teacher; q(z|t) only)."""
        return self._posterior().mean(self._posterior_input(input_ids, attention_mask, None, text_features))

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """The report path's classifier (and the image path's, with a shared head)."""
        if self.classifier is None:
            raise ValueError("this model has no report path: its image path has its own classifier (classify_image)")
        return self.classifier(z)

    def classify_image(self, z: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """The image path's classifier on z [..., B, D] (the prior's mean or its samples)."""
        if self.image_classifier is None:
            return self.classify(z)
        feats = image_features.to(z.dtype).expand(*z.shape[:-1], image_features.shape[-1])
        return self.image_classifier(torch.cat([z, feats], dim=-1))

    # -- training forward -----------------------------------------------------------------------------
    def forward(self, batch, mode: str = "both", num_samples: int = 1, prior_logits: str = "sample") -> VKDOutput:
        """mode: both (both paths, K samples each) | image (prior mean) | text (posterior mean) | pairs (both
        encoders' projected embeddings). In mode both, `prior_logits`: sample (K samples of p) | mean (the prior
        mean alone, as inference reads it)."""
        if mode == "image":
            return VKDOutput(prior_logits=self.image_logits(batch.image)[None])
        if mode == "text":
            mu = self.posterior_mean(batch.input_ids, batch.attention_mask, batch.text_features)
            return VKDOutput(post_logits=self.classify(mu)[None])
        if mode == "pairs":
            return self._pairs(batch)
        p, img_feats = self.prior(batch.image)
        q = self.posterior(batch.input_ids, batch.attention_mask, img_feats, batch.text_features)
        post_logits = self.classify(q.sample(num_samples))
        z_p = p.mu[None] if prior_logits == "mean" else p.sample(num_samples)
        return VKDOutput(prior=p, posterior=q, post_logits=post_logits,
                         prior_logits=self.classify_image(z_p, img_feats))

    def _pairs(self, batch) -> VKDOutput:
        if self.contrastive is None:
            raise ValueError("this model has no projection heads (built for objective=contrastive only)")
        image = self._image_path()[0](batch.image)
        text = batch.text_features
        if text is None:
            if self.text_encoder is None:
                raise ValueError("this model has no text encoder: batches must carry precomputed text_features")
            text = self.text_encoder(batch.input_ids, batch.attention_mask)
        img, txt, scale = self.contrastive(image, text)
        return VKDOutput(image_embed=img, text_embed=txt, logit_scale=scale)

    # -- deployment -------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, image: torch.Tensor, mode: str = "prior_mean", num_samples: int = 16):
        """Image-only probabilities [B, L] and, for mode='mc', their spread over K prior samples."""
        if mode == "prior_mean":
            return torch.sigmoid(self.image_logits(image).float()), None
        p, feats = self.prior(image)
        probs = torch.sigmoid(self.classify_image(p.sample(num_samples), feats).float())
        return probs.mean(0), probs.std(0)

    @torch.no_grad()
    def predict_text(self, input_ids, attention_mask, text_features=None):
        """Report-only probabilities (the text_only teacher / upper bound)."""
        return torch.sigmoid(self.classify(self.posterior_mean(input_ids, attention_mask, text_features)).float()), None

    def deploy_state_dict(self) -> dict:
        """The deployable part: image encoder, prior head and the image path's classifier; everything for a
        text-only model."""
        if self.image_encoder is None:
            return self.state_dict()
        report_path = ["text_encoder.", "posterior_head.", "contrastive."]
        if self.image_classifier is not None:
            report_path.append("classifier.")
        return {k: v for k, v in self.state_dict().items() if not k.startswith(tuple(report_path))}
