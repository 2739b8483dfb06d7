"""SLURM launching through submitit: one command for N nodes, checkpoint + requeue on preemption/time-out.

Shape of a job (`launchers/slurm.py` is a thin wrapper around `main()` here):
- `sbatch` (written by submitit's SlurmExecutor) asks for `--nodes N --ntasks-per-node T` (T = GPUs per node, or
  processes per node with --cpu) and `--signal=USR2@<delay>` so that the time limit is announced before the kill;
  `srun --kill-on-bad-exit=1` starts one task per GPU, each running `TrainJob` (pickled under RUN/submitit).
- `TrainJob` exports RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, tells Accelerate the strategy the way its
  launch config would (vkd_dist.strategy.accelerate_env: the shipped DeepSpeed JSON, or fsdp2.yaml's settings),
  sets `resume` (an explicit one until an attempt has loaded it, else `latest`: vkd_dist.slurm_env.attempt_resume)
  and calls `vkd_dist.train.train(cfg, stop)`. `--strategy` (default: the config's dist.strategy, else ddp) and
  dist.strategy must agree: checked before queueing and again in the job.
- Signals: `stop` (a `StopRequest`) owns SIGTERM/SIGUSR1/SIGUSR2 for the whole run, so submitit's own handler
  (which would checkpoint from inside a signal handler, mid-step) never fires during training. The training loop
  lets all ranks agree at a step boundary, writes one atomic checkpoint and returns `preempted=True`.
- Then rank 0 runs `scontrol requeue $SLURM_JOB_ID` when the signal was USR1/USR2 (preemption notice or time
  limit; a bare SIGTERM is a cancel, or a PreemptMode=REQUEUE preemption that SLURM requeues by itself) and
  SLURM_RESTART_COUNT < max_requeues; every rank exits without writing a submitit result, so whoever waits keeps
  waiting for the requeued run, which re-runs the same pickle with the same run directory and resumes.
- `--wait` follows the job to its end (vkd_dist.slurm_wait).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from vkd_dist import DefaultsHelpFormatter
from vkd_dist.fileio import atomic_write_text
from vkd_dist.run_dir import RunDir
from vkd_dist.slurm_env import (
    DIST_KEYS,
    attempt_resume,
    describe_tasks,
    node_addr,
    restart_count,
    task_env,
    task_ordinal,
)
from vkd_dist.slurm_wait import format_result, wait_job, wait_local
from vkd_dist.strategy import STRATEGIES, Strategy, accelerate_env, agree, clear_strategy_env, configured

if TYPE_CHECKING:
    from vkd_dist.config import Config

SLURM_CHECK_PERIOD_S = 30  # slurmctld's PERIODIC_TIMEOUT: it sends --signal up to this much early
# Below this many image-encoder parameters a config is a CPU demo (the embedded default's test_resnet has 0.37M,
# configs/tiny.yaml's ViT 0.06M; the smallest real backbones, e.g. mobilenetv3_small_100, have 1.5M).
SMALL_MODEL_PARAMS = 1_000_000


# ------------------------------------------------------------------------------------------------ parsing
TIME_FORMATS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
_TIME_RE = re.compile(r"(?:(\d+)-)?(\d+(?::\d+){0,2})")


def _parse_time(text: str) -> int:
    """SLURM time (as sbatch --time: TIME_FORMATS) -> whole minutes (rounded up). ValueError if not one of them."""
    text = str(text).strip()
    match = _TIME_RE.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a SLURM time limit; use {TIME_FORMATS}")
    days, parts = match.group(1), [int(p) for p in match.group(2).split(":")]
    if days is not None:
        h, m, sec = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        h, m, sec = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, sec = 0, parts[0], parts[1]
    else:
        h, m, sec = parts
    minutes = int(days or 0) * 1440 + h * 60 + m + (1 if sec else 0)
    if minutes < 1:
        raise ValueError(f"{text!r}: the time limit must be positive ({TIME_FORMATS})")
    return minutes


def _time_arg(text: str) -> str:
    """argparse `type` of --time: checks the format (a one-line usage error otherwise), keeps the text."""
    try:
        _parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return str(text).strip()


def _parse_kv(items: list[str], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not key:
            raise SystemExit(f"slurm launcher: {what} {item!r} is not KEY[=VALUE]")
        out[key] = value if sep else True
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(  # prog: vkd-slurm as the console script, slurm.py via launchers/
        formatter_class=DefaultsHelpFormatter,
        description="Launch VKD training on SLURM through submitit (one task per GPU; preemption-safe).",
        epilog="Positional key=value arguments are training config overrides (as for vkd-train).")
    p.add_argument("--nodes", type=int, default=1, help="nodes to allocate")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs (= tasks) per node; default 1 on GPU clusters, 0 with --cpu")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="processes per node (default: --gpus-per-node, or 1 with --cpu)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="default 8 on GPUs, 1 with --cpu")
    p.add_argument("--mem-gb", type=float, default=None, help="memory per node")
    p.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    p.add_argument("--time", type=_time_arg, default="24:00:00", help=f"time limit: {TIME_FORMATS}")
    p.add_argument("--strategy", choices=STRATEGIES, default=None, type=lambda s: s.replace("-", "_"),
                   help="parallelism strategy (deepspeed-zero3 spellings work too); must agree with the config's "
                        "dist.strategy (default: the config's dist.strategy, else ddp)")
    p.add_argument("--config", default=None, help="training YAML (default: configs/default.yaml)")
    p.add_argument("--job-name", default=None, help="default: vkd-<run dir name>")
    p.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                   help="local: the same job with submitit's LocalExecutor on this machine (one node)")
    p.add_argument("--cpu", action="store_true", help="CPU nodes: gloo process group, no GPUs requested")
    p.add_argument("--max-requeues", type=int, default=5,
                   help="how many times a preempted/timed-out job requeues itself (SLURM_RESTART_COUNT bound)")
    p.add_argument("--signal-delay-s", type=int, default=120,
                   help="USR2 at least this many seconds before the time limit, so the job checkpoints and requeues "
                        "(slurmctld checks limits every 30 s, so it may come up to 30 s earlier)")
    p.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="extra sbatch parameter passed through, e.g. --sbatch account=abc --sbatch qos=high "
                        "--sbatch exclusive (repeatable)")
    p.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run in the sbatch script before srun (e.g. 'module load cuda'); repeatable")
    p.add_argument("--master-port", type=int, default=None, help="default: derived from the job id")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and training command only")
    p.add_argument("--allow-small-model", action="store_true",
                   help=f"send a CPU-sized config (an image encoder under {SMALL_MODEL_PARAMS / 1e6:g}M parameters, "
                        "e.g. the embedded default or configs/tiny.yaml) to GPU nodes anyway; refused otherwise")
    p.add_argument("--wait", action="store_true", help="follow the job, print its final metrics; non-zero on failure")
    p.add_argument("--wait-timeout", type=float, default=None, help="seconds --wait follows the job (default: forever)")
    p.add_argument("overrides", nargs="*", help="training config overrides key=value")
    return p


@dataclass
class LaunchSpec:
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: Optional[float] = None
    partition: Optional[str] = None
    timeout_min: int = 1440
    strategy: str = "ddp"
    offload_optimizer: bool = False
    config: Optional[str] = None
    overrides: list = field(default_factory=list)
    job_name: str = "vkd"
    cluster: str = "slurm"
    cpu: bool = False
    max_requeues: int = 5
    signal_delay_s: int = 120
    sbatch: dict = field(default_factory=dict)
    setup: list = field(default_factory=list)
    master_port: Optional[int] = None
    run_dir: str = ""
    resume: Optional[str] = None  # an explicit resume=PATH, absolute: the first attempt's (attempt_resume)

    @property
    def folder(self) -> Path:
        return RunDir(self.run_dir).submitit_dir


def launch_strategy(requested: Optional[str], cfg: Config) -> Strategy:
    """--strategy and dist.strategy, which must agree; neither given: ddp."""
    cli = Strategy(requested, "--strategy of the SLURM launcher") if requested else None
    strategy = agree(cli, configured(cfg)) or Strategy("ddp")
    accelerate_env(strategy.name, cfg.dist.offload_optimizer)  # its files exist and fit (ConfigError otherwise)
    return strategy


def spec_from_args(args: argparse.Namespace) -> LaunchSpec:
    """Validate the training config and the strategy here (fail before queueing); pin paths to absolute ones."""
    from vkd_dist.configure import load_config

    if args.nodes < 1:
        raise SystemExit("slurm launcher: --nodes must be >= 1")
    overrides = list(args.overrides)
    cfg = load_config(args.config, overrides)
    strategy = launch_strategy(args.strategy, cfg)
    run_dir = str(Path(cfg.run_dir).expanduser().resolve())
    resume = str(Path(cfg.resume).resolve()) if cfg.resume and cfg.resume != "latest" else None
    pinned = [f"run_dir={run_dir}", *([f"resume={resume}"] if resume else [])]
    if not Path(cfg.data.path).is_absolute():
        pinned.append(f"data.path={Path(cfg.data.path).resolve()}")
    if args.cpu:
        pinned.append("dist.backend=gloo")
    overrides = pin(overrides, pinned)
    gpus = 0 if args.cpu else (args.gpus_per_node if args.gpus_per_node is not None else 1)
    tasks = args.tasks_per_node or (gpus if gpus > 0 else 1)
    if gpus and tasks != gpus:
        raise SystemExit(f"slurm launcher: one task per GPU: --tasks-per-node {tasks} != --gpus-per-node {gpus}")
    config = str(Path(args.config).resolve()) if args.config else None
    timeout_min = _parse_time(args.time)
    if args.cluster == "slurm" and args.signal_delay_s + SLURM_CHECK_PERIOD_S >= 60 * timeout_min:
        print(f"slurm launcher: warning: --signal-delay-s {args.signal_delay_s} with a {timeout_min}-minute limit: "
              f"SLURM may send the notice as soon as the job starts (it checks limits every "
              f"{SLURM_CHECK_PERIOD_S} s); a notice before training starts requeues without a checkpoint",
              file=sys.stderr)
    return LaunchSpec(
        nodes=args.nodes, tasks_per_node=tasks, gpus_per_node=gpus,
        cpus_per_task=args.cpus_per_task or (1 if args.cpu else 8), mem_gb=args.mem_gb, partition=args.partition,
        timeout_min=timeout_min, strategy=strategy.name,
        offload_optimizer=cfg.dist.offload_optimizer, config=config, overrides=overrides,
        job_name=args.job_name or f"vkd-{Path(run_dir).name}", cluster=args.cluster, cpu=args.cpu,
        max_requeues=args.max_requeues, signal_delay_s=args.signal_delay_s, sbatch=_parse_kv(args.sbatch, "--sbatch"),
        setup=list(args.setup), master_port=args.master_port, run_dir=run_dir, resume=resume)


def pin(overrides: list[str], pinned: list[str]) -> list[str]:
    """The overrides with each pinned key's value replaced by its pinned one: every key once, in the job and in
    the printed command."""
    keys = {item.partition("=")[0] for item in pinned}
    return [item for item in overrides if item.partition("=")[0].strip() not in keys] + pinned


def cpu_sized(cfg: Config) -> Optional[str]:
    """Why `cfg` is a CPU demo rather than a GPU job (None when it is not): its image encoder's size, counted on
    the meta device (no memory, no weights read)."""
    import torch

    from vkd_dist.models.encoders import ImageEncoder

    m = cfg.model
    with torch.device("meta"):
        encoder = ImageEncoder(m.image_encoder, cfg.data.image_size, m.in_chans, None, m.image_encoder_kwargs)
    params = sum(p.numel() for p in encoder.parameters())
    if params >= SMALL_MODEL_PARAMS:
        return None
    return (f"the image encoder {m.image_encoder}{' ' + str(m.image_encoder_kwargs) if m.image_encoder_kwargs else ''}"
            f" has {params / 1e6:.2f}M parameters (under {SMALL_MODEL_PARAMS / 1e6:g}M: a CPU-sized config"
            f"{', data.build_synthetic: the synthetic demo corpus' if cfg.data.build_synthetic else ''})")


def refuse_cpu_sized(spec: LaunchSpec, allow: bool) -> Optional[str]:
    """The message that refuses a CPU-sized config on GPU nodes of a SLURM cluster (None: nothing to refuse)."""
    from vkd_dist.configure import load_config

    if spec.cpu or spec.cluster != "slurm" or allow:
        return None
    why = cpu_sized(load_config(spec.config, spec.overrides))
    if why is None:
        return None
    return (f"slurm launcher: refusing to send a CPU-sized config to {spec.nodes} GPU node(s) x "
            f"{spec.gpus_per_node} GPU(s) for {spec.timeout_min} min: {why}. Give a GPU-sized --config (see "
            "configs/recipes/), --cpu for CPU nodes, or --allow-small-model to send it anyway")


# ------------------------------------------------------------------------------------------------ the job
def export_distributed_env(master_port: Optional[int] = None, cpu: bool = False) -> dict[str, str]:
    """RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT for torch.distributed, from submitit's view of
    the task; CUDA_VISIBLE_DEVICES stays as SLURM set it (vkd_dist.slurm_env says why)."""
    import submitit

    for key in DIST_KEYS:
        os.environ.pop(key, None)  # inherited from the submitting shell, never meaningful here
    job = submitit.JobEnvironment()
    if master_port is None:  # the same for every task; differs per attempt of a requeued job
        master_port = random.Random(f"{job.job_id}-{restart_count(os.environ)}").randint(20000, 60000)
    master_addr = os.environ.get("VKD_MASTER_ADDR") or node_addr(job.hostnames[0])
    env = task_env(job.global_rank, job.local_rank, job.num_tasks, job.num_tasks // job.num_nodes, master_addr,
                   master_port, cpu)
    os.environ.update(env)
    device = "cpu"
    if not cpu:
        import torch

        if torch.cuda.is_available():  # fail here, in one line, not deep inside DeepSpeed's init
            device = f"cuda:{task_ordinal(os.environ, torch.cuda.device_count())}"
    print(f"[vkd-slurm] task RANK={env['RANK']} LOCAL_RANK={env['LOCAL_RANK']} CUDA_VISIBLE_DEVICES="
          f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')} -> {device}", flush=True)
    return env


def _stop_request():
    from vkd_dist.stop import StopRequest

    return StopRequest(install=True)  # records the signals that arrived: USR1/USR2 -> requeue; TERM alone -> don't


def _resume_made(run_dir: Path, requested: Optional[str], job_id: str) -> bool:
    """Whether this job's explicit resume=PATH was loaded already, by an earlier attempt (RUN/resumed.json,
    vkd_dist/resume.py: record_resume). Read from the file, never by hashing a checkpoint: train() verifies, every
    rank hashing a share."""
    if not requested or requested == "latest":
        return False
    try:
        made = json.loads(RunDir(run_dir).resumed_file.read_text())
    except (OSError, ValueError):
        return False
    return made.get("asked") == str(Path(requested).resolve()) and made.get("slurm_job") == str(job_id)


def _continue_hint(requested: Optional[str]) -> str:
    if requested and requested != "latest":
        return (f"resubmit the same vkd-slurm command with resume=latest in place of resume={requested} (which would "
                "roll back to it again) to continue from the newest checkpoint")
    return "resubmit the same vkd-slurm command to continue from the newest checkpoint (it resumes with resume=latest)"


def _update_job_file(run_dir: Path, **entry: Any) -> None:
    path = RunDir(run_dir).slurm_job_file
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        data = {}
    data.setdefault("attempts", []).append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **entry})
    data.update({k: v for k, v in entry.items() if k in ("job_id", "restarts", "status")})
    atomic_write_text(path, json.dumps(data, indent=2))


class TrainJob:
    """The picklable callable each SLURM task runs (one per GPU)."""

    def __init__(self, config: Optional[str], overrides: list[str], strategy: str = "ddp", cpu: bool = False,
                 max_requeues: int = 5, master_port: Optional[int] = None, cpus_per_task: int = 1):
        self.config, self.overrides, self.strategy, self.cpu = config, list(overrides), strategy, cpu
        self.max_requeues, self.master_port, self.cpus_per_task = max_requeues, master_port, cpus_per_task

    def __call__(self) -> dict:
        stop = _stop_request()  # first thing: from here on a preemption signal can only set a flag
        import submitit

        job = submitit.JobEnvironment()
        on_slurm = job.cluster == "slurm"
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, self.cpus_per_task)))
        dist = export_distributed_env(self.master_port, self.cpu)
        restarts = restart_count(os.environ)

        from vkd_dist.configure import load_config
        from vkd_dist.train import train

        cfg = load_config(self.config, self.overrides)
        if cfg.train.cpu_threads is None:  # the allocation, not every core the node shows the task
            cfg.train.cpu_threads = max(1, self.cpus_per_task)
        strategy = launch_strategy(self.strategy, cfg)  # the config may have changed since submission
        clear_strategy_env()
        os.environ.update(accelerate_env(strategy.name, cfg.dist.offload_optimizer))
        run_dir = Path(cfg.run_dir)
        asked = cfg.resume
        cfg.resume = attempt_resume(asked, restarts, _resume_made(run_dir, asked, job.job_id))
        rank = int(dist["RANK"])
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            _update_job_file(run_dir, job_id=job.job_id, restarts=restarts, status="running",
                             world_size=int(dist["WORLD_SIZE"]), master=f"{dist['MASTER_ADDR']}:{dist['MASTER_PORT']}",
                             resume=cfg.resume)  # train() verifies it, every rank hashing a share
            print(f"[vkd-slurm] job {job.job_id} attempt {restarts + 1} | world {dist['WORLD_SIZE']} | master "
                  f"{dist['MASTER_ADDR']}:{dist['MASTER_PORT']} | strategy {self.strategy} | run {run_dir}", flush=True)

        result = train(cfg, stop=stop)  # train() restores the previous (submitit's) handlers when it returns
        for sig in (signal.SIGUSR1, signal.SIGUSR2):  # late notices must not requeue a finished job
            signal.signal(sig, signal.SIG_IGN)
        summary = {"step": result.step, "preempted": result.preempted, "val": result.val, "test": result.test,
                   "run_dir": result.run_dir, "checkpoints": result.checkpoints, "job_id": job.job_id,
                   "restarts": restarts}
        ended = {"job_id": job.job_id, "restarts": restarts, "step": result.step, "resumed_from": result.resumed_from}
        if not result.preempted:
            if rank == 0:
                _update_job_file(run_dir, status="completed", **ended)
            return summary

        # -- preempted: one consistent checkpoint exists; requeue (rank 0) and leave without a result ---------
        requeue_signal = any(s in (signal.SIGUSR1, signal.SIGUSR2) for s in stop.signals) or not stop.signals
        if rank != 0:
            sys.exit(0)  # SystemExit: submitit writes no result file for this task
        if not on_slurm:
            _update_job_file(run_dir, status="preempted", **ended)
            print(f"[vkd-slurm] preempted at step {result.step}; not on SLURM, so no requeue: rerun the same "
                  "command with resume=latest to resume", flush=True)
            return summary
        if not requeue_signal:
            _update_job_file(run_dir, status="terminated", **ended)
            raise RuntimeError(f"job {job.job_id} got SIGTERM (cancelled, or preempted with PreemptMode=REQUEUE, "
                               f"which requeues by itself); checkpointed at step {result.step}, not requeued")
        if restarts >= self.max_requeues:
            _update_job_file(run_dir, status="requeue-limit", **ended)
            raise RuntimeError(f"job {job.job_id} was preempted/timed out at step {result.step} and has already been "
                               f"requeued {restarts} time(s) (max_requeues={self.max_requeues}); checkpoint kept: "
                               f"{_continue_hint(asked)}")
        _update_job_file(run_dir, status="requeued", **ended)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the requeue terminates this job: finish the call first
        proc = subprocess.run(["scontrol", "requeue", str(job.job_id)], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"scontrol requeue {job.job_id} failed: {proc.stderr.strip()}")
        print(f"[vkd-slurm] checkpointed at step {result.step}; requeued job {job.job_id} "
              f"(restart {restarts + 1}/{self.max_requeues})", flush=True)
        sys.exit(0)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit calls this only for a signal that lands outside train() (while starting or finishing), where
        the StopRequest is not installed: nothing to save then; requeue within the same bound, or give up."""
        import submitit

        restarts = restart_count(os.environ)
        requeue = restarts < self.max_requeues
        if int(os.environ.get("SLURM_PROCID", "0")) == 0:
            self._record_outside_training(restarts, "requeued" if requeue else "requeue-limit")
        # None: submitit records an error result, so the job is reported failed
        return submitit.helpers.DelayedSubmission(self) if requeue else None

    def _record_outside_training(self, restarts: int, status: str) -> None:
        """Keep the attempt history complete; a record that cannot be written must not cost the requeue."""
        from vkd_dist.configure import ConfigError, load_config

        try:
            run_dir = Path(load_config(self.config, self.overrides).run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            _update_job_file(run_dir, job_id=os.environ.get("SLURM_JOB_ID", ""), restarts=restarts, status=status,
                             step=None, outside_training=True)
        except (OSError, ConfigError) as exc:
            print(f"[vkd-slurm] could not record the {status} attempt in {RunDir.SLURM_JOB}: {exc}", file=sys.stderr,
                  flush=True)

    def __repr__(self) -> str:
        return f"TrainJob(config={self.config!r}, overrides={self.overrides!r}, strategy={self.strategy!r})"


# ------------------------------------------------------------------------------------------------ submission
def slurm_parameters(spec: LaunchSpec) -> dict[str, Any]:
    """SlurmExecutor parameters (sbatch names) for this launch."""
    params: dict[str, Any] = {
        "job_name": spec.job_name, "nodes": spec.nodes, "ntasks_per_node": spec.tasks_per_node,
        "cpus_per_task": spec.cpus_per_task, "time": spec.timeout_min, "signal_delay_s": spec.signal_delay_s,
        "srun_args": ["--kill-on-bad-exit=1"], "additional_parameters": {"requeue": True, **spec.sbatch},
    }
    if spec.gpus_per_node:
        params["gpus_per_node"] = spec.gpus_per_node
    if spec.partition:
        params["partition"] = spec.partition
    if spec.mem_gb:
        params["mem"] = f"{int(spec.mem_gb * 1024)}MB"
    if spec.setup:
        params["setup"] = list(spec.setup)
    return params


def make_job(spec: LaunchSpec) -> TrainJob:
    return TrainJob(spec.config, spec.overrides, spec.strategy, spec.cpu, spec.max_requeues, spec.master_port,
                    spec.cpus_per_task)


def training_command(spec: LaunchSpec) -> str:
    """The equivalent plain command one task runs (for --dry-run and for reading logs)."""
    env = " ".join(f"{k}={v}" for k, v in accelerate_env(spec.strategy, spec.offload_optimizer).items())
    args = [sys.executable, "-m", "vkd_dist.train"] + (["--config", spec.config] if spec.config else [])
    resumes = any(item.partition("=")[0] == "resume" for item in spec.overrides)
    args += spec.overrides + ([] if resumes else ["resume=latest"])
    world = spec.nodes * spec.tasks_per_node
    command = " ".join(shlex.quote(a) for a in args)
    requeued = "; a requeued attempt with resume=latest once an attempt has loaded PATH" if spec.resume else ""
    return (f"# per task (x{world}: {spec.nodes} node(s) x {spec.tasks_per_node}), with RANK/LOCAL_RANK/WORLD_SIZE="
            f"{world}/MASTER_ADDR=<first node>/MASTER_PORT from submitit{requeued}:\n{env} {command}")


def sbatch_script(spec: LaunchSpec) -> str:
    """The batch script of this launch, rendered from the same `slurm_parameters` submitit is given (for
    --dry-run; submitit writes its own, equivalent one to RUN/submitit/<job id>_submission.sh)."""
    params = slurm_parameters(spec)
    extra, setup, srun_args = params.pop("additional_parameters"), params.pop("setup", []), params.pop("srun_args")
    lines = ["#!/bin/bash", f"#SBATCH --signal=USR2@{params.pop('signal_delay_s')}"]
    lines += [f"#SBATCH --{k.replace('_', '-')}={v}" for k, v in params.items()]
    lines += [f"#SBATCH --{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in extra.items()]
    lines += [f"#SBATCH --output={spec.folder}/%j_0_log.out", f"#SBATCH --error={spec.folder}/%j_0_log.err", *setup]
    command = [sys.executable, "-u", "-m", "submitit.core._submit", str(spec.folder)]
    lines.append(" ".join(["srun", "--unbuffered", f"--output={spec.folder}/%j_%t_log.out",
                           f"--error={spec.folder}/%j_%t_log.err", *srun_args, *map(shlex.quote, command)]))
    return "\n".join(lines) + "\n"


def make_executor(spec: LaunchSpec):
    import submitit

    spec.folder.mkdir(parents=True, exist_ok=True)
    ex = submitit.AutoExecutor(folder=spec.folder, cluster=spec.cluster, slurm_max_num_timeout=spec.max_requeues)
    if spec.cluster == "slurm":
        params = slurm_parameters(spec)
        generic = {"name": params.pop("job_name"), "nodes": params.pop("nodes"),
                   "tasks_per_node": params.pop("ntasks_per_node"), "cpus_per_task": params.pop("cpus_per_task"),
                   "timeout_min": params.pop("time")}
        if "gpus_per_node" in params:
            generic["gpus_per_node"] = params.pop("gpus_per_node")
        ex.update_parameters(**generic, **{f"slurm_{k}": v for k, v in params.items()})
    else:  # LocalExecutor: one node; all tasks of all "nodes" run here
        ex.update_parameters(name=spec.job_name, nodes=1, tasks_per_node=spec.nodes * spec.tasks_per_node,
                             timeout_min=spec.timeout_min, gpus_per_node=spec.gpus_per_node or 0)
    return ex


def describe(spec: LaunchSpec, job_id: str) -> str:
    run = Path(spec.run_dir)
    return "\n".join([
        f"submitted job {job_id} ({spec.job_name}) on {spec.cluster}: {spec.nodes} node(s) x {spec.tasks_per_node} "
        f"task(s), strategy {spec.strategy}{', CPU/gloo' if spec.cpu else ''}, max requeues {spec.max_requeues}",
        f"  run directory : {run}",
        f"  logs          : {spec.folder}/{job_id}_<task>_log.out|.err  (rank 0: {spec.folder}/{job_id}_0_log.out)",
        f"  checkpoints   : {run}/checkpoints/step-*",
        f"  tensorboard   : {run}/tensorboard   (tensorboard --logdir {run}/tensorboard)",
        f"  metrics       : {run}/test_metrics.json, exports in {run}/best and {run}/final",
        f"  job state     : {RunDir(run).slurm_job_file}" + (f"; squeue -j {job_id}; scontrol show job {job_id}"
                                                  if spec.cluster == "slurm" else ""),
    ])


# ------------------------------------------------------------------------------------------------ entry point
def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may come before or after options
    from vkd_dist.config import ConfigError

    try:
        spec = spec_from_args(args)
        refused = refuse_cpu_sized(spec, args.allow_small_model)
    except ConfigError as exc:
        print(f"slurm launcher: config error: {exc}", file=sys.stderr)
        return 2
    if refused:
        print(refused, file=sys.stderr)
        return 2
    if args.dry_run:
        print("# ---- sbatch script (submitit writes it to RUN/submitit/<job id>_submission.sh)")
        print(sbatch_script(spec) if spec.cluster == "slurm" else "# (local cluster: no sbatch script)")
        print("# ---- training command")
        print(training_command(spec))
        print(describe_tasks(spec.nodes, spec.tasks_per_node, spec.gpus_per_node, spec.cpu))
        return 0
    ex = make_executor(spec)
    job = ex.submit(make_job(spec))
    print(describe(spec, job.job_id), flush=True)
    if not args.wait:
        return 0
    if spec.cluster == "slurm":
        outcome = wait_job(job.job_id, spec.folder, timeout=args.wait_timeout)
    else:
        outcome = wait_local(job, args.wait_timeout)
    if outcome.ok:
        print(format_result(outcome.result or {}), flush=True)
        return 0
    print(f"[vkd-slurm] job {job.job_id} FAILED ({outcome.state}): {outcome.message}", file=sys.stderr, flush=True)
    return 1
