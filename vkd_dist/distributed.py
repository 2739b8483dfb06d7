"""Building the Accelerator for the run's strategy (vkd_dist.strategy: DDP, DeepSpeed ZeRO-1/2/3 or FSDP2), with
the CPU fallbacks this needs; and what train.compile needs from the machine and the batches.

On a machine without GPUs the same launch files must still run (that is how they are tested):
- DDP: `Accelerator(cpu=True)` gives a gloo process group over the launcher's ranks.
- DeepSpeed: `cpu=True` would silently drop DeepSpeed, so DeepSpeed is kept and told to use gloo.
- FSDP2: Accelerate only selects FSDP for accelerator devices and would silently run DDP on the CPU, so the
  Accelerator is built for the CPU (gloo) and then switched to FSDP (`_fsdp_on_cpu`).
A bare single process gets the env:// variables DeepSpeed and FSDP insist on.
DeepSpeed's batch, accumulation and clipping settings are written from the trainer config here, in one
place, so they can never disagree with the loop.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

from vkd_dist.config import ConfigError
from vkd_dist.fileio import free_port
from vkd_dist.strategy import (
    Strategy,
    agree,
    configured,
    deepspeed_file,
    deepspeed_strategy,
    fsdp2_env,
    full_parameters,
    resolve,
)

if TYPE_CHECKING:
    from vkd_dist.config import Config


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


def deepspeed_config(cfg: Config, world_size: int, base: Optional[dict | str | Path] = None) -> dict:
    """The DeepSpeed JSON for this run.

    `base` (default: the launch's `deepspeed_config_file`, else the shipped configs/deepspeed/zeroN.json of the
    run's strategy) holds the ZeRO layout; its stage must be the one dist.strategy names, if it names one.
    Batch, accumulation, clipping and precision always come from the trainer config: "auto" (or absent) values
    are filled in, and a hard-coded value that disagrees is an error, never silently used."""
    if base is None:
        base = deepspeed_file(resolve(cfg), cfg.dist.offload_optimizer)
    source = "the DeepSpeed config"
    if isinstance(base, (str, Path)):
        source = f"the DeepSpeed JSON {base}"
        try:
            base = json.loads(Path(base).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"DeepSpeed config {source}: {exc}") from exc
    ds = json.loads(json.dumps(base))  # a deep copy
    stage = _get(ds, "zero_optimization.stage") or 0
    agree(configured(cfg), deepspeed_strategy(stage, f"{source} (zero_optimization.stage={stage})"))
    has_offload = _get(ds, "zero_optimization.offload_optimizer.device") not in (None, "none")
    if cfg.dist.offload_optimizer and not has_offload:
        raise ConfigError(f"dist.offload_optimizer=true but {source} does not offload the optimizer: "
                          "launch with configs/accelerate/deepspeed_zero3_offload.yaml")
    precision = resolve_precision(cfg.train.mixed_precision)
    owned = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.optim.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16.enabled": precision == "bf16",
        "fp16.enabled": precision == "fp16",
    }
    for key, value in owned.items():
        current = _get(ds, key)
        if current in (None, "auto"):
            _set(ds, key, value)
        elif current != value:
            raise ConfigError(
                f"{source}: {key}={current!r} disagrees with the trainer config ({value!r}, "
                f"from data.batch_size={cfg.data.batch_size}, optim.grad_accum={cfg.optim.grad_accum}, "
                f"optim.grad_clip={cfg.optim.grad_clip}, train.mixed_precision={cfg.train.mixed_precision}, "
                f"{world_size} processes); set it to \"auto\" so the trainer fills it")
    if not torch.cuda.is_available():  # CPU fallback: no overlap streams, no pinned memory, torch's Adam
        zero = ds.setdefault("zero_optimization", {})
        zero["overlap_comm"] = False
        for sub in ("offload_optimizer", "offload_param"):
            if isinstance(zero.get(sub), dict):
                zero[sub]["pin_memory"] = False
        if has_offload:
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


def param_digests(accelerator: Accelerator, model) -> list[str]:
    """Collective: a SHA-256 of every parameter and buffer as this rank holds it, gathered from all ranks (rank
    order).

    Where the strategy shards parameters (ZeRO-3, FSDP2) each one is gathered first, one at a time: the digest
    is then of the full model as that rank would assemble it. Equal digests = identical models, BatchNorm running
    statistics included."""
    import hashlib

    from accelerate.utils import gather_object

    h = hashlib.sha256()
    for name, data in full_parameters(accelerator, model):
        h.update(name.encode())
        h.update(data.numpy().tobytes())
    for name, buf in accelerator.unwrap_model(model).named_buffers():
        h.update(name.encode())
        h.update(buf.detach().cpu().contiguous().numpy().tobytes())
    return list(gather_object([h.hexdigest()]))


def sync_buffers(accelerator: Accelerator, model) -> None:
    """Collective: make every rank's buffers the same, before an evaluation, a checkpoint or an export.

    Parameters are equal on every rank by construction, buffers are not: each rank updates its BatchNorm running
    statistics from its own batches (DDP re-broadcasts rank 0's only at the next forward; ZeRO and FSDP2 never).
    Floating-point buffers become their mean over ranks (a running mean is linear in the batches it saw, so the
    mean of the ranks' running means is the running mean over all their batches; for the variance it is the
    usual approximation), others (batch counters) rank 0's. One flattened collective per dtype, at these
    boundaries only; SyncBatchNorm would instead add one per BatchNorm layer per forward and change training."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buf in accelerator.unwrap_model(model).buffers():
        by_dtype.setdefault(buf.dtype, []).append(buf)
    for dtype, bufs in by_dtype.items():
        flat = _flatten_dense_tensors([b.detach() for b in bufs])
        if dtype.is_floating_point:
            dist.all_reduce(flat)
            flat /= accelerator.num_processes
        else:
            dist.broadcast(flat, src=0)
        with torch.no_grad():
            for buf, synced in zip(bufs, _unflatten_dense_tensors(flat, bufs)):
                buf.copy_(synced)


def _default_rendezvous() -> None:
    """DeepSpeed and FSDP need a process group even in one bare process: give it the env:// variables."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))


class StrategyAccelerator(Accelerator):
    """An Accelerator that knows the strategy it was built for (`strategy`), and whose `prepare` also makes an
    FSDP2 model usable the way this project uses models."""

    def __init__(self, strategy: Strategy, **kwargs):
        super().__init__(**kwargs)
        self.strategy = strategy
        self.threads = ""  # the CPU thread setting, as the run header states it (CPU runs only)

    def prepare(self, *args, device_placement=None):
        if self.is_fsdp2:
            for obj in args:
                if isinstance(obj, torch.nn.Module):
                    _keep_present_wrap_classes(self.state.fsdp_plugin, obj)
        out = super().prepare(*args, device_placement=device_placement)
        if self.is_fsdp2:
            from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

            for obj in out if len(args) > 1 else (out,):  # a list under FSDP2, a tuple otherwise
                if isinstance(obj, FSDPModule):
                    # Evaluation calls predict()/predict_text(), not forward(): without this the root's
                    # parameters would still be shards there.
                    for method in ("predict", "predict_text"):
                        if callable(getattr(obj, method, None)):
                            register_fsdp_forward_method(obj, method)
        return out


def _keep_present_wrap_classes(plugin, model: torch.nn.Module) -> None:
    """fsdp2.yaml lists the block classes of every encoder this project builds (timm Block, BERT layer, ...);
    Accelerate refuses a listed class the model lacks, so keep those this model has. None left: one FSDP unit."""
    names = plugin.transformer_cls_names_to_wrap
    if isinstance(names, (list, tuple)):
        present = {type(m).__name__ for m in model.modules()}
        plugin.transformer_cls_names_to_wrap = [n for n in names if n in present]


def _fsdp_on_cpu(accelerator: Accelerator, plugin) -> None:
    """Accelerate's state selects FSDP for accelerator devices only (on the CPU it would run DDP without a word);
    FSDP2 itself runs over gloo, so switch the CPU state to FSDP. Both shared states: Accelerate re-reads one
    from the other."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def build_accelerator(cfg: Config) -> StrategyAccelerator:
    """The run's Accelerator, with its CPU threads set (train.cpu_threads) and, for train.compile, the machine's
    toolchain checked before any heavy work."""
    accelerator = _accelerator(cfg)
    if accelerator.device.type == "cpu":
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE") or accelerator.num_processes)
        accelerator.threads = set_cpu_threads(cfg.train.cpu_threads, local_processes)
    if cfg.train.compile:
        check_compile_toolchain(accelerator.device)
    return accelerator


def _accelerator(cfg: Config) -> StrategyAccelerator:
    strategy = resolve(cfg)
    precision = resolve_precision(cfg.train.mixed_precision)
    cpu = not torch.cuda.is_available()
    if cpu:  # DeepSpeed's own fallback without GPUs, chosen here so it is not announced as a warning mid-run
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    backend = cfg.dist.backend if cfg.dist.backend != "auto" else ("gloo" if cpu else "nccl")
    if strategy.name != "ddp":
        _default_rendezvous()
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or strategy.name != "ddp"
    # A process-group kwarg in a plain single process makes Accelerate expect a process group: only when launched.
    timeout = timedelta(seconds=cfg.dist.timeout_s)
    kwargs = [InitProcessGroupKwargs(backend=backend, timeout=timeout)] if launched else []
    common = dict(mixed_precision=precision, gradient_accumulation_steps=cfg.optim.grad_accum, kwargs_handlers=kwargs,
                  dataloader_config=DataLoaderConfiguration(dispatch_batches=False, even_batches=False))
    if strategy.deepspeed:
        from accelerate.utils import DeepSpeedPlugin

        _skip_deepspeed_shm_comm()
        # The one DeepSpeed config: the strategy's ZeRO layout + the trainer's batch/accumulation/clipping.
        # Passing it explicitly means Accelerate never reads ACCELERATE_DEEPSPEED_CONFIG_FILE on its own.
        ds = deepspeed_config(cfg, int(os.environ["WORLD_SIZE"]), deepspeed_file(strategy, cfg.dist.offload_optimizer))
        return StrategyAccelerator(strategy, deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds), **common)
    if strategy.fsdp2:
        plugin = fsdp2_plugin()
        accelerator = StrategyAccelerator(strategy, cpu=cpu, fsdp_plugin=plugin, **common)
        if cpu:
            _fsdp_on_cpu(accelerator, plugin)
        return accelerator
    return StrategyAccelerator(strategy, cpu=cpu, **common)


def set_cpu_threads(requested: Optional[int], local_processes: int) -> str:
    """torch's intra-op threads for a CPU run; returns the setting as the run header states it."""
    if requested is not None:
        torch.set_num_threads(requested)
        return f"{requested} CPU thread(s)/process (train.cpu_threads)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // max(1, local_processes))
    torch.set_num_threads(threads)
    return f"{threads} CPU thread(s)/process (train.cpu_threads: auto, {cores} cores / {local_processes} process(es))"


def fsdp2_plugin():
    """FSDP2 with the settings of configs/accelerate/fsdp2.yaml: as `accelerate launch` exported them, or
    exported here for any other launch (SLURM, torchrun, one process)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        os.environ.update(fsdp2_env())
    return FullyShardedDataParallelPlugin(fsdp_version=2)


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
