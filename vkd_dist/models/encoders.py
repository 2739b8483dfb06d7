"""Image (timm) and text (Hugging Face) encoders and the tokenizer, all from local files; nothing downloads."""

from __future__ import annotations

import itertools
import os
import shutil
import warnings
from pathlib import Path
from typing import Iterable, Optional

import timm
import torch
from torch import nn

from vkd_dist.data.schema import shard_reports

TINY_BERT = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                 max_position_embeddings=512)
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class ImageEncoder(nn.Module):
    """A timm backbone with its classifier removed; takes uint8 [B, 1, H, W] and normalises on the device."""

    def __init__(self, name: str, image_size: int, in_chans: int = 1, weights: Optional[str] = None,
                 kwargs: Optional[dict] = None, grad_checkpointing: bool = False):
        super().__init__()
        extra = dict(kwargs or {})
        if _accepts_img_size(name):
            extra.setdefault("img_size", image_size)
        if weights:  # timm loads the local file, adapting the stem to in_chans and dropping the classifier
            extra.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights), hf_hub_id=None, url=None))
        self.backbone = timm.create_model(name, num_classes=0, in_chans=in_chans, **extra)
        self.in_chans = in_chans
        cfg = self.backbone.pretrained_cfg or {}
        mean, std = cfg.get("mean", (0.5,)), cfg.get("std", (0.5,))
        # A grayscale image normalised with the mean of the RGB statistics the weights were trained with.
        self.register_buffer("mean", torch.tensor(sum(mean) / len(mean)).view(1, 1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(sum(std) / len(std)).view(1, 1, 1, 1) * 255, persistent=False)
        # Pooled feature width: some families (MobileNetV3) add a head projection after num_features.
        self.out_dim = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        if grad_checkpointing:
            self.backbone.set_grad_checkpointing(True)

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

    def __init__(self, model: nn.Module, pooling: str = "cls"):
        super().__init__()
        self.model, self.pooling = model, pooling
        self.out_dim = model.config.hidden_size
        self.frozen = False  # fully frozen: stays in eval mode, so it matches precomputed features exactly

    def train(self, mode: bool = True) -> "TextEncoder":
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


def build_text_encoder(cfg, vocab_size: int) -> TextEncoder:
    """`cfg` is a ModelConfig: 'tiny-bert' is built at random from text_config; else a local directory."""
    from transformers import AutoModel, BertConfig, BertModel

    attn = getattr(cfg, "attn_implementation", "sdpa")
    if cfg.text_encoder == "tiny-bert":
        model = BertModel(BertConfig(**{**TINY_BERT, **cfg.text_config, "vocab_size": vocab_size},
                                     attn_implementation=attn), add_pooling_layer=False)
    else:
        kwargs = dict(local_files_only=True, **({"add_pooling_layer": False} if _is_bert_like(cfg.text_encoder) else {}))
        try:
            model = AutoModel.from_pretrained(cfg.text_encoder, attn_implementation=attn, **kwargs)
        except ValueError as exc:  # a model type without an SDPA path: transformers refuses an explicit "sdpa"
            if attn == "eager" or not any(w in str(exc).lower() for w in ("attn", "attention")):
                raise
            warnings.warn(f"{cfg.text_encoder}: no {attn} attention for this model type ({exc}); using eager")
            model = AutoModel.from_pretrained(cfg.text_encoder, attn_implementation="eager", **kwargs)
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
        node = model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, nn.ModuleList):
            return list(node)
    raise ValueError(f"cannot find the transformer layers of {type(model).__name__} to unfreeze the top ones")


# ----------------------------------------------------------------------------------------- tokenizer
def train_wordpiece(texts: Iterable[str], vocab_size: int, out_dir: Path):
    """A BERT WordPiece tokenizer built offline from the training reports, saved to `out_dir`.

    The vocabulary is the special tokens, every character (alone and as a ##continuation), then the most
    frequent words, ties broken alphabetically: deterministic, unlike the `tokenizers` trainer, whose
    tie-breaking changes from run to run (and with it every token id)."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words: Counter = Counter()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    vocab = list(SPECIAL_TOKENS) + chars + [f"##{c}" for c in chars]
    seen = set(vocab)
    for word, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        if word not in seen:
            vocab.append(word)
            seen.add(word)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    fast.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def report_texts(shards: list[str], limit: int = 20000) -> list[str]:
    """Report texts from shards (no image decoding), in shard order, for tokenizer training."""
    return [text for _, text in itertools.islice(shard_reports(shards), limit)]
