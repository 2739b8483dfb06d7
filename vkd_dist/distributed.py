"""Building the Accelerator: DDP or DeepSpeed as launched, with the CPU fallbacks this needs; and what
train.compile needs from the machine and the batches.

On a machine without GPUs the same launch files must still run (that is how they are tested):
- DDP launch configs: `Accelerator(cpu=True)` gives a gloo process group over the launcher's ranks.
- DeepSpeed launch configs: `cpu=True` would silently drop DeepSpeed, so DeepSpeed is kept and told to
  use gloo; a bare single process gets the env:// variables DeepSpeed insists on.
DeepSpeed's batch, accumulation and clipping settings are written from the trainer config here, in one
place, so they can never disagree with the loop.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

from vkd_dist.config import ConfigError


def using_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_precision(requested: str) -> str:
    if requested == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if requested in ("bf16", "fp16") and not torch.cuda.is_available():
        return "no"  # fp16 is refused on CPU and bf16 runs ~8x slower there: fall back to fp32
    return requested


# Keys of the DeepSpeed JSON that the trainer owns: configs/deepspeed/*.json leave them "auto".
TRAINER_OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                 "gradient_clipping", "bf16.enabled", "fp16.enabled")


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _set(tree: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def deepspeed_config(cfg, world_size: int, base: Optional[dict | str | Path] = None) -> dict:
    """The DeepSpeed JSON for this run.

    `base` (default: the file named by the accelerate config's `deepspeed_config_file`, which Accelerate
    exports as ACCELERATE_DEEPSPEED_CONFIG_FILE) holds the ZeRO layout. Batch, accumulation, clipping and
    precision always come from the trainer config: "auto" (or absent) values are filled in, and a hard-coded
    value that disagrees is an error, never silently used. Without a file the layout comes from
    dist.zero_stage / dist.offload_optimizer (or `accelerate launch --use_deepspeed --zero_stage N`)."""

    if base is None:
        base = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
    source = None
    if isinstance(base, (str, Path)):
        source = str(base)
        try:
            base = json.loads(Path(base).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"DeepSpeed config {source}: {exc}") from exc
    precision = resolve_precision(cfg.train.mixed_precision)
    owned = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.optim.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16.enabled": precision == "bf16",
        "fp16.enabled": precision == "fp16",
    }
    cuda = torch.cuda.is_available()
    if base is None:
        stage = cfg.dist.zero_stage if cfg.dist.zero_stage is not None else int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))
        ds = {
            "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True},
            "fp16": {"loss_scale": 0, "initial_scale_power": 16},
            "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False,
        }
        offload = cfg.dist.offload_optimizer or os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") == "cpu"
        if offload:
            ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    else:
        ds = json.loads(json.dumps(base))  # a deep copy
        zero = ds.get("zero_optimization", {})
        stage = zero.get("stage", 0)
        if cfg.dist.zero_stage is not None and cfg.dist.zero_stage != stage:
            raise ConfigError(f"dist.zero_stage={cfg.dist.zero_stage} but {source or 'the DeepSpeed config'} sets "
                              f"zero_optimization.stage={stage}: pick another launch config or drop dist.zero_stage")
        has_offload = _get(ds, "zero_optimization.offload_optimizer.device") not in (None, "none")
        if cfg.dist.offload_optimizer and not has_offload:
            raise ConfigError(f"dist.offload_optimizer=true but {source or 'the DeepSpeed config'} does not offload "
                              "the optimizer: launch with configs/accelerate/deepspeed_zero3_offload.yaml")
    for key, value in owned.items():
        current = _get(ds, key)
        if current in (None, "auto"):
            _set(ds, key, value)
        elif current != value:
            raise ConfigError(
                f"{source or 'DeepSpeed config'}: {key}={current!r} disagrees with the trainer config ({value!r}, "
                f"from data.batch_size={cfg.data.batch_size}, optim.grad_accum={cfg.optim.grad_accum}, "
                f"optim.grad_clip={cfg.optim.grad_clip}, train.mixed_precision={cfg.train.mixed_precision}, "
                f"{world_size} processes); set it to \"auto\" so the trainer fills it")
    if not cuda:  # the CPU fallback: no comm/compute overlap streams, no pinned memory, torch's own Adam
        zero = ds.setdefault("zero_optimization", {})
        zero["overlap_comm"] = False
        for sub in ("offload_optimizer", "offload_param"):
            if isinstance(zero.get(sub), dict):
                zero[sub]["pin_memory"] = False
        if _get(ds, "zero_optimization.offload_optimizer.device") not in (None, "none"):
            ds["zero_force_ds_cpu_optimizer"] = False  # DeepSpeedCPUAdam would be JIT-compiled with g++
    return ds


def _skip_deepspeed_shm_comm() -> None:
    """On a CPU-only machine DeepSpeed's comm layer JIT-compiles a shared-memory all-reduce op with g++ on first
    use (50-80 s). It only speeds up CPU all-reduces, which gloo does correctly, so mark it unavailable through
    DeepSpeed's own compatibility table; DeepSpeed then uses torch.distributed. VKD_DEEPSPEED_SHM_COMM=1 keeps it."""
    if torch.cuda.is_available() or os.environ.get("VKD_DEEPSPEED_SHM_COMM", "0") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def param_digests(accelerator, model) -> list[str]:
    """Collective: a SHA-256 of every parameter as this rank holds it, gathered from all ranks (rank order).

    Under ZeRO-3 each rank holds shards, so each parameter is gathered (one at a time) before hashing: the
    digest is then of the full model as that rank would assemble it. Equal digests = identical models."""
    import hashlib

    from accelerate.utils import gather_object

    h = hashlib.sha256()
    zero3 = accelerator.state.deepspeed_plugin is not None and accelerator.state.deepspeed_plugin.zero_stage == 3
    for name, p in accelerator.unwrap_model(model).named_parameters():
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                data = p.detach().float().cpu().contiguous()
        else:
            data = p.detach().float().cpu().contiguous()
        h.update(name.encode())
        h.update(data.numpy().tobytes())
    return list(gather_object([h.hexdigest()]))


def build_accelerator(cfg) -> Accelerator:
    precision = resolve_precision(cfg.train.mixed_precision)
    cpu = not torch.cuda.is_available()
    backend = cfg.dist.backend if cfg.dist.backend != "auto" else ("gloo" if cpu else "nccl")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or using_deepspeed()
    # A process-group kwarg in a plain single process makes Accelerate expect a process group: only when launched.
    kwargs = [InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=cfg.dist.timeout_s))] if launched else []
    common = dict(mixed_precision=precision, gradient_accumulation_steps=cfg.optim.grad_accum, kwargs_handlers=kwargs,
                  dataloader_config=DataLoaderConfiguration(dispatch_batches=False, even_batches=False))
    if using_deepspeed():
        from accelerate.utils import DeepSpeedPlugin

        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        world = int(os.environ["WORLD_SIZE"])
        _skip_deepspeed_shm_comm()
        # The one DeepSpeed config: the launch file's ZeRO layout + the trainer's batch/accumulation/clipping.
        # Passing it explicitly means Accelerate never reads ACCELERATE_DEEPSPEED_CONFIG_FILE on its own.
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, world))
        return Accelerator(deepspeed_plugin=plugin, **common)
    return Accelerator(cpu=cpu, **common)


def check_compile_toolchain(device: torch.device) -> None:
    """train.compile needs what torch.compile's inductor generates code for: a C++ compiler on the CPU, Triton on
    a GPU. Checked before any heavy work, not at the first step."""
    if device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception as exc:
            raise ConfigError("train.compile=true on the CPU: torch.compile builds C++ and found no compiler "
                              f"({type(exc).__name__}); install g++ (or set $CXX), "
                              "or set train.compile=false") from exc
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError("train.compile=true on the GPU: torch.compile needs Triton, which is not installed "
                              "(pip install triton), or set train.compile=false")


def mark_text_length_dynamic(batch) -> None:
    """Padded text lengths vary by batch: torch.compile then builds one graph for every length, where it would
    first build a static one and recompile at the second length."""
    torch._dynamo.maybe_mark_dynamic(batch.input_ids, 1)
    torch._dynamo.maybe_mark_dynamic(batch.attention_mask, 1)
