"""Each rank's own buffers, kept in a checkpoint a stop wrote at a step where an uninterrupted run does not sync
them (no validation, no regular checkpoint there).

Buffers (BatchNorm running statistics) differ between ranks between syncs (vkd_dist.distributed.sync_buffers). A
checkpoint holds one model, synced, so that it is consistent; a stop at any other step than a sync step also
writes `rank-buffers/rank-R.safetensors` (every rank's own buffers, in the manifest like every file), and keeps
its own buffers in memory. A resume on the same number of processes puts each rank's own back, so training goes on
exactly as if it had not stopped; on another number there is no such state to go back to, and the synced model
is what every rank starts from.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FOLDER = "rank-buffers"


def own(accelerator, model) -> dict[str, torch.Tensor]:
    """This rank's buffers, copied (before a sync overwrites them)."""
    return {name: buf.detach().clone() for name, buf in accelerator.unwrap_model(model).named_buffers()}


def put_back(accelerator, model, buffers: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, buf in accelerator.unwrap_model(model).named_buffers():
            buf.copy_(buffers[name].to(buf.device))


def write(ckpt: Path, rank: int, buffers: dict[str, torch.Tensor]) -> None:
    """Every rank, into the checkpoint being written (before its files are listed and hashed)."""
    (ckpt / FOLDER).mkdir(exist_ok=True)
    save_file({k: v.cpu().contiguous() for k, v in buffers.items()}, str(ckpt / FOLDER / f"rank-{rank}.safetensors"))


def restore(accelerator, model, ckpt: Path, saved_world: int) -> bool:
    """After the checkpoint loaded: each rank's own buffers back, when it has them and the number of processes is
    the one that wrote them. Returns whether it did (the buffers then differ between ranks: not synced)."""
    path = ckpt / FOLDER / f"rank-{accelerator.process_index}.safetensors"
    if saved_world != accelerator.num_processes or not path.is_file():
        return False
    put_back(accelerator, model, load_file(str(path)))
    return True
