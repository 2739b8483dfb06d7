"""The per-task GPU environment of SLURM jobs (vkd_dist.slurm_env), checked without GPUs: what the job exports and
`--dry-run` prints for every layout, the ordinal each engine derives from it, and the real Accelerate/DeepSpeed
device selection run under that environment with CUDA faked at the torch.cuda boundary."""

from __future__ import annotations

import os

import pytest
import torch

from vkd_dist.fileio import free_port
from vkd_dist.slurm import export_distributed_env, main
from vkd_dist.slurm_env import selected_ordinals, slurm_step_env, task_env, task_ordinal, visible_devices
from vkd_dist.strategy import accelerate_env

GPUS = (1, 2, 4, 8)
STRATEGIES = ("ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp2")
NODES = 2


def job_task_env(gpus: int, local: int, node: int = 0) -> dict[str, str]:
    """A task's environment as the job leaves it: SLURM's step variables + what the job exports."""
    rank = node * gpus + local
    return {**slurm_step_env(gpus), **task_env(rank, local, NODES * gpus, gpus, "10.0.0.1", 29500)}


def submitit_narrowed_env(gpus: int, local: int) -> dict[str, str]:
    """The layout before issue 13: submitit's export(set_cuda_visible_devices=True) on top of SLURM's variables."""
    return {**job_task_env(gpus, local), "CUDA_VISIBLE_DEVICES": str(local)}


def dry_run_tasks(capsys, tmp_path, gpus: int, strategy: str) -> list[dict[str, str]]:
    rc = main(["--nodes", str(NODES), "--gpus-per-node", str(gpus), "--strategy", strategy, "--dry-run",
               "--allow-small-model", f"run_dir={tmp_path / 'run'}"])
    assert rc == 0
    tasks = []
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("#   RANK="):
            fields, _, device = line[1:].partition(" -> ")
            tasks.append({**dict(tok.split("=", 1) for tok in fields.split()), "device": device.split()[0]})
    return tasks


# ----------------------------------------------------------------------------------------- environment
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dry_run_prints_agreeing_local_rank_and_visible_devices(capsys, tmp_path, strategy):
    for gpus in GPUS:
        tasks = dry_run_tasks(capsys, tmp_path, gpus, strategy)
        assert [int(t["LOCAL_RANK"]) for t in tasks] == list(range(gpus))  # one task per GPU of node 0
        for t in tasks:
            local = int(t["LOCAL_RANK"])
            assert t["RANK"] == t["LOCAL_RANK"] and t["WORLD_SIZE"] == str(NODES * gpus)
            assert t["LOCAL_WORLD_SIZE"] == str(gpus)
            # every task sees the node's GPUs and LOCAL_RANK indexes one of them
            assert visible_devices(t) == gpus and local < gpus
            assert t["device"] == f"cuda:{local}"
    assert not (tmp_path / "run").exists()


def test_dry_run_cpu_hides_gpus(capsys, tmp_path):
    assert main(["--tasks-per-node", "2", "--cpu", "--dry-run", f"run_dir={tmp_path / 'run'}"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("#   RANK=")]
    assert len(lines) == 2 and all("CUDA_VISIBLE_DEVICES= -> cpu" in line for line in lines)


@pytest.mark.parametrize("cpu", [False, True])
def test_job_export_keeps_slurm_visible_devices(monkeypatch, cpu):
    """The job's own export, under the variables slurmstepd gives task 3 of a 2-node x 2-GPU job."""
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "77", "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[1-2]", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
             "CUDA_VISIBLE_DEVICES": "0,1", "VKD_MASTER_ADDR": "10.0.0.1", "LOCAL_RANK": "5", "RANK": "9"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    env = export_distributed_env(master_port=29500, cpu=cpu)
    assert env["RANK"] == os.environ["RANK"] == "3" and os.environ["LOCAL_RANK"] == "1"
    assert os.environ["WORLD_SIZE"] == "4" and os.environ["LOCAL_WORLD_SIZE"] == "2"
    assert os.environ["MASTER_ADDR"] == "10.0.0.1" and os.environ["MASTER_PORT"] == "29500"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ("" if cpu else "0,1")


# ----------------------------------------------------------------------------------------- derived ordinals
@pytest.mark.parametrize("gpus", GPUS)
def test_engines_select_the_local_rank_for_every_task(gpus):
    for node in range(NODES):
        for local in range(gpus):
            env = job_task_env(gpus, local, node)
            assert selected_ordinals(env, visible_devices(env)) == {"accelerate": local, "deepspeed": local}
            assert task_ordinal(env, gpus) == local


@pytest.mark.parametrize("gpus", [g for g in GPUS if g > 1])
def test_submitit_narrowing_breaks_deepspeed(gpus):
    """The old layout: Accelerate wraps LOCAL_RANK onto the one visible device, DeepSpeed asks for LOCAL_RANK."""
    for local in range(1, gpus):
        env = submitit_narrowed_env(gpus, local)
        assert selected_ordinals(env, visible_devices(env)) == {"accelerate": 0, "deepspeed": local}
        with pytest.raises(RuntimeError, match="GPU layout mismatch"):
            task_ordinal(env, visible_devices(env))


# ----------------------------------------------------------------------------------------- the real engines
@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA faked at the torch.cuda/torch.distributed boundary: `devices[0]` visible devices, set_device and the
    process group's device_id recorded; the process group itself is a real 1-process gloo group."""
    import deepspeed.comm.comm as ds_comm
    import deepspeed.runtime.engine  # noqa: F401  imported under the real accelerator: nothing cached as CUDA
    from accelerate.state import AcceleratorState
    from deepspeed.accelerator import real_accelerator

    devices = [0]
    picked: dict[str, list[int]] = {"set_device": [], "device_id": []}
    real_init = torch.distributed.init_process_group

    def index(device) -> int:
        return device if isinstance(device, int) else torch.device(device).index

    def init_process_group(backend=None, device_id=None, **kwargs):  # DeepSpeed looks for device_id by name
        if device_id is not None:
            picked["device_id"].append(index(device_id))
        real_init("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices[0])
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: picked["set_device"].append(index(device)))
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    monkeypatch.setattr(real_accelerator, "ds_accelerator", None)  # detected afresh: the CUDA accelerator
    monkeypatch.setattr(ds_comm, "cdb", None)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield devices, picked
    AcceleratorState._reset_state(reset_partial_state=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_engines(monkeypatch, fake_cuda, env: dict[str, str], strategy: str) -> dict[str, list[int]]:
    """Accelerate's PartialState (and, for DeepSpeed, the engine's device choice) under `env`; the ordinals
    they passed to torch.cuda.set_device and as the process group's device_id."""
    from accelerate.state import AcceleratorState, PartialState

    devices, picked = fake_cuda
    devices[0] = visible_devices(env) or 0
    for key, value in {**env, **accelerate_env(strategy)}.items():
        monkeypatch.setenv(key, value)
    picked["set_device"].clear()
    picked["device_id"].clear()
    try:
        state = PartialState()
        recorded = {"accelerate": [state.device.index], **{k: list(v) for k, v in picked.items()}}
        if strategy.startswith("deepspeed_"):
            from deepspeed.runtime.engine import DeepSpeedEngine

            engine = type("Engine", (), {})()  # the engine's own methods, without a model
            DeepSpeedEngine._configure_with_arguments(engine, None, None)
            DeepSpeedEngine._set_distributed_vars(engine, None)
            recorded["deepspeed_engine"] = [engine.device.index]
        return recorded
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        import deepspeed.comm.comm as ds_comm

        ds_comm.cdb = None  # the next case initialises DeepSpeed's comm layer afresh


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_real_engines_select_the_task_gpu(monkeypatch, fake_cuda, strategy):
    for gpus in GPUS:
        for local in range(gpus):
            env = job_task_env(gpus, local)
            got = run_engines(monkeypatch, fake_cuda, env, strategy)
            assert set(got["set_device"]) == {local}, (gpus, local, got)
            assert got["accelerate"] == [local]
            if strategy.startswith("deepspeed_"):
                assert got["deepspeed_engine"] == [local]
                # DeepSpeed's comm init binds the process group to a device in multi-process worlds
                assert got["device_id"] == [local]
            assert all(o == task_ordinal(env, gpus) for ords in got.values() for o in ords)


def test_real_deepspeed_fails_under_submitit_narrowing(monkeypatch, fake_cuda):
    """The old layout, task local rank 1 of 2: DeepSpeed asks for cuda:1 with one device visible."""
    got = run_engines(monkeypatch, fake_cuda, submitit_narrowed_env(2, 1), "deepspeed_zero2")
    assert got["accelerate"] == [0] and got["device_id"] == [1] and got["deepspeed_engine"] == [1]
