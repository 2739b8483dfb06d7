"""Checkpoints: crash-consistent save and verified resume of the whole training state, retention, and exports.

A checkpoint is `RUN/checkpoints/step-00000200/`: Accelerate's state (model, optimizer, RNG of every rank;
DeepSpeed's or FSDP's per-rank shard files) plus `train_state.json` (step, data position, best metric) and,
written last, `manifest.json`: every other file's size and SHA-256. It is written under a temporary name, each
node's files are fsynced, and rank 0 writes the manifest and renames the directory into place once every rank
has finished; a save that fails on any rank fails on every rank, leaves no step-* directory and says so.

Resume verifies the manifest before anything is unpickled; `resume=latest` skips (with a warning naming the
file) a checkpoint whose manifest is missing or whose files are missing, truncated, changed or added, in favour
of the newest one that verifies. Rank 0 verifies and broadcasts its choice: every rank then loads the same
checkpoint, and the (shared) files are read once rather than once per rank; a shard written by another node is
visible to rank 0 because the writer closed it before the save's barrier (NFS close-to-open; Lustre is
coherent).

Exports (`best/`, `final/`) hold the image-only model as one consolidated safetensors file; each is a symlink to
a versioned directory, replaced without a moment in which neither version exists (`fileio.publish_dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar

import torch
from accelerate.utils import broadcast_object_list, gather_object
from safetensors.torch import load_file, save_file

from vkd_dist.fileio import atomic_write_text, fsync_path, fsync_tree, publish_dir, share_like_parent, stage_version

CKPT_DIR = "checkpoints"
STATE_FILE = "train_state.json"
MANIFEST_FILE = "manifest.json"
EXPORT_FILE = "model.safetensors"
T = TypeVar("T")


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written, or that does not verify."""


def _step_dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())


def latest(run_dir: str | Path) -> Optional[Path]:
    """The newest step-* directory, unverified (see `resolve` for the one a resume would load)."""
    dirs = _step_dirs(Path(run_dir))
    return dirs[-1] if dirs else None


# --------------------------------------------------------------------------- the manifest
def _files(ckpt: Path) -> dict[str, Path]:
    return {p.relative_to(ckpt).as_posix(): p for p in sorted(ckpt.rglob("*"))
            if p.is_file() and p.name != MANIFEST_FILE}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(ckpt: Path) -> None:
    files = {rel: {"size": p.stat().st_size, "sha256": _sha256(p)} for rel, p in _files(ckpt).items()}
    atomic_write_text(ckpt / MANIFEST_FILE, json.dumps({"files": files}, indent=1))


_verified: dict[tuple, Optional[str]] = {}  # a stat of every file -> verify's answer: resume asks up to 3 times


def verify(ckpt: str | Path) -> Optional[str]:
    """None when `ckpt` holds exactly the files its manifest lists, at their sizes and digests; otherwise what
    is wrong, naming the file."""
    ckpt = Path(ckpt)
    files = _files(ckpt)
    stats = [(p, p.stat()) for p in [*files.values(), ckpt / MANIFEST_FILE] if p.is_file()]
    key = (str(ckpt.resolve()), *((str(p), st.st_size, st.st_mtime_ns) for p, st in stats))
    if key not in _verified:
        _verified[key] = _check(ckpt, files)
    return _verified[key]


def _check(ckpt: Path, files: dict[str, Path]) -> Optional[str]:
    manifest = ckpt / MANIFEST_FILE
    try:
        listed = json.loads(manifest.read_text())["files"]
    except FileNotFoundError:
        return f"{manifest} is missing (the save did not finish)"
    except (ValueError, KeyError, TypeError) as exc:
        return f"{manifest} is unreadable ({exc!r})"
    for rel, want in listed.items():
        path = ckpt / rel
        if rel not in files:
            return f"{path} is missing (expected {want['size']} bytes)"
        size = files[rel].stat().st_size
        if size != want["size"]:
            return f"{path} has {size} bytes, expected {want['size']} (truncated or changed)"
        if _sha256(path) != want["sha256"]:
            return f"{path} does not match its SHA-256 in {MANIFEST_FILE} (changed since the save)"
    extra = sorted(set(files) - set(listed))
    return f"{ckpt / extra[0]} is not in {MANIFEST_FILE} (added after the save)" if extra else None


# --------------------------------------------------------------------------- resume
def _on_main(accelerator, fn: Callable[[], T]) -> T:
    """fn() on the main process only, its result (or its exception, raised on every rank) broadcast to all."""
    if accelerator is None or accelerator.num_processes == 1:
        return fn()
    box: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            box = [(True, fn())]
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            box = [(False, exc)]
    broadcast_object_list(box)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _newest_good(run_dir: Path) -> Optional[Path]:
    dirs, problems = _step_dirs(run_dir), []
    for path in reversed(dirs):
        problem = verify(path)
        if problem is None:
            return path
        problems.append(problem)
        warnings.warn(f"resume=latest: checkpoint {path.name} skipped: {problem}; trying the one before",
                      RuntimeWarning, stacklevel=3)
    if dirs:  # never silently start afresh: retention would then delete the evidence
        raise CheckpointError(f"resume=latest: none of the {len(dirs)} checkpoints under {run_dir / CKPT_DIR} "
                              f"verifies ({'; '.join(problems)}); move them aside to start afresh")
    return None


def resolve(run_dir: str | Path, which: Optional[str], accelerator=None) -> Optional[Path]:
    """`resume` value -> checkpoint directory: None, 'latest' (the newest that verifies; None if there is none
    yet) or a path (which must verify). With an `accelerator`, collective: rank 0 verifies, all get its answer."""
    if which in (None, ""):
        return None
    if which == "latest":
        return _on_main(accelerator, lambda: _newest_good(Path(run_dir)))
    path = Path(which)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint (no {STATE_FILE})")
    problem = _on_main(accelerator, lambda: verify(path))
    if problem is not None:
        raise CheckpointError(f"resume={which}: not a complete checkpoint: {problem}")
    return path


def load(accelerator, path: Path) -> dict:
    """Collective: restore model, optimizer and RNG states; return train_state.json."""
    # DeepSpeed (and Accelerate, for the RNG and optimizer files) read with torch.load(weights_only=False), which
    # unpickles: the manifest is verified first so that only the files this trainer wrote, complete and unchanged,
    # reach it. (An integrity check, not a signature: whoever can write the run directory can rewrite both.)
    problem = _on_main(accelerator, lambda: verify(path))
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} not loaded: {problem}")
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())


# --------------------------------------------------------------------------- save
def _agreed(accelerator, final: Path, fn: Callable[[], None], here: bool = True) -> None:
    """fn() where `here`; when it failed on any rank, every rank raises the same CheckpointError (one rank's
    full disk must not leave the others waiting in the next collective) and the partial save is removed."""
    error = None
    if here:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - shared, then raised on every rank
            filename = getattr(exc, "filename", None)
            where = f"{filename}, " if filename else ""
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
            error = f"{reason} ({where}rank {accelerator.process_index})"
    errors = [e for e in (gather_object([error]) if accelerator.num_processes > 1 else [error]) if e]
    if not errors:
        return
    if accelerator.is_main_process:
        shutil.rmtree(final.with_name(f".tmp-{final.name}"), ignore_errors=True)  # frees the space
    previous = next((d for d in reversed(_step_dirs(final.parent.parent)) if d != final), None)
    intact = f"the previous checkpoint {previous.name} is intact" if previous else "there is no earlier checkpoint"
    raise CheckpointError(f"checkpoint {final.name} not written: {errors[0]}; {intact}")


def _commit(tmp: Path, final: Path, state: dict) -> None:
    """Rank 0, once every rank's files are on disk: train_state.json, the manifest (last), the rename."""
    atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=2))
    share_like_parent(tmp)  # a shared group reads the weights too (data.shared_group)
    if delay := os.environ.get("VKD_TEST_SAVE_DELAY_S"):  # test-only: widens the window tests/test_kill.py kills in
        time.sleep(float(delay))
    write_manifest(tmp)
    fsync_path(tmp)
    if final.exists():  # re-saving a step after a resume: move the old one aside first
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    fsync_path(final.parent)


def save(accelerator, run_dir: str | Path, step: int, state: dict, keep_last: int) -> Path:
    """Collective: every rank must call. Returns the final checkpoint directory; raises CheckpointError on every
    rank when any rank could not write its part (the previous checkpoints are then untouched)."""
    root = Path(run_dir) / CKPT_DIR
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    _agreed(accelerator, final, lambda: accelerator.save_state(str(tmp), safe_serialization=True))
    # One process per node flushes what every rank on the node wrote (page caches are per node).
    _agreed(accelerator, final, lambda: fsync_tree(tmp), here=accelerator.is_local_main_process)
    _agreed(accelerator, final, lambda: _commit(tmp, final, {**state, "step": step}),
            here=accelerator.is_main_process)
    if accelerator.is_main_process:
        for stale in _step_dirs(Path(run_dir))[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
        for leftover in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:  # from a crash in an earlier save
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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
    staged = stage_version(out_dir)  # out_dir becomes a symlink to it: readers never find out_dir missing
    save_file(tensors, str(staged / EXPORT_FILE), metadata={"format": "pt"})
    (staged / "meta.json").write_text(json.dumps(meta, indent=2))
    share_like_parent(staged)  # a shared group reads the weights too (data.shared_group)
    publish_dir(staged, out_dir)
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
