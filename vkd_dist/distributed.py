"""Building the Accelerator: DDP or DeepSpeed as launched, with the CPU fallbacks this needs.

On a machine without GPUs the same launch files must still run (that is how they are tested):
- DDP launch configs: `Accelerator(cpu=True)` gives a gloo process group over the launcher's ranks.
- DeepSpeed launch configs: `cpu=True` would silently drop DeepSpeed, so DeepSpeed is kept and told to
  use gloo; a bare single process gets the env:// variables DeepSpeed insists on.
DeepSpeed's batch, accumulation and clipping settings are written from the trainer config here, in one
place, so they can never disagree with the loop.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs


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


def deepspeed_config(cfg, world_size: int) -> dict:
    """The DeepSpeed JSON for this run, derived from the trainer config (see configs/deepspeed/)."""
    stage = cfg.dist.zero_stage if cfg.dist.zero_stage is not None else int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))
    precision = resolve_precision(cfg.train.mixed_precision)
    ds = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.optim.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": stage, "overlap_comm": torch.cuda.is_available(),
                              "contiguous_gradients": True},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    offload = cfg.dist.offload_optimizer or os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") == "cpu"
    if offload:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if stage == 3:
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return ds


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
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, world))
        return Accelerator(deepspeed_plugin=plugin, **common)
    return Accelerator(cpu=cpu, **common)
