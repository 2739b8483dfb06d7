"""2-process gloo DDP against a 1-process run with the same global batch (the gradient all-reduce must make
them the same model), using the real model builder, objectives and Accelerate wrapping."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file

from conftest import tiny_overrides
from vkd_dist.build import build_model
from vkd_dist.configure import load_config
from vkd_dist.data.pipeline import Batch
from vkd_dist.fileio import free_port
from vkd_dist.objectives import build_objective

pytestmark = pytest.mark.distributed
GLOBAL_BATCH, STEPS, VOCAB = 8, 3, 300


def _cfg(data, run, objective):
    return load_config(overrides=tiny_overrides(data, run, objective=objective, **{
        "model.dropout": 0.0, "model.text_config.hidden_dropout_prob": 0.0,
        "model.text_config.attention_probs_dropout_prob": 0.0}))


def _global_batches():
    g = torch.Generator().manual_seed(123)
    for _ in range(STEPS):
        yield Batch(image=torch.randint(0, 256, (GLOBAL_BATCH, 1, 64, 64), dtype=torch.uint8, generator=g),
                    input_ids=torch.randint(5, VOCAB, (GLOBAL_BATCH, 24), generator=g),
                    attention_mask=torch.ones(GLOBAL_BATCH, 24, dtype=torch.long),
                    targets=(torch.rand(GLOBAL_BATCH, 14, generator=g) > 0.6).float(),
                    target_mask=torch.ones(GLOBAL_BATCH, 14, dtype=torch.bool))  # full mask: mean of means = mean


def _shard(batch: Batch, rank: int, world: int) -> Batch:
    n = len(batch) // world
    return batch._map(lambda t: t[rank * n:(rank + 1) * n])


def _train_steps(data, run, objective, out):
    cfg = _cfg(data, run, objective)
    AcceleratorState._reset_state(reset_partial_state=True)  # forked ranks must not inherit the parent's state
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(cfg, VOCAB)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model, opt = accelerator.prepare(model, opt)
    objective_fn = build_objective(cfg.objective, cfg.model.num_samples)
    for step, batch in enumerate(_global_batches()):
        batch = _shard(batch, accelerator.process_index, accelerator.num_processes)
        loss = objective_fn(model, batch, step)["loss"]
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
    state = {k: v.detach().clone().contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    save_file(state, f"{out}-rank{accelerator.process_index}.safetensors")
    accelerator.end_training()  # a rank that exits with gloo still connected can abort ("terminate called ...")


def launch_two_ranks(data, run, objective, out):
    """torchrun in fresh processes: forking this (OpenMP-using) pytest process can deadlock the children."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, str(data), str(run), objective, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("objective", ["image_only", "text_only", "vkd"])
def test_two_process_ddp_matches_one_process(tiny_data, tmp_path, objective):
    launch_two_ranks(tiny_data, tmp_path / "ddp", objective, tmp_path / "ddp")
    r0, r1 = load_file(tmp_path / "ddp-rank0.safetensors"), load_file(tmp_path / "ddp-rank1.safetensors")
    for k in r0:  # every rank holds identical parameters
        assert torch.equal(r0[k], r1[k]), k
    if objective == "vkd":
        return  # each rank draws its own latent samples, so only rank agreement is exact for vkd
    _train_steps(tiny_data, tmp_path / "single", objective, str(tmp_path / "single"))
    single = load_file(tmp_path / "single-rank0.safetensors")
    for k in single:
        assert torch.allclose(r0[k], single[k], atol=2e-5, rtol=1e-4), k
    torch.manual_seed(0)
    init = build_model(_cfg(tiny_data, tmp_path / "init", objective), VOCAB).state_dict()
    assert any(not torch.allclose(init[k], single[k]) for k in single)  # training moved the weights


if __name__ == "__main__":  # one rank under torchrun
    _train_steps(*sys.argv[1:4], sys.argv[4])
