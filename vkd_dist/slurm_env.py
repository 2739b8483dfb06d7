"""The per-task environment of a SLURM job (the first node's address included) and which GPU each engine then
selects; which attempt of the job a task runs, and what it resumes from.

Design: every task of a node sees all of the node's GPUs (CUDA_VISIBLE_DEVICES stays as SLURM set it for the
job step) and LOCAL_RANK, the true local rank, selects one -- the layout `torchrun` gives. submitit's
`export(set_cuda_visible_devices=True)` instead narrows CUDA_VISIBLE_DEVICES to the local rank while leaving
LOCAL_RANK unchanged; that is not used because:
- DeepSpeed takes LOCAL_RANK as a CUDA ordinal without a modulo (see `selected_ordinals`), so on a narrowed
  task with local rank >= 1 it asks for a device that does not exist; only Accelerate wraps it around.
- Setting LOCAL_RANK=0 to compensate would make every task a "local main process" for Accelerate
  (local_process_index is LOCAL_RANK) and for whatever guards node-local work with it.
- submitit's value is the local rank itself, not the GPU SLURM allocated: on a node shared without device
  cgroups (SLURM exports e.g. CUDA_VISIBLE_DEVICES=4,5) it would select another job's GPU.
- With all the node's GPUs visible in every process, NCCL sees the same devices as under torchrun, P2P/NVLink
  between them included.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Mapping
from typing import Optional

DIST_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def task_env(rank: int, local_rank: int, world_size: int, local_world_size: int, master_addr: str,
             master_port: int, cpu: bool = False) -> dict[str, str]:
    """What a task exports for torch.distributed's env:// rendezvous, Accelerate and DeepSpeed.

    CUDA_VISIBLE_DEVICES is left as SLURM set it (all the node's GPUs of the job), except with --cpu, where it
    is emptied so that no engine picks up a GPU the node may have."""
    env = {"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world_size),
           "LOCAL_WORLD_SIZE": str(local_world_size), "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def slurm_step_env(gpus_per_node: int) -> dict[str, str]:
    """What SLURM exports to every task of a step with --gpus-per-node=N and no per-task GPU binding: the
    node's N GPUs (inside a device cgroup they are numbered 0..N-1; without one they are the allocated ids,
    which LOCAL_RANK indexes just the same)."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(gpus_per_node))} if gpus_per_node else {}


def visible_devices(env: Mapping[str, str]) -> Optional[int]:
    """How many CUDA devices CUDA_VISIBLE_DEVICES leaves visible; None when it is unset (all of them)."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return len([d for d in value.split(",") if d.strip()])


def selected_ordinals(env: Mapping[str, str], device_count: int) -> dict[str, int]:
    """The CUDA ordinal each engine selects in a process with this environment and `device_count` visible
    devices, mirroring (accelerate 1.15, deepspeed 0.19, torch 2.x):
    - Accelerate, every strategy (MULTI_GPU; DeepSpeed and FSDP go through the same call before their type is
      switched): accelerate/state.py PartialState.__init__ sets
      `local_process_index = int(os.environ.get("LOCAL_RANK", -1))`, then PartialState.set_device does
      `device_index = self.local_process_index % device_module.device_count()` and `set_device(...)`.
    - DeepSpeed, no modulo, in three places that must all be valid: deepspeed/comm/torch.py
      TorchBackend.init_process_group passes `device_id=get_accelerator().device(int(os.environ.get('LOCAL_RANK', 0)))`;
      runtime/engine.py `_configure_with_arguments` sets `self.local_rank = int(os.environ['LOCAL_RANK'])` and
      `_set_distributed_vars` calls `get_accelerator().set_device(self.local_rank)`; ZeRO-3's
      runtime/zero/partition_parameters.py Init uses `device_name(os.environ["LOCAL_RANK"])` as local_device.
    (torch's DeviceMesh, used by FSDP2, also sets LOCAL_RANK as the device, but only when none was set yet:
    Accelerate has set it by then.)"""
    if device_count < 1:
        raise ValueError("no CUDA device visible")
    local_rank = int(env.get("LOCAL_RANK", -1))
    return {"accelerate": local_rank % device_count, "deepspeed": int(env.get("LOCAL_RANK", 0))}


def task_ordinal(env: Mapping[str, str], device_count: int) -> int:
    """The one CUDA ordinal every engine selects for this task; RuntimeError when they would disagree or one of
    them would ask for a device that is not visible (a cluster that binds each task to fewer GPUs)."""
    picks = selected_ordinals(env, device_count)
    if len(set(picks.values())) != 1 or not all(0 <= p < device_count for p in picks.values()):
        raise RuntimeError(
            f"GPU layout mismatch: LOCAL_RANK={env.get('LOCAL_RANK')} but {device_count} CUDA device(s) visible "
            f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '<unset>')}), so the engines would select "
            f"{picks}. Every task must see all the node's GPUs: do not bind GPUs per task (--gpu-bind, "
            "--gpus-per-task) and give one task per GPU.")
    return picks["accelerate"]


def node_addr(name: str) -> str:
    """An address for a SLURM node name: DNS first, then the NodeAddr slurm.conf gives it."""
    try:
        return socket.gethostbyname(name)
    except OSError:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", name], capture_output=True, text=True,
                             timeout=30).stdout
        for tok in out.split():
            if tok.startswith("NodeAddr="):
                return tok.split("=", 1)[1]
    except (OSError, subprocess.SubprocessError):
        pass
    raise RuntimeError(f"cannot resolve the first node {name!r} of the job (no DNS entry, no NodeAddr); "
                       "set VKD_MASTER_ADDR")


def restart_count(env: Mapping[str, str]) -> int:
    """Which attempt of the job this task belongs to: SLURM_RESTART_COUNT, 0 on the first, one more on each
    requeue (by `scontrol requeue`, submitit's or SLURM's own); 0 outside SLURM."""
    try:
        return int(env.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def attempt_resume(requested: Optional[str], restarts: int, made: bool) -> str:
    """The `resume` an attempt of a SLURM job trains with. The first attempt honours an explicit resume=PATH; a
    requeued one continues the run from its own newest checkpoint ('latest') once that resume was made (`made`:
    the run's RUN/resumed.json names PATH and this job, written when the checkpoint was loaded and its line set
    aside), and from PATH again until then: preempted before that, 'latest' would be the line PATH rolls back
    from. Without an explicit one: 'latest' (a fresh start when there is none)."""
    if not requested or requested == "latest" or (restarts > 0 and made):
        return "latest"
    return requested


def describe_tasks(nodes: int, tasks_per_node: int, gpus_per_node: int, cpu: bool) -> str:
    """The per-task environment of a launch, as `--dry-run` prints it: node 0's tasks (other nodes differ
    only in RANK) with the GPU each engine selects."""
    world = nodes * tasks_per_node
    lines = [f"# per-task environment of node 0 (node k: RANK = k*{tasks_per_node} + LOCAL_RANK), MASTER_ADDR=<first "
             "node>, MASTER_PORT=<from the job id>, CUDA_VISIBLE_DEVICES as SLURM exports it, e.g.:"]
    for local in range(tasks_per_node):
        env = {**slurm_step_env(0 if cpu else gpus_per_node),
               **task_env(local, local, world, tasks_per_node, "<first node>", 0, cpu)}
        shown = " ".join(f"{k}={env[k]}" for k in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE"))
        count = visible_devices(env)
        if cpu:
            device = "cpu (gloo)"
        elif count:
            device = f"cuda:{task_ordinal(env, count)} (Accelerate and DeepSpeed)"
        else:
            device = "no GPU requested"
        lines.append(f"#   {shown} CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')} -> {device}")
    return "\n".join(lines)
