"""The structural checks: what the tree itself can tell before any data or model is built (ranges, choices
that are plain constants, shapes, paths on disk). The standard library only: a check that needs a component's
registry or library (objective names, strategies, timm encoders, pretrained short names, selectable metrics, the
shared group) is that component's `check_config`, and `vkd_dist.configure` runs the two kinds together, in the
order of `vkd_dist.configure.CHECKS`. Each check raises one ConfigError naming the key, its value and what is
allowed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from vkd_dist.config.schema import Config, ConfigError, no_dataset, not_allowed

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
    "objective.distil_on": ("all", "unlabelled"),
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "dist.backend": ("auto", "nccl", "gloo"),
}

POSITIVE: tuple[str, ...] = (  # null, where allowed, is fine
    "data.synthetic.num_train", "data.synthetic.image_size", "data.synthetic.label_fraction", "data.image_size",
    "data.batch_size", "data.eval_batch_size", "data.max_text_len", "model.latent_dim", "model.hidden_dim",
    "model.num_samples", "model.vocab_size", "optim.lr", "optim.grad_accum", "train.max_steps", "train.eval_every",
    "train.eval_max_batches", "train.ckpt_every", "train.keep_last", "train.cpu_threads", "logging.log_every",
    "objective.beta_cycle_steps", "model.projection_dim",
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
    "data.synthetic.miss_rate": (0.0, 0.5, True),  # a finding is missed with chance 2 * miss_rate * (1 - severity)
    "data.synthetic.false_rate": (0.0, 1.0, True),
    "data.synthetic.hedge_rate": (0.0, 1.0, True),
    "data.synthetic.gold_fraction": (0.0, 1.0, True),
    "model.dropout": (0.0, 1.0, False),  # p=1 would zero every activation
}
# key -> (low, high): the value, where set (null allowed), is in (low, high]
OPEN_BELOW: dict[str, tuple[float, float]] = {
    "data.labelled_share": (0.0, 1.0),  # 0 would give the labels no batch at all
}


def value_at(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def check_choices(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        if value_at(cfg, key) not in allowed:
            raise not_allowed(key, value_at(cfg, key), allowed)


def check_bounds(cfg: Config) -> None:
    for key in POSITIVE:
        value = value_at(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value!r} must be positive")
    for key in NON_NEGATIVE:
        if value_at(cfg, key) < 0:
            raise ConfigError(f"{key}={value_at(cfg, key)!r} must be >= 0")
    for key, (low, high, high_ok) in INTERVALS.items():
        value = value_at(cfg, key)
        if not (low <= value <= high if high_ok else low <= value < high):
            raise ConfigError(f"{key}={value!r} must be in [{low:g}, {high:g}{']' if high_ok else ')'}")
    for key, (low, high) in OPEN_BELOW.items():
        value = value_at(cfg, key)
        if value is not None and not low < value <= high:
            raise ConfigError(f"{key}={value!r} must be in ({low:g}, {high:g}] or null")
    if cfg.optim.warmup_steps > cfg.train.max_steps:
        raise ConfigError(f"optim.warmup_steps={cfg.optim.warmup_steps} is more than train.max_steps="
                          f"{cfg.train.max_steps}: the learning rate would never reach optim.lr (allowed: 0 to "
                          f"{cfg.train.max_steps})")
    if not 0.0 <= cfg.data.max_skip_frac <= 1.0:
        raise ConfigError(f"data.max_skip_frac={cfg.data.max_skip_frac} must be in [0, 1] (0: stop at the first "
                          "corrupt sample, 1: never stop)")


def check_betas(cfg: Config) -> None:
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas={cfg.optim.betas} must be two numbers")


def check_in_chans(cfg: Config) -> None:
    if cfg.model.in_chans not in (1, 3):
        raise not_allowed("model.in_chans", cfg.model.in_chans, ("1", "3"))


def check_teacher_path(cfg: Config) -> None:
    if cfg.objective.kd_teacher and not Path(cfg.objective.kd_teacher).exists():
        raise ConfigError(f"objective.kd_teacher={cfg.objective.kd_teacher}: no such file or directory")


def check_text_layers(cfg: Config) -> None:
    if cfg.model.text_trainable_layers is not None and cfg.model.text_trainable_layers < 0:
        raise ConfigError("model.text_trainable_layers must be >= 0 or null")


def check_overwrite(cfg: Config) -> None:
    if cfg.overwrite and cfg.resume:
        raise ConfigError(f"overwrite=true starts a new run (the old one moved aside) and resume={cfg.resume} "
                          "continues one: pass one of them")


def _check_writable(key: str, path: str | Path) -> None:
    """`path` is, or can be made, a directory this process writes to; nothing is created here."""
    target = Path(path).absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key}={path}: not writable ({existing} is not a directory)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path}: not writable (no write permission on {existing})")


def check_paths(cfg: Config) -> None:
    """What must exist, or be writable, on this machine: the tokenizer, a resume checkpoint, the run directory,
    the data set (or where a synthetic one will be written), the text-feature sidecar."""
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


Check = Callable[[Config], None]

# In the order vkd_dist.configure.CHECKS runs them (there, with the components' checks between them).
STRUCTURAL: tuple[Check, ...] = (check_choices, check_bounds, check_betas, check_in_chans, check_teacher_path,
                                 check_text_layers, check_overwrite, check_paths)


def check_structure(cfg: Config) -> None:
    """The structural checks alone (a config is checked for work by vkd_dist.configure.validate)."""
    for check in STRUCTURAL:
        check(cfg)
