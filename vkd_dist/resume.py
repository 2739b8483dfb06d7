"""One decision per resume, taken once from verified state and the same on every rank: whether the run directory
may be used, which checkpoint is loaded, which line of checkpoints is continued, and which global batch
(grad_accum) the run trains with.

Each part is decided on rank 0, or from values every rank holds alike, and never from a rank's own look at the
file system while rank 0 renames directories in it: the run directory is claimed by rank 0 (`claim`) and its
answer broadcast; `checkpoint.resolve` verifies from rank 0's listing, every rank hashing a share and reaching
the same answer; the loaded checkpoint's train_state.json is read by rank 0 and broadcast, and the global batch
computed from it (a pure function of it, the config and the number of processes); the line is set aside or brought
back by rank 0 (`lines.continue_line`), its answer broadcast.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from vkd_dist import checkpoint, lines
from vkd_dist.config import Config, ConfigError
from vkd_dist.fileio import atomic_write_text, restrict_access
from vkd_dist.run_dir import RunDir
from vkd_dist.world_size import GlobalBatch, keep_global_batch


@dataclass
class Decision:
    ckpt: Optional[Path]  # the checkpoint to load, verified; None: a fresh start
    saved: Optional[dict]  # its train_state.json
    batch: GlobalBatch
    notes: list = field(default_factory=list)  # lines for the run's log


def claim(cfg: Config) -> list[str]:
    """Rank 0: a run without `resume` starts in a directory holding no other run. One that does is refused in one
    line, or with `overwrite=true` moved aside whole (kept: RunDir.move_aside). Returns the lines to log."""
    run = RunDir(cfg.run_dir)
    held = [] if cfg.resume else run.held()
    if not held:
        return []
    if not cfg.overwrite:
        raise ConfigError(f"run_dir={run} holds another run ({', '.join(held)}): continue it with resume=latest, "
                          "or train into a new run_dir (overwrite=true moves the old run aside, kept)")
    moved = run.move_aside()
    restrict_access(run.path, cfg.data.shared_group)
    return [f"overwrite=true: the run that was in {run} moved to {moved} (kept)"]


def decide(cfg: Config, accelerator) -> Decision:
    """Collective, before anything of the run is read or written: see the module's docstring. Sets
    cfg.optim.grad_accum (and the accelerator's) to what keeps the global batch."""
    notes = checkpoint.on_main(accelerator, lambda: claim(cfg))
    ckpt = checkpoint.resolve(cfg.run_dir, cfg.resume, accelerator)
    if ckpt is None and cfg.resume == "latest":
        notes.append(f"resume=latest: no checkpoint in {RunDir(cfg.run_dir).checkpoints_dir} yet; starting fresh")
    saved = (checkpoint.on_main(accelerator, lambda: json.loads((ckpt / checkpoint.STATE_FILE).read_text()))
             if ckpt is not None else None)
    batch = keep_global_batch(cfg, saved, accelerator.num_processes if accelerator else 1, ckpt)
    if batch.grad_accum != cfg.optim.grad_accum:
        cfg.optim.grad_accum = batch.grad_accum
        if accelerator is not None:
            accelerator.gradient_accumulation_steps = batch.grad_accum
    return Decision(ckpt, saved, batch, [*notes, *([batch.note] if batch.note else [])])


def restore(accelerator, cfg: Config, decision: Decision) -> tuple[Optional[Path], Optional[dict], list[str], bool]:
    """Collective: the decided checkpoint's line continued (`lines.continue_line`) and the checkpoint loaded.
    Returns where it is now, its train_state.json, the lines to log, and whether the line's best/ is on disk."""
    if decision.ckpt is None:
        return None, None, [], True
    change = lines.continue_line(cfg.run_dir, decision.ckpt, accelerator)
    if cfg.resume != "latest" and (accelerator is None or accelerator.is_main_process):
        record_resume(cfg, change.ckpt)
    saved = checkpoint.load(accelerator, change.ckpt)
    return change.ckpt, saved, [change.note] if change.note else [], change.best_kept


def record_resume(cfg: Config, loaded: Path) -> None:
    """RUN/resumed.json: the explicit resume=PATH this run last loaded (and the SLURM job that asked), so a requeue
    of that job knows the rollback it asked for has been made (vkd_dist/slurm_env.py: attempt_resume)."""
    atomic_write_text(RunDir(cfg.run_dir).resumed_file, json.dumps({
        "asked": str(Path(str(cfg.resume)).resolve()), "loaded": str(loaded),
        "slurm_job": os.environ.get("SLURM_JOB_ID"), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        indent=2))
