"""Two ranks under torchrun through the real trainer: each rank draws its own latent noise and dropout masks,
and a non-finite loss on one rank stops every rank with the same error at the same step (no hang)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from vkd_dist.fileio import free_port

pytestmark = pytest.mark.distributed


def _launch(mode: str, data: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, mode, str(data), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_each_rank_draws_its_own_latent_noise_from_the_same_weights(tiny_data, tmp_path):
    proc = _launch("noise", tiny_data, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"noise-rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in r0["params"]:  # the same model on both ranks...
        assert torch.equal(r0["params"][name], r1["params"][name]), name
    assert torch.equal(r0["batch"], r1["batch"])  # ...fed the same batch...
    assert not torch.allclose(r0["post"], r1["post"])  # ...samples different z ~ q (eps and dropout per rank)
    assert not torch.allclose(r0["prior"], r1["prior"])


def test_a_non_finite_loss_on_one_rank_stops_every_rank_alike(tiny_data, tmp_path):
    proc = _launch("nan", tiny_data, tmp_path)
    assert proc.returncode != 0  # both ranks raised (torchrun reports the failure), neither hung
    messages = [(tmp_path / f"nan-rank{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == messages[1], messages
    assert "non-finite loss on 1 of 2 rank(s) between steps 1 and 2" in messages[0]


def _noise(data: str, out: str) -> None:
    from vkd_dist.configure import load_config
    from vkd_dist.run import build_run, seed_per_rank

    one_step = {"train.max_steps": 1, "optim.warmup_steps": 0}
    cfg = load_config(overrides=tiny_overrides(Path(data), Path(out) / "noise-run", **one_step))
    run = build_run(cfg)
    rank = run.accelerator.process_index
    model = run.accelerator.unwrap_model(run.model).train()
    torch.manual_seed(1234)  # the batch is the same on both ranks; only the noise after it is per rank
    batch = _fixed_batch(cfg, len(run.info.labels), len(run.tokenizer))
    seed_per_rank(cfg, run.accelerator)  # as build_run left it: the trainer's first step draws from here
    with torch.no_grad():
        output = model(batch, mode="both", num_samples=2)
    torch.save({"params": {k: v.detach().clone() for k, v in model.state_dict().items()}, "batch": batch.image,
                "post": output.post_logits, "prior": output.prior_logits}, Path(out) / f"noise-rank{rank}.pt")
    run.log.close()
    run.accelerator.end_training()


def _fixed_batch(cfg, num_labels: int, vocab: int):
    from vkd_dist.data.pipeline import Batch

    size = cfg.data.image_size
    return Batch(image=torch.randint(0, 256, (4, 1, size, size), dtype=torch.uint8).float(),
                 input_ids=torch.randint(5, vocab, (4, 16)), attention_mask=torch.ones(4, 16, dtype=torch.long),
                 targets=torch.zeros(4, num_labels), target_mask=torch.ones(4, num_labels, dtype=torch.bool))


def _nan(data: str, out: str) -> None:
    from vkd_dist.configure import load_config
    from vkd_dist.objectives import Objective
    from vkd_dist.train import StopRequest, train

    rank = int(os.environ["RANK"])
    original = Objective.__call__

    def poisoned(self, model, batch, step):
        terms = original(self, model, batch, step)
        if rank == 1 and step == 1:  # the last step before the check: its NaN reaches no weights yet
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    Objective.__call__ = poisoned  # type: ignore[method-assign]
    cfg = load_config(overrides=tiny_overrides(Path(data), Path(out) / "nan-run", objective="image_only", **{
        "train.max_steps": 4, "logging.log_every": 2, "train.ckpt_every": 2, "train.eval_every": 2}))
    try:
        train(cfg, StopRequest(install=False))
    except FloatingPointError as exc:
        (Path(out) / f"nan-rank{rank}.txt").write_text(str(exc))
        raise SystemExit(3) from None


if __name__ == "__main__":  # one rank under torchrun: MODE DATA OUT
    {"noise": _noise, "nan": _nan}[sys.argv[1]](sys.argv[2], sys.argv[3])
