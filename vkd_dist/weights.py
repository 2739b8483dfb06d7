"""The weights a run leaves, as one safetensors file each: its exports (`best/`, `final/`: the image-only model)
and its checkpoints' model weights.

Exports are written collectively (ZeRO-3 and FSDP2 gather their shards) and published as a symlink to a versioned
directory, replaced without a moment in which neither version exists (`fileio.publish_dir`).

`find_weights(RUN, "last")` of a run without `final/` whose newest checkpoint holds sharded weights (DeepSpeed
ZeRO, FSDP2's torch.distributed.checkpoint files) consolidates them once into
`checkpoints/.consolidated-step-X/model.safetensors` (outside every manifest; removed with its step).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from vkd_dist.checkpoint import CKPT_DIR, CONSOLIDATED, MANIFEST_FILE, STATE_FILE, _sha256, latest, verify
from vkd_dist.fileio import atomic_write_text, fsync_path, publish_dir, share_like_parent, stage_version
from vkd_dist.run_dir import EXPORT_FILE, EXPORTS, RunDir

ZERO_TAG = "pytorch_model"  # Accelerate's DeepSpeed checkpoint tag (its MODEL_NAME), a folder of the checkpoint
FSDP_DCP_DIR = "pytorch_model_fsdp_0"  # Accelerate's FSDP SHARDED_STATE_DICT folder (torch.distributed.checkpoint)


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
        path = RunDir(run_dir).export_weights(which)
    elif which == "last":
        final = RunDir(run_dir).export_weights("final")
        ckpt = latest(run_dir)
        path = final if final.is_file() or ckpt is None else _checkpoint_weights(ckpt)
    else:
        path = Path(which)
        if path.is_dir():
            path = _checkpoint_weights(path) if (path / STATE_FILE).is_file() else path / EXPORT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path} (checkpoint={which!r}, run {run_dir})")
    return path


def _checkpoint_weights(ckpt: Path) -> Path:
    """A checkpoint's model weights as one safetensors file: its own (DDP), or its sharded ones consolidated."""
    if (ckpt / EXPORT_FILE).is_file() or not ((ckpt / ZERO_TAG).is_dir() or (ckpt / FSDP_DCP_DIR).is_dir()):
        return ckpt / EXPORT_FILE
    return consolidated_weights(ckpt)


def consolidated_weights(ckpt: str | Path) -> Path:
    """The model weights of a checkpoint saved under DeepSpeed ZeRO (any stage) or FSDP2, whose shards are
    DeepSpeed's or torch.distributed.checkpoint's files, as one safetensors file with the model's own state-dict
    keys (as a DDP checkpoint's model.safetensors and the exports have them): consolidated once, after the
    checkpoint verifies (both formats unpickle), into `checkpoints/.consolidated-step-X/` beside it (written
    atomically, with a meta.json naming the step), and reused while the checkpoint's manifest is unchanged.
    FileNotFoundError, one line naming the command to run, where it cannot be written or read."""
    ckpt = Path(ckpt)
    cache = ckpt.with_name(f"{CONSOLIDATED}{ckpt.name}")
    out, meta_path = cache / EXPORT_FILE, cache / "meta.json"
    zero = (ckpt / ZERO_TAG).is_dir()
    command = (f"python -m deepspeed.utils.zero_to_fp32 {ckpt} OUT_DIR --tag {ZERO_TAG} --safe_serialization" if zero
               else f"python -m torch.distributed.checkpoint.format_utils dcp_to_torch {ckpt / FSDP_DCP_DIR} OUT.pt")
    manifest = ckpt / MANIFEST_FILE
    stamp = _sha256(manifest) if manifest.is_file() else None
    try:
        if stamp and out.is_file() and json.loads(meta_path.read_text()).get("manifest_sha256") == stamp:
            return out
    except (OSError, ValueError):
        pass  # no cache yet, or one from another version of this step: consolidated anew
    problem = verify(ckpt)
    if problem is not None:
        raise FileNotFoundError(f"no consolidated weights for {ckpt}: the checkpoint does not verify ({problem})")
    try:
        state = _read_zero(ckpt) if zero else _read_dcp(ckpt / FSDP_DCP_DIR)
    except ImportError as exc:
        raise FileNotFoundError(f"{ckpt} holds sharded weights and {exc.name or exc} is not installed here to "
                                f"consolidate them; where it is, run: {command}") from None
    # Each tensor its own storage (DeepSpeed's are views of one flat buffer; safetensors refuses shared ones).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    step = json.loads((ckpt / STATE_FILE).read_text()).get("step")
    try:
        cache.mkdir(exist_ok=True)
        tmp = cache / f".{EXPORT_FILE}.tmp-{os.getpid()}"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        fsync_path(tmp)
        os.replace(tmp, out)
        atomic_write_text(meta_path, json.dumps({"step": step, "consolidated_from": f"{CKPT_DIR}/{ckpt.name}",
                                                 "manifest_sha256": stamp}, indent=2))
    except OSError as exc:
        raise FileNotFoundError(f"cannot write the consolidated weights of {ckpt} to {out} "
                                f"({exc.strerror or exc}); run instead: {command}") from None
    return out


def _read_zero(ckpt: Path) -> dict[str, Any]:
    """DeepSpeed's own fp32 consolidation of a ZeRO-1/2/3 checkpoint (parameters and buffers, the module's keys)."""
    import contextlib
    import sys

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(sys.stderr):  # it prints its progress; stdout may be a command's output
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=ZERO_TAG)


def _read_dcp(dcp_dir: Path) -> dict[str, Any]:
    """A torch.distributed.checkpoint directory read whole in one process, as `dcp_to_torch_save` reads it;
    Accelerate saves the model's state dict under the key "model"."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(dcp_dir)), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    model = state.get("model")
    return model if isinstance(model, dict) else state


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a set of tensors (names, dtypes, shapes and values; not the file that holds them): equal for
    best/ and final/ when they hold the same weights, and for an export and the run it came from."""
    from safetensors.torch import save

    ordered = {k: tensors[k].detach().to("cpu").contiguous() for k in sorted(tensors)}
    return "sha256:" + hashlib.sha256(save(ordered)).hexdigest()


def scored_export(run_dir: str | Path) -> Optional[str]:
    """The export (best, else final) whose weights RUN/test_metrics.json describes, by their digest (by the
    checkpoint's name for a file written before metrics had one); None when it describes neither or is absent."""
    run = RunDir(run_dir)
    metrics = run.test_metrics() or {}
    wanted = metrics.get("weights_digest")
    for which in EXPORTS:
        path = run.export_weights(which)
        if not path.is_file():
            continue
        if (digest(load_weights(path)) == wanted) if wanted else metrics.get("checkpoint") == which:
            return which
    return None


def weights_step(path: str | Path) -> Optional[int]:
    """The training step of a weights file: its export's meta.json, or its checkpoint's train state."""
    folder = Path(path).parent
    for name in ("meta.json", STATE_FILE):
        try:
            return json.loads((folder / name).read_text()).get("step")
        except (OSError, ValueError):
            continue
    return None
