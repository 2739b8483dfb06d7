"""The parallelism strategy of a run, decided in one place.

One name per layout: ddp | deepspeed_zero1 | deepspeed_zero2 | deepspeed_zero3 | fsdp2. It comes from
`dist.strategy` in the training config, or, with `dist.strategy: auto` (or null), from how the run was launched:
what `accelerate launch --config_file configs/accelerate/X.yaml` exported, or what the SLURM job exported. Where
two sources both name a strategy they must agree; a disagreement is a one-line ConfigError naming both, never
a silent winner. Environment variables are only how Accelerate is told (`accelerate_env`).

The ZeRO layouts are configs/deepspeed/zero{1,2,3}.json (zero3_offload.json with dist.offload_optimizer) and the
FSDP2 settings are configs/accelerate/fsdp2.yaml, whoever launches the run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import yaml

from vkd_dist.config import REPO_ROOT, ConfigError

if TYPE_CHECKING:
    import torch

    from vkd_dist.config import Config

STRATEGIES = ("ddp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "fsdp2")
AUTO = ("auto", None)
DEEPSPEED_DIR = REPO_ROOT / "configs" / "deepspeed"
FSDP2_YAML = REPO_ROOT / "configs" / "accelerate" / "fsdp2.yaml"
DS_FILE_ENV = "ACCELERATE_DEEPSPEED_CONFIG_FILE"
# accelerate launch always exports ACCELERATE_MIXED_PRECISION; the USE_ flags also come from the SLURM job.
_LAUNCH_MARKERS = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")
# What the SLURM job clears before exporting its own choice (a submitting shell's values are not meaningful).
_STRATEGY_ENV_PREFIXES = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "ACCELERATE_DEEPSPEED_", "FSDP_")


@dataclass(frozen=True)
class Strategy:
    name: str  # one of STRATEGIES
    source: str = "the default"  # where the name came from, for error messages

    @property
    def deepspeed(self) -> bool:
        return self.name.startswith("deepspeed_")

    @property
    def zero_stage(self) -> Optional[int]:
        return int(self.name[-1]) if self.deepspeed else None

    @property
    def fsdp2(self) -> bool:
        return self.name == "fsdp2"

    @property
    def shards_parameters(self) -> bool:
        """Whether a rank holds only a shard of each parameter (a full one must be gathered to read it)."""
        return self.name in ("deepspeed_zero3", "fsdp2")

    def __str__(self) -> str:
        return f"{self.source} says {self.name}"


def check_name(name: str, source: str) -> str:
    if name not in STRATEGIES:
        raise ConfigError(f"{source}={name!r} is not a strategy (allowed: {', '.join(STRATEGIES)}, or auto)")
    return name


def agree(*candidates: Optional[Strategy]) -> Optional[Strategy]:
    """The one strategy the given sources name (None where none does); ConfigError when two disagree."""
    named = [c for c in candidates if c is not None]
    for other in named[1:]:
        if other.name != named[0].name:
            raise ConfigError(f"strategy conflict: {named[0]}, {other}; make them agree "
                              "(dist.strategy: auto follows the launch)")
    return named[0] if named else None


def check_config(cfg: Config) -> None:
    """dist.strategy is a strategy (or auto); dist.offload_optimizer only with deepspeed_zero3 (or auto)."""
    strategy = configured(cfg)
    if cfg.dist.offload_optimizer and strategy is not None and strategy.name != "deepspeed_zero3":
        raise ConfigError(f"dist.offload_optimizer=true needs dist.strategy=deepspeed_zero3 (or auto), "
                          f"not {strategy.name}")


def configured(cfg: Config) -> Optional[Strategy]:
    """What the training config asks for; None for auto/null."""
    if cfg.dist.strategy in AUTO:
        return None
    return Strategy(check_name(cfg.dist.strategy, "dist.strategy"), "dist.strategy in the training config")


def _truthy(env: Mapping[str, str], key: str) -> bool:
    return env.get(key, "false").lower() == "true"


def zero_stage_of(path: str | Path) -> int:
    """zero_optimization.stage of a DeepSpeed JSON (0 when it has none)."""
    try:
        ds = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"DeepSpeed config {path}: {exc}") from exc
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def deepspeed_strategy(stage: int, source: str) -> Strategy:
    if stage not in (1, 2, 3):
        raise ConfigError(f"{source}: ZeRO stage {stage} is not supported (allowed: 1, 2, 3)")
    return Strategy(f"deepspeed_zero{stage}", source)


def launched(env: Optional[Mapping[str, str]] = None) -> Optional[Strategy]:
    """What the launch environment says: None for a plain `python`/`torchrun` start, which names nothing."""
    env = os.environ if env is None else env
    if _truthy(env, "ACCELERATE_USE_DEEPSPEED"):
        if env.get(DS_FILE_ENV):
            path = env[DS_FILE_ENV]
            stage = zero_stage_of(path)
            return deepspeed_strategy(stage, f"the DeepSpeed JSON {path} (zero_optimization.stage={stage})")
        stage = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))  # Accelerate's own default
        return deepspeed_strategy(stage, f"the accelerate launch (ACCELERATE_DEEPSPEED_ZERO_STAGE={stage})")
    if _truthy(env, "ACCELERATE_USE_FSDP"):
        version = env.get("FSDP_VERSION", "1")
        if version != "2":
            raise ConfigError(f"the accelerate launch config sets FSDP_VERSION={version}: only FSDP2 is supported "
                              f"(fsdp_version: 2, see {FSDP2_YAML.relative_to(REPO_ROOT)})")
        return Strategy("fsdp2", "the accelerate launch config (FSDP_VERSION=2)")
    if any(key in env for key in _LAUNCH_MARKERS):
        return Strategy("ddp", "the accelerate launch config (no DeepSpeed, no FSDP)")
    return None


def resolve(cfg: Config, env: Optional[Mapping[str, str]] = None) -> Strategy:
    """The effective strategy of this process: the config key and the launch must agree; neither = ddp."""
    return agree(configured(cfg), launched(env)) or Strategy("ddp")


# --------------------------------------------------------------------------- telling Accelerate
def _stage(strategy: Strategy) -> int:
    if strategy.zero_stage is None:
        raise ValueError(f"{strategy.name} is not a DeepSpeed strategy")
    return strategy.zero_stage


def deepspeed_json(stage: int, offload_optimizer: bool = False) -> Path:
    """The shipped ZeRO layout for `stage` (the same file for accelerate launch and SLURM)."""
    if offload_optimizer and stage != 3:
        raise ConfigError(f"dist.offload_optimizer=true ships for ZeRO-3 only "
                          f"({DEEPSPEED_DIR.name}/zero3_offload.json); the strategy is deepspeed_zero{stage}")
    return DEEPSPEED_DIR / (f"zero{stage}_offload.json" if offload_optimizer else f"zero{stage}.json")


def deepspeed_file(strategy: Strategy, offload_optimizer: bool = False,
                   env: Optional[Mapping[str, str]] = None) -> Path:
    """The DeepSpeed JSON this run uses: the launch's file if it named one, else the shipped one."""
    env = os.environ if env is None else env
    offload = offload_optimizer or env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") == "cpu"
    return Path(env[DS_FILE_ENV]) if env.get(DS_FILE_ENV) else deepspeed_json(_stage(strategy), offload)


# fsdp_config keys of an accelerate YAML -> the variables `accelerate launch` exports for them
_FSDP_KEYS = {"fsdp_version": "FSDP_VERSION", "fsdp_auto_wrap_policy": "FSDP_AUTO_WRAP_POLICY",
              "fsdp_transformer_layer_cls_to_wrap": "FSDP_TRANSFORMER_CLS_TO_WRAP",
              "fsdp_min_num_params": "FSDP_MIN_NUM_PARAMS", "fsdp_reshard_after_forward": "FSDP_RESHARD_AFTER_FORWARD",
              "fsdp_state_dict_type": "FSDP_STATE_DICT_TYPE", "fsdp_offload_params": "FSDP_OFFLOAD_PARAMS",
              "fsdp_cpu_ram_efficient_loading": "FSDP_CPU_RAM_EFFICIENT_LOADING",
              "fsdp_activation_checkpointing": "FSDP_ACTIVATION_CHECKPOINTING"}


def fsdp2_env(path: Path = FSDP2_YAML) -> dict[str, str]:
    """configs/accelerate/fsdp2.yaml's fsdp_config as `accelerate launch` would export it."""
    fsdp = (yaml.safe_load(path.read_text()) or {}).get("fsdp_config") or {}
    unknown = sorted(set(fsdp) - set(_FSDP_KEYS))
    if unknown:  # never drop a setting silently
        raise ConfigError(f"{path}: fsdp_config.{unknown[0]} is not passed on outside accelerate launch "
                          f"(known: {', '.join(sorted(_FSDP_KEYS))})")
    return {"ACCELERATE_USE_FSDP": "true",
            **{_FSDP_KEYS[k]: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fsdp.items()}}


def accelerate_env(name: str, offload_optimizer: bool = False) -> dict[str, str]:
    """The variables that tell Accelerate to run `name` (what its launch config would export)."""
    strategy = Strategy(check_name(name, "strategy"))
    env = {"ACCELERATE_USE_DEEPSPEED": str(strategy.deepspeed).lower(), "ACCELERATE_USE_FSDP": "false"}
    if strategy.deepspeed:
        env[DS_FILE_ENV] = str(deepspeed_json(_stage(strategy), offload_optimizer))
    if strategy.fsdp2:
        env.update(fsdp2_env())
    return env


def clear_strategy_env(env: MutableMapping[str, str] = os.environ) -> None:
    """Drop what a submitting shell left behind, before `accelerate_env` is exported."""
    for key in [k for k in env if k.startswith(_STRATEGY_ENV_PREFIXES)]:
        del env[key]


# --------------------------------------------------------------------------- a running strategy
def of_accelerator(accelerator) -> Strategy:
    """The strategy an Accelerator actually runs."""
    ds = accelerator.state.deepspeed_plugin
    if ds is not None:
        return Strategy(f"deepspeed_zero{ds.zero_stage}", "the Accelerator")
    if getattr(accelerator, "is_fsdp2", False):
        return Strategy("fsdp2", "the Accelerator")
    return Strategy("ddp", "the Accelerator")


def full_parameters(accelerator, model) -> Iterator[tuple[str, torch.Tensor]]:
    """Collective: (name, full fp32 CPU copy) of every parameter, gathering sharded ones one at a time."""
    strategy = of_accelerator(accelerator)
    for name, p in accelerator.unwrap_model(model).named_parameters():
        gather = nullcontext()
        if strategy.deepspeed and strategy.shards_parameters:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([p], modifier_rank=None)
        with gather:
            data = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2: a sharded DTensor
            yield name, data.detach().float().cpu().contiguous()
