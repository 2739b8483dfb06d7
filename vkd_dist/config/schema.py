"""The configuration tree's shape: one dataclass per section, and the error every check raises."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
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
    # < 1: a seeded 1 - F of the training studies have a report but no labels (vkd_dist/data/synthetic.py)
    label_fraction: float = 1.0
    label_seed: Optional[int] = None  # seed of which studies keep labels (null: `seed`): another subset, same images
    # true: the observation testbed (vkd_dist/data/testbed.py): a true state draws the image, a radiologist's report
    # observes it with these error rates, training labels are the report labeller's reading (or, for a gold share
    # of the labelled studies, the truth), validation and test labels the truth; label_noise is not used
    testbed: bool = False
    miss_rate: float = 0.1
    false_rate: float = 0.02
    hedge_rate: float = 0.15
    gold_fraction: float = 0.0


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
    # How training reads the labels; null = the data set's training policy (dataset.json train_policy, else its
    # eval_policy: a model trained on the targets it is scored on). Unlabelled studies are masked whatever these say.
    uncertain: Optional[str] = None  # what -1 labels become: ignore (masked) | ones | zeros
    missing: Optional[str] = None  # what blank (unmentioned) labels become: mask | negative
    augment: bool = True
    hflip: bool = False  # off by default: laterality matters in chest X-rays
    max_rotate_deg: float = 5.0
    max_translate: float = 0.03
    scale_range: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    text_features: Optional[str] = None  # sidecar of precomputed text-encoder outputs (frozen-text fast path)
    # Where some training studies have no labels: the share of each batch that is labelled studies, for objectives
    # that learn from both (kd, vkd); objectives that learn from labels alone read labelled studies only, and
    # those that use no labels (contrastive) every study as drawn. null: every objective reads every study as
    # drawn, whatever its labels. No effect when every study is labelled (vkd_dist/data/compose.py).
    labelled_share: Optional[float] = 0.5
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
    # the image path's classifier: shared (p(y|z), the report path's too) | separate (its own, on [z, pooled image
    # features], as the authors' code); applies to every objective with an image path
    image_head: str = "shared"
    # a run directory (or a checkpoint / export in one) whose weights start this run's modules named in
    # init_modules (vkd_dist/init_from.py); e.g. an objective=contrastive run's image encoder, fine-tuned
    init_from: Optional[str] = None
    init_modules: list = field(default_factory=lambda: ["image_encoder"])
    freeze_image: bool = False  # the image encoder's weights stay as initialised (with init_from: a linear probe)
    projection_dim: int = 128  # objective=contrastive: the shared embedding both encoders project into


@dataclass
class ObjectiveConfig:
    name: str = "vkd"  # any registered objective (vkd_dist/objectives): vkd | image_only | text_only | kd | contrastive
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
    # vkd only: the image path's BCE on sample (K samples of p) | mean (mu_p, what inference reads)
    image_bce: str = "sample"
    detach_posterior: bool = False  # vkd: KL(stopgrad(q) || p): the prior regresses onto the report's code
    free_bits: float = 0.0  # vkd: nats per latent dimension; each dim's batch-mean KL counts as max(KL_d, free_bits)
    # vkd: weight of BCE(image path, the report path's predictive E_q[p(y|z)]) on every study, labelled or not
    predictive_weight: float = 0.0
    # a text_only run directory (or a checkpoint in one): the report path (text encoder, posterior head,
    # classifier) starts from its weights, and the run uses its tokenizer
    text_init: Optional[str] = None
    # kd and vkd: the studies the distillation terms (kd's soft targets; vkd's KL and predictive term) act on:
    # all | unlabelled (labelled studies then learn from their labels alone)
    distil_on: str = "all"


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
    # CPU runs: torch's intra-op threads per process. null = the cores this process may use / the processes on
    # its node (`accelerate launch` exports OMP_NUM_THREADS=1 on a CPU machine, which would leave cores idle)
    cpu_threads: Optional[int] = None


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
    # RUN/ledger/rank-R.csv: epoch,step,key of every training sample each rank consumed (keys only, no report text)
    sample_ledger: bool = False


@dataclass
class Config:
    run_dir: str = "runs/default"
    resume: Optional[str] = None  # None | latest | a checkpoint directory
    # A new run in a run_dir that holds another run: move that run aside whole (kept as RUN.previous-<UTC time>)
    # instead of refusing. Never recorded in config.yaml.
    overwrite: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


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


def not_allowed(key: str, value: Any, allowed: Iterable[Optional[str]]) -> ConfigError:
    names = ["null" if a is None else str(a) for a in allowed]
    return ConfigError(f"{key}={value!r} is not allowed (allowed: {', '.join(names)}{did_you_mean(value, names)})")


def unknown_key(key: str, where: str, allowed: Iterable[str], elsewhere: Iterable[str] = ()) -> ConfigError:
    """`elsewhere`: the dotted keys of the same name in other sections (`config_keys_named`); when there are any
    the message points to them (`train.lr`: lr is a key of optim) rather than to a close name in `where`."""
    allowed, name = sorted(allowed), key.rsplit(".", 1)[-1]
    elsewhere = list(elsewhere)
    if elsewhere:
        homes = [f"{k.rsplit('.', 1)[0]} ({k})" if "." in k else f"the top level ({k})" for k in elsewhere]
        hint = f"; {name} is a key of {' and '.join(homes)}"
    else:
        hint = did_you_mean(name, allowed)
    return ConfigError(f"unknown key {key} ({where} allows: {', '.join(allowed)}{hint})")


def config_keys_named(name: str, cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the tree whose last part is `name` (sections included), in declaration order."""
    found: list[str] = []
    for key, tp in typing.get_type_hints(cls).items():
        if key == name:
            found.append(prefix + key)
        if isinstance(tp, type) and is_dataclass(tp):  # a section
            found += config_keys_named(name, tp, f"{prefix}{key}.")
    return found


def no_dataset(path: str | Path) -> ConfigError:
    return ConfigError(f"data.path={path}: no dataset.json there (convert data with vkd-data first; "
                       "data.build_synthetic=true builds a synthetic corpus there)")
