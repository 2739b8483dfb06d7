"""One typed configuration tree: dataclasses, loaded from YAML, `key=value` overrides, validated up front.

Load order: dataclass defaults -> `configs/default.yaml` -> --config FILE -> command-line overrides. A FILE
without an `include:` key layers on configs/default.yaml; one with `include:` builds on what it includes
(`include: []`: on the dataclass defaults alone). `data.build_synthetic` belongs to the `data.path` of the layer
that set it: a later layer that moves `data.path` without setting it again turns building off, so a mistyped
path is an error, not a new synthetic corpus. `validate()` runs before any data or model is built, and the
resolved tree is written as `config.yaml` into every run directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what was expected."""


@dataclass
class SyntheticConfig:
    """Parameters of the synthetic corpus built at `data.path` when it has no dataset.json and
    `data.build_synthetic` is on."""

    num_train: int = 2000
    num_val: int = 400
    num_test: int = 600
    image_size: int = 128
    seed: int = 0
    lesion_contrast: float = 1.0
    noise: float = 1.0
    label_noise: float = 0.05
    prevalence_scale: float = 1.0


@dataclass
class DataConfig:
    path: str = "data_cache/synthetic-default"
    # build the synthetic corpus at `path` if it is not there yet; configs/default.yaml turns it on for its own
    # path only (a layer that moves `path` without setting this again turns it off: see the module docstring)
    build_synthetic: bool = False
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    image_size: int = 128  # model input side; shards are pre-resized, this resizes again if different
    batch_size: int = 32  # per process
    eval_batch_size: int = 64
    num_workers: int = 2
    shuffle_buffer: int = 500
    samples_per_epoch: Optional[int] = None  # virtual epoch length; None = the split's sample count
    max_text_len: int = 128
    pretokenize: bool = True  # tokenise the training reports once per run (RUN/tokens), not in every epoch
    uncertain: str = "ignore"  # what -1 labels become: ignore (masked) | ones | zeros
    missing: str = "mask"  # what unmentioned labels become: mask | negative
    augment: bool = True
    hflip: bool = False  # off by default: laterality matters in chest X-rays
    max_rotate_deg: float = 5.0
    max_translate: float = 0.03
    scale_range: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    text_features: Optional[str] = None  # sidecar of precomputed text-encoder outputs (frozen-text fast path)
    # Stop when more than this fraction of a reader's last 200 samples failed to decode (vkd_dist/data/faults.py)
    max_skip_frac: float = 0.05
    keep_token_table: bool = True  # false: delete RUN/tokens (every training report as token ids) when a run finishes
    # A group that may read the run directory (and what vkd-data writes, --shared-group): 0750/0640 with that group;
    # None = owner only, 0700/0600 (vkd_dist/fileio.py restrict_access)
    shared_group: Optional[str] = None


@dataclass
class ModelConfig:
    image_encoder: str = "vit_small_patch16_224"  # any timm model name
    image_encoder_kwargs: dict = field(default_factory=dict)  # e.g. depth/embed_dim for tiny ViTs
    # a local weights file (.safetensors/.pth/.bin), a packaged name (efficientnet_lite0 | imagenet: the
    # `pretrained` extra, vkd_dist/models/pretrained.py); None = random init
    image_weights: Optional[str] = None
    in_chans: int = 1  # 1 = grayscale stem; 3 = repeat the channel on the device
    # "tiny-bert" (random init from text_config), "minilm" (the `pretrained` extra) or a local HF directory
    text_encoder: str = "tiny-bert"
    text_config: dict = field(default_factory=dict)  # BertConfig fields for tiny-bert
    tokenizer: Optional[str] = None  # local tokenizer dir; None = the text_encoder dir, or built from reports
    vocab_size: int = 3000  # WordPiece vocabulary built from training reports when no tokenizer is given
    text_pooling: str = "cls"  # cls | mean
    freeze_text: bool = False
    text_trainable_layers: Optional[int] = None  # train only the top N layers of the text encoder
    gradient_checkpointing: bool = False
    # the text encoder's attention: sdpa (torch's fused scaled_dot_product_attention; eager where a model type
    # has none) | eager (transformers' matmul + softmax path: the reference, and what output_attentions needs)
    attn_implementation: str = "sdpa"
    latent_dim: int = 64
    hidden_dim: int = 256
    posterior: str = "text"  # q(z|t) = text | q(z|x,t) = image_text
    num_samples: int = 4  # K Monte Carlo samples of z during training
    inference: str = "prior_mean"  # prior_mean | mc (mean probability over K prior samples, with spread)
    dropout: float = 0.1


@dataclass
class ObjectiveConfig:
    name: str = "vkd"  # any registered objective (vkd_dist/objectives): vkd | image_only | text_only | kd
    beta: float = 0.1
    beta_schedule: str = "warmup"  # constant | warmup | cyclical
    beta_warmup_steps: int = 200
    beta_cycle_steps: int = 500
    beta_cycle_ramp: float = 0.5  # fraction of each cycle spent ramping up
    prior_bce_weight: float = 1.0  # BCE on z from the prior, so the deployed path is trained directly
    pos_weight: Optional[list] = None  # per-label BCE pos_weight (one float per data set label) or None
    kd_teacher: Optional[str] = None  # run dir or checkpoint of a text_only run (objective=kd)
    kd_alpha: float = 0.5
    kd_temperature: float = 2.0


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.05
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    grad_accum: int = 1


@dataclass
class TrainConfig:
    max_steps: int = 600
    seed: int = 0
    eval_every: int = 200
    eval_max_batches: Optional[int] = None
    ckpt_every: int = 200
    keep_last: int = 2
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | no | bf16 | fp16
    compile: bool = False
    test_at_end: bool = True
    deterministic: bool = False
    bootstrap_resamples: int = 1000  # patient-bootstrap resamples for the AUROC CIs (0 = no CIs)
    select_metric: str = "macro_auroc"  # the validation metric that picks best/ (vkd_dist.metrics.SELECTABLE)


@dataclass
class DistConfig:
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    timeout_s: int = 1800
    # ddp | deepspeed_zero1 | deepspeed_zero2 | deepspeed_zero3 | fsdp2; auto (or null) = as launched
    # (vkd_dist.strategy: a launch that names another strategy is an error, not overridden)
    strategy: Optional[str] = "auto"
    offload_optimizer: bool = False


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    log_every: int = 20
    progress: bool = True


@dataclass
class Config:
    run_dir: str = "runs/default"
    resume: Optional[str] = None  # None | latest | a checkpoint directory
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "data.uncertain": ("ignore", "ones", "zeros"),
    "data.missing": ("mask", "negative"),
    "model.text_pooling": ("cls", "mean"),
    "model.attn_implementation": ("sdpa", "eager"),
    "model.posterior": ("text", "image_text"),
    "model.inference": ("prior_mean", "mc"),
    "objective.beta_schedule": ("constant", "warmup", "cyclical"),
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "dist.backend": ("auto", "nccl", "gloo"),
}

POSITIVE: tuple[str, ...] = (  # null, where allowed, is fine
    "data.synthetic.num_train", "data.synthetic.image_size", "data.image_size", "data.batch_size",
    "data.eval_batch_size", "data.max_text_len", "model.latent_dim", "model.hidden_dim",
    "model.num_samples", "model.vocab_size", "optim.lr", "optim.grad_accum", "train.max_steps", "train.eval_every",
    "train.eval_max_batches", "train.ckpt_every", "train.keep_last", "logging.log_every",
)
NON_NEGATIVE: tuple[str, ...] = (
    "data.synthetic.num_val", "data.synthetic.num_test", "data.num_workers", "data.shuffle_buffer",
    "objective.beta", "objective.prior_bce_weight", "optim.weight_decay", "optim.warmup_steps",
    "optim.grad_clip",  # 0 = no clipping
    "train.bootstrap_resamples",
)
# key -> (low, high, whether high itself is allowed); low is always allowed
INTERVALS: dict[str, tuple[float, float, bool]] = {
    "optim.min_lr_ratio": (0.0, 1.0, True),  # the cosine's floor, as a fraction of optim.lr
    "objective.kd_alpha": (0.0, 1.0, True),
    "data.synthetic.label_noise": (0.0, 1.0, True),
    "model.dropout": (0.0, 1.0, False),  # p=1 would zero every activation
}


def close_match(value: str, options: Iterable[str]) -> Optional[str]:
    """The option `value` was most likely meant to be: a typo of it, or else the one option that is a prefix of
    `value` or has it as prefix ('validation' -> 'val')."""
    options = list(options)
    found = difflib.get_close_matches(value, options, n=1)
    if found:
        return found[0]
    prefixed = [o for o in options if value and (value.startswith(o) or o.startswith(value))]
    return prefixed[0] if len(prefixed) == 1 else None


def did_you_mean(value: Any, options: Iterable[str]) -> str:
    """'; did you mean X?' to end a message's parenthesis, or '' when nothing is close."""
    match = close_match(str(value), options)
    return f"; did you mean {match}?" if match else ""


def not_allowed(key: str, value: Any, allowed: Iterable[str]) -> ConfigError:
    allowed = [str(a) for a in allowed]
    return ConfigError(f"{key}={value!r} is not allowed (allowed: {', '.join(allowed)}{did_you_mean(value, allowed)})")


def _unknown_key(key: str, where: str, allowed: Iterable[str]) -> ConfigError:
    allowed = sorted(allowed)
    return ConfigError(f"unknown key {key} ({where} allows: {', '.join(allowed)}"
                       f"{did_you_mean(key.rsplit('.', 1)[-1], allowed)})")


def no_dataset(path: str | Path) -> ConfigError:
    return ConfigError(f"data.path={path}: no dataset.json there (convert data with vkd-data first; "
                       "data.build_synthetic=true builds a synthetic corpus there)")


# --------------------------------------------------------------------------- conversion
def _is_dataclass_type(tp: Any) -> typing.TypeGuard[Any]:  # narrows away None for mypy
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: null is not allowed (expected {getattr(base, '__name__', base)})")
    if _is_dataclass_type(base):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(base, value, key)
    origin = typing.get_origin(base) or base
    if origin is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if origin is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if origin is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise _unknown_key(f"{prefix}.{unknown[0]}" if prefix else unknown[0], prefix or "top level", names)
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("image_encoder_kwargs", "text_config"):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _data_section(tree: dict) -> dict:
    data = tree.get("data")
    return data if isinstance(data, dict) else {}  # a malformed section is reported when the tree is built


def _scope_synthetic(tree: dict, old_path: Any, sets_build: bool) -> None:
    """After a layer: if it moved data.path without setting data.build_synthetic, building is off, since the
    earlier layer's `build_synthetic: true` was meant for its own path."""
    data = _data_section(tree)
    if not sets_build and "path" in data and not _same_path(data["path"], old_path):
        tree["data"] = {**data, "build_synthetic": False}


def _same_path(a: Any, b: Any) -> bool:
    """The same directory however written: the SLURM launcher pins data.path as an absolute override."""
    if a is None or b is None:
        return a is b
    return Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()


def _layer(tree: dict, update: dict) -> dict:
    """`update` merged over `tree` as one layer of the config (see the module docstring)."""
    merged = _deep_merge(tree, update)
    _scope_synthetic(merged, _data_section(tree).get("path"), "build_synthetic" in _data_section(update))
    return merged


def _yaml_mapping(path: Path) -> dict:
    """One YAML file's own mapping, `include:` still in it."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return raw


def _with_includes(path: Path, raw: dict, seen: tuple[Path, ...] = ()) -> dict:
    merged: dict = {}
    for inc in raw.pop("include", []) or []:
        merged = _layer(merged, _read_yaml(path.parent / inc, seen + (path,)))
    return _layer(merged, raw)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A YAML file with its includes merged in (each include a layer under the file's own keys)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: include cycle")
    return _with_includes(path, _yaml_mapping(path), seen)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    value = yaml.safe_load(text) if text.strip() else None
    return key.split("."), value


def _apply_override(tree: dict, parts: list[str], value: Any, cls: type = Config) -> None:
    node: dict = tree
    node_cls: Optional[type] = cls
    for i, part in enumerate(parts):
        key = ".".join(parts[: i + 1])
        fields = {f.name: f for f in dataclasses.fields(node_cls)} if node_cls else {}
        if node_cls and part not in fields:
            raise _unknown_key(key, ".".join(parts[:i]) or "top level", fields)
        ftype = _unwrap_optional(typing.get_type_hints(node_cls)[part])[0] if node_cls else None
        last = i == len(parts) - 1
        if last:
            # `objective=image_only`: a scalar given for a section with a `name` field sets that name.
            if _is_dataclass_type(ftype) and not isinstance(value, dict):
                if "name" not in {f.name for f in dataclasses.fields(ftype)}:
                    raise ConfigError(f"{key} is a section; set one of its keys, e.g. {key}.<key>=value")
                node.setdefault(part, {})["name"] = value
            elif _is_dataclass_type(ftype) and isinstance(value, dict):
                node[part] = _deep_merge(node.get(part, {}) or {}, value)
            else:
                node[part] = value
            return
        if _is_dataclass_type(ftype):
            node = node.setdefault(part, {})
            node_cls = ftype
        else:  # free-form dict field (e.g. model.text_config.hidden_size=128)
            sub = node.get(part)
            if sub is None:
                sub = node[part] = {}
            if not isinstance(sub, dict):
                raise ConfigError(f"{key} is not a mapping")
            node, node_cls = sub, None


def _sets_build_synthetic(parts: list[str], value: Any) -> bool:
    return parts == ["data", "build_synthetic"] or (parts == ["data"] and isinstance(value, dict)
                                                     and "build_synthetic" in value)


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Dataclass defaults <- configs/default.yaml (unless FILE has an `include:` key) <- FILE <- key=value
    overrides (one layer); then validated."""
    raw = to_dict(Config())
    file = Path(path).resolve() if path else None
    own = _yaml_mapping(file) if file else None
    if own is None or "include" not in own:  # a user's file changes the default, it does not start from scratch
        raw = _layer(raw, _read_yaml(DEFAULT_CONFIG))
    if file is not None and own is not None:
        raw = _layer(raw, _with_includes(file, own))
    old_path, sets_build = _data_section(raw).get("path"), False
    for item in overrides or []:
        parts, value = _parse_override(item)
        _apply_override(raw, parts, value)
        sets_build = sets_build or _sets_build_synthetic(parts, value)
    _scope_synthetic(raw, old_path, sets_build)
    cfg = _build(Config, raw)
    validate(cfg)
    return cfg


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _registered_objectives() -> tuple[str, ...]:
    from vkd_dist.objectives import objective_names  # asked at validation time: tests register their own

    return objective_names()


def _validate_dist(cfg: Config) -> None:
    from vkd_dist.strategy import configured  # checks the name against vkd_dist.strategy.STRATEGIES

    strategy = configured(cfg)
    if cfg.dist.offload_optimizer and strategy is not None and strategy.name != "deepspeed_zero3":
        raise ConfigError(f"dist.offload_optimizer=true needs dist.strategy=deepspeed_zero3 (or auto), "
                          f"not {strategy.name}")


def _validate_bounds(cfg: Config) -> None:
    for key in POSITIVE:
        value = _get(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value!r} must be positive")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be >= 0")
    for key, (low, high, high_ok) in INTERVALS.items():
        value = _get(cfg, key)
        if not (low <= value <= high if high_ok else low <= value < high):
            raise ConfigError(f"{key}={value!r} must be in [{low:g}, {high:g}{']' if high_ok else ')'}")
    if cfg.optim.warmup_steps > cfg.train.max_steps:
        raise ConfigError(f"optim.warmup_steps={cfg.optim.warmup_steps} is more than train.max_steps="
                          f"{cfg.train.max_steps}: the learning rate would never reach optim.lr (allowed: 0 to "
                          f"{cfg.train.max_steps})")


def _validate_image_encoder(cfg: Config) -> None:
    """The timm model exists and takes model.image_encoder_kwargs: checked by building it on the meta device
    (no memory, no weights), and only when there are kwargs to check."""
    import timm

    name, kwargs = cfg.model.image_encoder, cfg.model.image_encoder_kwargs
    if not timm.is_model(name):
        raise ConfigError(f"model.image_encoder={name!r} is not a timm model (allowed: timm.list_models()"
                          f"{did_you_mean(name, timm.list_models())})")
    if not kwargs:
        return
    import inspect

    import torch

    from vkd_dist.models.encoders import ImageEncoder

    def build(extra: dict) -> Any:
        with torch.device("meta"):
            return ImageEncoder(name, cfg.data.image_size, cfg.model.in_chans, None, extra).backbone

    cls = type(build({}))
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):  # one that passes **kwargs on: building says
        unknown = sorted(set(kwargs) - set(params) - {"self"})
        if unknown:
            raise _unknown_key(f"model.image_encoder_kwargs.{unknown[0]}", f"{name} ({cls.__name__})",
                               set(params) - {"self"})
    try:
        build(kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"model.image_encoder_kwargs={kwargs}: {name} cannot be built with them ({reason})") from exc


def _validate_text_config(cfg: Config) -> None:
    """model.text_config keys are BertConfig fields: a misspelt one would otherwise be stored and ignored."""
    if not cfg.model.text_config:
        return
    from transformers import BertConfig

    fields = BertConfig().to_dict()
    unknown = sorted(set(cfg.model.text_config) - set(fields))
    if unknown:
        raise _unknown_key(f"model.text_config.{unknown[0]}", "model.text_config (BertConfig)", fields)


def _check_writable(key: str, path: str | Path) -> None:
    """`path` is, or can be made, a directory this process writes to; nothing is created here."""
    target = Path(path).absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key}={path}: not writable ({existing} is not a directory)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path}: not writable (no write permission on {existing})")


def _validate_pretrained(cfg: Config) -> None:
    """model.image_weights: a local file or a packaged short name that fits model.image_encoder;
    model.text_encoder: 'tiny-bert', a packaged short name (vkd_dist/models/pretrained.py) or a local directory."""
    from vkd_dist.models import pretrained

    m = cfg.model
    if m.image_weights and pretrained.is_image_weights_name(m.image_weights):
        try:
            pretrained.check_image_weights(m.image_weights, m.image_encoder)
        except (ValueError, pretrained.PretrainedNotInstalled) as exc:
            raise ConfigError(str(exc)) from None
    elif m.image_weights and not Path(m.image_weights).is_file():
        names = ", ".join([*pretrained.IMAGE_WEIGHTS, pretrained.IMAGENET])
        raise ConfigError(f"model.image_weights={m.image_weights}: no such file (or a packaged name: {names})")
    if m.text_encoder in pretrained.TEXT_ENCODERS:
        try:
            pretrained.text_encoder_dir(m.text_encoder)
        except pretrained.PretrainedNotInstalled as exc:
            raise ConfigError(str(exc)) from None
    elif m.text_encoder != "tiny-bert" and not Path(m.text_encoder).is_dir():
        raise ConfigError(
            f"model.text_encoder={m.text_encoder!r}: expected 'tiny-bert', "
            f"{', '.join(repr(n) for n in pretrained.TEXT_ENCODERS)} (the `pretrained` extra) or a local Hugging "
            "Face model directory (nothing is downloaded)")


def validate(cfg: Config) -> None:
    from vkd_dist.metrics import SELECTABLE

    choices = {**CHOICES, "objective.name": _registered_objectives(), "train.select_metric": tuple(SELECTABLE)}
    for key, allowed in choices.items():
        if _get(cfg, key) not in allowed:
            raise not_allowed(key, _get(cfg, key), allowed)
    _validate_bounds(cfg)
    if not 0.0 <= cfg.data.max_skip_frac <= 1.0:
        raise ConfigError(f"data.max_skip_frac={cfg.data.max_skip_frac} must be in [0, 1] (0: stop at the first "
                          "corrupt sample, 1: never stop)")
    if cfg.data.shared_group is not None:
        from vkd_dist.fileio import group_id

        try:  # an unknown group fails here, before any work
            group_id(cfg.data.shared_group, "data.shared_group")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas={cfg.optim.betas} must be two numbers")
    _validate_dist(cfg)
    if cfg.model.in_chans not in (1, 3):
        raise not_allowed("model.in_chans", cfg.model.in_chans, ("1", "3"))
    _validate_image_encoder(cfg)
    _validate_text_config(cfg)
    from vkd_dist.objectives import get_objective

    if get_objective(cfg.objective.name).needs_teacher and not cfg.objective.kd_teacher:
        raise ConfigError(f"objective.kd_teacher must name a text_only run directory or checkpoint when "
                          f"objective={cfg.objective.name}")
    if cfg.objective.kd_teacher and not Path(cfg.objective.kd_teacher).exists():
        raise ConfigError(f"objective.kd_teacher={cfg.objective.kd_teacher}: no such file or directory")
    if cfg.model.text_trainable_layers is not None and cfg.model.text_trainable_layers < 0:
        raise ConfigError("model.text_trainable_layers must be >= 0 or null")
    _validate_pretrained(cfg)
    if cfg.model.tokenizer and not Path(cfg.model.tokenizer).is_dir():
        raise ConfigError(f"model.tokenizer={cfg.model.tokenizer}: no such directory")
    if cfg.resume not in (None, "latest") and not Path(cfg.resume).is_dir():
        raise ConfigError(f"resume={cfg.resume!r}: expected null, 'latest' or a checkpoint directory")
    _check_writable("run_dir", cfg.run_dir)
    if not (Path(cfg.data.path) / "dataset.json").is_file():
        if not cfg.data.build_synthetic:
            raise no_dataset(cfg.data.path)
        _check_writable("data.path", cfg.data.path)  # the synthetic corpus will be written there
    if cfg.data.text_features and not Path(cfg.data.text_features).exists():
        raise ConfigError(f"data.text_features={cfg.data.text_features}: not found (make it with vkd-data embed-text)")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_from_dict(raw: dict) -> Config:
    """A saved run's config; checked for shape and types only, since its paths may have moved."""
    return _build(Config, _deep_merge(to_dict(Config()), raw))


def overrides_from_yaml(path: str | Path) -> list[str]:
    """A YAML overlay (e.g. configs/tiny.yaml) as `key=value` overrides for `load_config`, so that it applies on
    top of any config file. Sections flatten to dotted keys; free-form mappings (model.text_config) stay one
    value, so they replace the configured mapping as they would in a config file rather than merge into it."""
    out: list[str] = []
    doc_end = "\n..."  # what safe_dump puts after a bare scalar

    def walk(node: dict, cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for key, value in node.items():
            ftype = _unwrap_optional(hints[key])[0] if key in hints else None  # unknown keys: load_config says so
            if isinstance(value, dict) and _is_dataclass_type(ftype):
                walk(value, ftype, f"{prefix}{key}.")
            else:
                text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=float("inf"))
                out.append(f"{prefix}{key}={text.strip().removesuffix(doc_end)}")

    walk(_read_yaml(Path(path)), Config, "")
    return out
