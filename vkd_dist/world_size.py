"""Resuming a run on another number of processes than it was saved on.

- The global batch (batch_size x grad_accum x processes) stays the one the run asked for when grad_accum can make
  it so; the run says in one line how grad_accum changed, or, where it cannot, how the global batch changed (the
  lr schedule is a function of the step and optim.lr is not rescaled). The ask is saved in every checkpoint
  (`global_batch`, `asked_grad_accum`), so a second resume compares with it, not with an adjusted grad_accum:
  4 processes x 1 -> 2 x 2 -> 2 x 2 again, and 2 x 2 -> 1 x 4. A grad_accum changed on the command line is a
  new ask.
- DDP and FSDP2 load the model and optimizer on any number of processes (one full copy; DCP reshards). DeepSpeed
  ZeRO's per-rank optimizer shards load only on the number that wrote them: such a resume is refused in one line.
- The data: vkd_dist/data/rest.py reads the rest of the interrupted epoch exactly once.

Decided from the checkpoint a resume loads (verified, the same on every rank: vkd_dist/resume.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from vkd_dist.config import ConfigError
from vkd_dist.strategy import resolve

if TYPE_CHECKING:
    from vkd_dist.config import Config


@dataclass
class GlobalBatch:
    """What a run trains with: grad_accum, and the ask it keeps (saved in every checkpoint)."""

    grad_accum: int
    global_batch: int  # samples per optimizer step the run asked for
    asked_grad_accum: int  # optim.grad_accum as the run was (last) asked to train with
    note: Optional[str] = None  # the line to log when something changed


def fresh(cfg: Config, world: int) -> GlobalBatch:
    return GlobalBatch(cfg.optim.grad_accum, cfg.data.batch_size * cfg.optim.grad_accum * world, cfg.optim.grad_accum)


def keep_global_batch(cfg: Config, saved: Optional[dict], world: int, ckpt: Optional[Path] = None) -> GlobalBatch:
    """The grad_accum a run on `world` processes trains with, resuming from `saved` (a train_state.json; None: a
    fresh start). Refuses what the strategy cannot load on another number of processes."""
    if not saved or not saved.get("world_size"):
        return fresh(cfg, world)
    old_world, old_accum = int(saved["world_size"]), int(saved.get("grad_accum") or 1)
    batch, asked = cfg.data.batch_size, cfg.optim.grad_accum
    if old_world != world and resolve(cfg).deepspeed:
        raise ConfigError(
            f"resume={ckpt}: written by {old_world} process(es) under {resolve(cfg).name}, whose ZeRO optimizer "
            f"shards load only on {old_world}; resume on {old_world} process(es) (DeepSpeed's universal checkpoint, "
            "python -m deepspeed.checkpoint.ds_to_universal, converts them, but this trainer does not load that "
            "format yet)")
    # Checkpoints written before the ask was saved: what they trained with was the ask.
    saved_ask = int(saved.get("asked_grad_accum") or old_accum)
    target = int(saved.get("global_batch") or old_world * old_accum * batch)
    was = old_world * old_accum * batch  # what the saved run trained with
    where = f"resumed on {world} process(es), saved on {old_world}"
    if asked != saved_ask:  # a new ask on the command line: it wins
        now = world * asked * batch
        note = None if now == was else (f"{where}: optim.grad_accum={asked} asked (was {saved_ask}): the global batch "
                                        f"changes from {was} to {now} samples per step; the lr schedule is by step "
                                        "and optim.lr is not rescaled")
        return GlobalBatch(asked, now, asked, note)
    if target % (world * batch) == 0:
        accum = target // (world * batch)
        note = None if accum == old_accum else (f"{where}: optim.grad_accum {old_accum} -> {accum} keeps the global "
                                                f"batch at {target} samples per step")
        return GlobalBatch(accum, target, asked, note)
    now = world * asked * batch
    return GlobalBatch(asked, target, asked,
                       f"{where}: the global batch changes from {target} to {now} samples per step ({target} "
                       f"samples do not divide into batches of {batch} over {world} process(es); "
                       f"optim.grad_accum={asked}); the lr schedule is by step and optim.lr is not rescaled")
