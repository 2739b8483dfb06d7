"""`validate`: every check that can be made before any data or model is built."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from vkd_dist.config.schema import Config, ConfigError, did_you_mean, no_dataset, not_allowed, unknown_key

CHOICES: dict[str, tuple[Optional[str], ...]] = {
    "data.uncertain": (None, "ignore", "ones", "zeros"),  # None: the data set's training policy
    "data.missing": (None, "mask", "negative"),
    "model.text_pooling": ("cls", "mean"),
    "model.attn_implementation": ("sdpa", "eager"),
    "model.posterior": ("text", "image_text"),
    "model.inference": ("prior_mean", "mc"),
    "model.image_head": ("shared", "separate"),
    "objective.image_bce": ("sample", "mean"),
    "objective.beta_schedule": ("constant", "warmup", "cyclical"),
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "dist.backend": ("auto", "nccl", "gloo"),
}

POSITIVE: tuple[str, ...] = (  # null, where allowed, is fine
    "data.synthetic.num_train", "data.synthetic.image_size", "data.synthetic.label_fraction", "data.image_size",
    "data.batch_size", "data.eval_batch_size", "data.max_text_len", "model.latent_dim", "model.hidden_dim",
    "model.num_samples", "model.vocab_size", "optim.lr", "optim.grad_accum", "train.max_steps", "train.eval_every",
    "train.eval_max_batches", "train.ckpt_every", "train.keep_last", "train.cpu_threads", "logging.log_every",
    "objective.beta_cycle_steps",
)
NON_NEGATIVE: tuple[str, ...] = (
    "data.synthetic.num_val", "data.synthetic.num_test", "data.num_workers", "data.shuffle_buffer",
    "objective.beta", "objective.prior_bce_weight", "objective.free_bits", "objective.predictive_weight",
    "optim.weight_decay", "optim.warmup_steps",
    "optim.grad_clip",  # 0 = no clipping
    "train.bootstrap_resamples",
)
# key -> (low, high, whether high itself is allowed); low is always allowed
INTERVALS: dict[str, tuple[float, float, bool]] = {
    "optim.min_lr_ratio": (0.0, 1.0, True),  # the cosine's floor, as a fraction of optim.lr
    "objective.kd_alpha": (0.0, 1.0, True),
    "data.synthetic.label_noise": (0.0, 1.0, True),
    "data.synthetic.label_fraction": (0.0, 1.0, True),
    "model.dropout": (0.0, 1.0, False),  # p=1 would zero every activation
}


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
            raise unknown_key(f"model.image_encoder_kwargs.{unknown[0]}", f"{name} ({cls.__name__})",
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
        raise unknown_key(f"model.text_config.{unknown[0]}", "model.text_config (BertConfig)", fields)


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
    if cfg.objective.text_init:
        from vkd_dist.models.text_init import check_text_init

        check_text_init(cfg)
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
