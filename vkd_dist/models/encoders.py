"""Image (timm) and text (Hugging Face) encoders, from local files; nothing downloads. The tokenizer: data/tokens.py."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import timm
import torch
from torch import nn

from vkd_dist.config import ConfigError, did_you_mean, unknown_key
from vkd_dist.models import pretrained as pretrained_weights

if TYPE_CHECKING:
    from vkd_dist.config import Config, ModelConfig

TINY_BERT = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                 max_position_embeddings=512)


class ImageEncoder(nn.Module):
    """A timm backbone with its classifier removed; takes uint8 [B, 1, H, W] and normalises on the device."""

    mean: torch.Tensor  # buffers, registered below
    std: torch.Tensor

    def __init__(self, name: str, image_size: int, in_chans: int = 1, weights: Optional[str] = None,
                 kwargs: Optional[dict] = None, grad_checkpointing: bool = False):
        super().__init__()
        extra = dict(kwargs or {})
        if _accepts_img_size(name):
            extra.setdefault("img_size", image_size)
        if weights:
            # timm loads them, adapting the stem to in_chans (in_chans=1: the three RGB filters of the first conv
            # summed, so a grayscale image gives what R=G=B would) and dropping the classifier. A short name
            # (models/pretrained.py) is the packaged weights, renamed into timm's keys; anything else a local file.
            overlay: dict[str, Any] = dict(hf_hub_id=None, url=None)
            if pretrained_weights.is_image_weights_name(str(weights)):
                overlay["state_dict"] = pretrained_weights.image_state_dict(str(weights), name)
            else:
                overlay["file"] = str(weights)
            extra.update(pretrained=True, pretrained_cfg_overlay=overlay)
        try:
            backbone: Any = timm.create_model(name, num_classes=0, in_chans=in_chans, **extra)
        except Exception as exc:
            if not weights:
                raise
            # a file that exists but is no weights of this model: say which, not only what the loader hit
            raise ValueError(f"model.image_weights={weights}: cannot be loaded into {name} "
                             f"({type(exc).__name__}: {exc})") from exc
        for cfg in {id(c): c for c in (backbone.pretrained_cfg, getattr(backbone, "default_cfg", None))
                    if isinstance(c, dict)}.values():
            cfg.pop("state_dict", None)  # do not keep a second copy of the weights alive in the model's cfg
        self.backbone, self.in_chans = backbone, in_chans
        pretrained = backbone.pretrained_cfg or {}
        mean, std = pretrained.get("mean", (0.5,)), pretrained.get("std", (0.5,))
        # A grayscale image normalised with the mean of the RGB statistics of the architecture's timm weights
        # (ImageNet's 0.449 / 0.226 for most; 0.5 / 0.5 for the tf_* ports). A function of the architecture only,
        # not of model.image_weights: vkd-export probes it without weights.
        self.register_buffer("mean", torch.tensor(sum(mean) / len(mean)).view(1, 1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(sum(std) / len(std)).view(1, 1, 1, 1) * 255, persistent=False)
        # Pooled feature width: some families (MobileNetV3) add a head projection after num_features.
        self.out_dim: int = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        if grad_checkpointing:
            backbone.set_grad_checkpointing(True)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        dtype = next(self.backbone.parameters()).dtype
        x = (image.to(dtype) - self.mean.to(dtype)) / self.std.to(dtype)
        if self.in_chans == 3:
            x = x.expand(-1, 3, -1, -1)
        return self.backbone(x)


def _accepts_img_size(name: str) -> bool:
    return any(k in name for k in ("vit", "deit", "eva", "beit", "swin", "convit", "cait", "xcit"))


class TextEncoder(nn.Module):
    """A Hugging Face encoder, pooled to one vector per report ([CLS] or masked mean)."""

    def __init__(self, model: Any, pooling: str = "cls"):
        """`model` is a transformers encoder (its config names the hidden size)."""
        super().__init__()
        self.model, self.pooling = model, pooling
        self.out_dim: int = model.config.hidden_size
        self.frozen = False  # fully frozen: stays in eval mode, so it matches precomputed features exactly

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def build_text_encoder(cfg: ModelConfig, vocab_size: int) -> TextEncoder:
    """'tiny-bert' is built at random from text_config; a short name (models/pretrained.py: minilm) is an installed
    package's model; anything else is a local directory."""
    from transformers import AutoModel, BertConfig, BertModel

    attn = getattr(cfg, "attn_implementation", "sdpa")
    if cfg.text_encoder == "tiny-bert":
        # attn_implementation: not in BertConfig's signature, taken by PreTrainedConfig's **kwargs at run time
        config = BertConfig(**{**TINY_BERT, **cfg.text_config, "vocab_size": vocab_size},  # type: ignore[call-arg]
                            attn_implementation=attn)
        model = BertModel(config, add_pooling_layer=False)
    else:
        path = pretrained_weights.text_encoder_dir(cfg.text_encoder)  # a short name (minilm) -> its package dir
        kwargs: dict = dict(local_files_only=True)
        if _is_bert_like(path):
            kwargs["add_pooling_layer"] = False
        try:
            model = AutoModel.from_pretrained(path, attn_implementation=attn, **kwargs)
        except ValueError as exc:  # a model type without an SDPA path: transformers refuses an explicit "sdpa"
            if attn == "eager" or not any(w in str(exc).lower() for w in ("attn", "attention")):
                raise
            warnings.warn(f"{cfg.text_encoder}: no {attn} attention for this model type ({exc}); using eager",
                          stacklevel=2)
            model = AutoModel.from_pretrained(path, attn_implementation="eager", **kwargs)
    if cfg.gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        if hasattr(model, "activation_checkpointing_enable"):  # the new name; the old one warns (transformers 5.24)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    encoder = TextEncoder(model, cfg.text_pooling)
    apply_text_freezing(encoder, cfg.freeze_text, cfg.text_trainable_layers)
    return encoder


def attention_implementation(model: nn.Module) -> str:
    """The attention path a Hugging Face model runs ("sdpa", "eager", ...), as transformers resolved it."""
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def _is_bert_like(path: str) -> bool:
    import json

    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") in ("bert", "roberta")
    except (OSError, ValueError):
        return False


def apply_text_freezing(encoder: TextEncoder, freeze: bool, trainable_layers: Optional[int]) -> None:
    """Freeze everything (freeze=True) or all but the top N transformer layers (trainable_layers=N)."""
    if not freeze and trainable_layers is None:
        return
    for p in encoder.parameters():
        p.requires_grad_(False)
    if freeze or not trainable_layers:
        encoder.frozen = True
        encoder.model.eval()
        return
    layers = _encoder_layers(encoder.model)
    for layer in layers[-trainable_layers:]:
        for p in layer.parameters():
            p.requires_grad_(True)


def _encoder_layers(model: nn.Module) -> list[nn.Module]:
    for path in ("encoder.layer", "encoder.layers", "transformer.layer", "layers"):
        node: Any = model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, nn.ModuleList):
            return list(node)
    raise ValueError(f"cannot find the transformer layers of {type(model).__name__} to unfreeze the top ones")


# --------------------------------------------------------------------------- config checks (before any work)
def check_config(cfg: Config) -> None:
    """model.image_encoder (with model.image_encoder_kwargs) and model.text_config, checked before any work."""
    check_image_encoder(cfg)
    check_text_config(cfg)


def check_image_encoder(cfg: Config) -> None:
    """The timm model exists and takes model.image_encoder_kwargs: checked by building it on the meta device
    (no memory, no weights), and only when there are kwargs to check."""
    name, kwargs = cfg.model.image_encoder, cfg.model.image_encoder_kwargs
    if not timm.is_model(name):
        raise ConfigError(f"model.image_encoder={name!r} is not a timm model (allowed: timm.list_models()"
                          f"{did_you_mean(name, timm.list_models())})")
    if not kwargs:
        return

    def build(extra: dict) -> Any:
        with torch.device("meta"):
            return ImageEncoder(name, cfg.data.image_size, cfg.model.in_chans, None, extra).backbone

    cls = type(build({}))
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):  # one that passes **kwargs on: building says
        unknown = sorted(set(kwargs) - set(params) - {"self"})
        if unknown:
            raise unknown_key(f"model.image_encoder_kwargs.{unknown[0]}", f"{name} ({cls.__name__})",
                              set(params) - {"self"})
    try:
        build(kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"model.image_encoder_kwargs={kwargs}: {name} cannot be built with them ({reason})") from exc


def check_text_config(cfg: Config) -> None:
    """model.text_config keys are BertConfig fields: a misspelt one would otherwise be stored and ignored."""
    if not cfg.model.text_config:
        return
    from transformers import BertConfig

    fields = BertConfig().to_dict()
    unknown = sorted(set(cfg.model.text_config) - set(fields))
    if unknown:
        raise unknown_key(f"model.text_config.{unknown[0]}", "model.text_config (BertConfig)", fields)
