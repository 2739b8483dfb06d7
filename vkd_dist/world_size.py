"""Resuming a run on another number of processes than it was saved on.

- The global batch (batch_size x grad_accum x processes) stays what it was when grad_accum can make it so; the
  run says in one line how grad_accum changed, or, where it cannot, how the global batch changed (the lr schedule
  is a function of the step and optim.lr is not rescaled).
- DDP and FSDP2 load the model and optimizer on any number of processes (one full copy; DCP reshards). DeepSpeed
  ZeRO's per-rank optimizer shards load only on the number that wrote them: such a resume is refused in one line.
- The data: vkd_dist/data/rest.py reads the rest of the interrupted epoch exactly once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from vkd_dist import checkpoint
from vkd_dist.config import ConfigError
from vkd_dist.strategy import resolve

if TYPE_CHECKING:
    from vkd_dist.config import Config


def launched_world() -> int:
    """The number of processes of this launch, known before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _saved_state(cfg: Config) -> tuple[Optional[Path], Optional[dict]]:
    """The checkpoint a resume would most likely load and its train_state.json (unverified: `checkpoint.resolve`
    checks it, and names what is wrong)."""
    ckpt = checkpoint.candidate(cfg.run_dir, cfg.resume)
    try:
        return ckpt, json.loads((ckpt / checkpoint.STATE_FILE).read_text()) if ckpt is not None else None
    except (OSError, ValueError):
        return ckpt, None


def keep_global_batch(cfg: Config, world: Optional[int] = None) -> Optional[str]:
    """Before the accelerator is built: on a resume at another number of processes, refuse what the strategy
    cannot load there, and set optim.grad_accum so the global batch stays the same; returns the line to log (None
    when nothing changed)."""
    ckpt, saved = _saved_state(cfg)
    if not saved or not saved.get("world_size"):
        return None
    world = world or launched_world()
    old_world, old_accum = int(saved["world_size"]), int(saved.get("grad_accum") or 1)
    if old_world == world:
        return None
    strategy = resolve(cfg)
    if strategy.deepspeed:
        raise ConfigError(
            f"resume={ckpt}: written by {old_world} process(es) under {strategy.name}, whose ZeRO optimizer shards "
            f"load only on {old_world}; resume on {old_world} process(es) (DeepSpeed's universal checkpoint, "
            "python -m deepspeed.checkpoint.ds_to_universal, converts them, but this trainer does not load that "
            "format yet)")
    per_step = old_world * old_accum  # micro-batches per optimizer step, all ranks together
    batch = cfg.data.batch_size
    if cfg.optim.grad_accum == old_accum and per_step % world == 0:
        cfg.optim.grad_accum = per_step // world
        return (f"resumed on {world} process(es), saved on {old_world}: optim.grad_accum {old_accum} -> "
                f"{cfg.optim.grad_accum} keeps the global batch at {per_step * batch} samples per step")
    new = world * cfg.optim.grad_accum * batch
    return (f"resumed on {world} process(es), saved on {old_world}: the global batch changes from "
            f"{per_step * batch} to {new} samples per step (optim.grad_accum={cfg.optim.grad_accum}"
            f"{'' if per_step % world else f'; {per_step} micro-batches do not divide over {world}'}); the lr "
            "schedule is by step and optim.lr is not rescaled")
