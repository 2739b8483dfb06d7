"""Checkpoints: atomic save and resume of the whole training state, retention, and model exports.

A checkpoint is `RUN/checkpoints/step-00000200/`: Accelerate's state (model, optimizer, RNG of every rank;
DeepSpeed's sharded files under ZeRO) plus `train_state.json` (step, data position, best metric). It is
written under a temporary name and renamed into place by rank 0 once every rank has finished, so a crash
during a save never spoils the previous checkpoint and a directory named step-* is always complete.
Exports (`best/`, `final/`) hold the image-only model as one consolidated safetensors file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

CKPT_DIR = "checkpoints"
STATE_FILE = "train_state.json"
EXPORT_FILE = "model.safetensors"


def _step_dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())


def latest(run_dir: str | Path) -> Optional[Path]:
    dirs = _step_dirs(Path(run_dir))
    return dirs[-1] if dirs else None


def resolve(run_dir: str | Path, which: Optional[str]) -> Optional[Path]:
    """`resume` value -> checkpoint directory: None, 'latest' (None if there is none yet) or a path."""
    if which in (None, ""):
        return None
    if which == "latest":
        return latest(run_dir)
    path = Path(which)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint (no {STATE_FILE})")
    return path


def save(accelerator, run_dir: str | Path, step: int, state: dict, keep_last: int) -> Path:
    """Collective: every rank must call. Returns the final checkpoint directory."""
    root = Path(run_dir) / CKPT_DIR
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))
        if final.exists():  # re-saving a step after a resume: move the old one aside first
            old = root / f".old-step-{step:08d}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        for stale in _step_dirs(Path(run_dir))[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
        for leftover in root.glob(".tmp-step-*"):  # from a crash during an earlier save
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: Path) -> dict:
    """Collective: restore model, optimizer and RNG states; return train_state.json."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())


def export_image_model(accelerator, model, out_dir: str | Path, meta: dict) -> Optional[Path]:
    """Collective (ZeRO-3 gathers the shards): write the consolidated image-only weights as safetensors."""
    state = accelerator.get_state_dict(model)  # full, unwrapped state on rank 0
    if not accelerator.is_main_process:
        return None
    unwrapped = accelerator.unwrap_model(model)
    keep = set(unwrapped.deploy_state_dict()) if hasattr(unwrapped, "deploy_state_dict") else set(state)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items() if k in keep}
    if len(tensors) < len(keep):
        missing = sorted(keep - set(tensors))
        raise RuntimeError(f"export to {out_dir}: {len(missing)} of {len(keep)} deployable tensors are not in the "
                           f"model's state dict (first: {missing[0]!r}; "
                           f"state keys look like {next(iter(state), None)!r})")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / EXPORT_FILE), metadata={"format": "pt"})
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir / EXPORT_FILE


def find_weights(run_dir: str | Path, which: str) -> Path:
    """'best' | 'last' | 'final' | a path (file or directory) -> a safetensors weights file."""
    run_dir = Path(run_dir)
    if which in ("best", "final"):
        path = run_dir / which / EXPORT_FILE
    elif which == "last":
        final = run_dir / "final" / EXPORT_FILE
        ckpt = latest(run_dir)
        path = final if final.is_file() else (ckpt / EXPORT_FILE if ckpt else final)
    else:
        path = Path(which)
        if path.is_dir():
            path = path / EXPORT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path} (checkpoint={which!r}, run {run_dir})")
    return path


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
