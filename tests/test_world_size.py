"""A run saved on N processes resumes on M (issue 20): 2 -> 1 and 1 -> 2 on the CPU under DDP and FSDP2, launched
as users launch (`accelerate launch --config_file configs/accelerate/X.yaml --num_processes N`), with the sample
ledger on. Checked from outside the trainer: the ledger's epoch 0 is exactly the epoch the first layout deals
(every sample once, none twice, none left out), the global batch is kept (grad_accum adjusts, said in one line),
and the model and optimizer loaded (the resumed run trains on). The 2-process runs use a BatchNorm image encoder
and check that every rank ends with the same buffers and that the reported test metrics equal a single-process
`vkd-eval` of the run's final/ to 1e-6. ZeRO's per-rank optimizer shards cannot be loaded on another number of
processes: that resume is refused in one line before anything is loaded.

The stream-level check of the same property over more layouts (workers, three hops) is
tests/test_pipeline.py::test_the_rest_of_an_epoch_is_read_exactly_once_on_another_layout."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO, tiny_overrides
from vkd_dist.data.rest import Layout, unread
from vkd_dist.data.schema import read_dataset
from vkd_dist.fileio import free_port
from vkd_dist.ledger import ledger_files, read_ledger

ACCEL = REPO / "configs" / "accelerate"


def launch(config: str, nproc: int, overrides: list[str], check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(ACCEL / config),
           "--num_processes", str(nproc), "--main_process_port", str(free_port()), "-m", "vkd_dist.train", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)}\nexit {proc.returncode}\n--- stdout (tail)\n{proc.stdout[-3000:]}\n"
                    f"--- stderr (tail)\n{proc.stderr[-6000:]}", pytrace=False)
    return proc


def _overrides(data: Path, run: Path, **extra) -> list[str]:
    return tiny_overrides(data, run, **{"logging.sample_ledger": "true", "train.ckpt_every": 100,
                                        "logging.log_every": 1, "model.image_encoder": "test_resnet",
                                        "model.image_encoder_kwargs": "{}", **extra})


def _epoch_zero(data: Path, layout: dict) -> Counter:
    """The samples the first layout's epoch 0 deals, replayed from the shards (what an uninterrupted run reads)."""
    first = Layout.from_dict({**layout, "epoch": 0, "rest_of": None})
    zeros = [[0] * first.workers for _ in range(first.world)]
    return Counter(key for _, key in unread(first, zeros, read_dataset(data).shards("train")))


@pytest.mark.distributed
@pytest.mark.parametrize("config", ["ddp.yaml", "fsdp2.yaml"])
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_resume_on_another_number_of_processes_reads_the_epoch_exactly_once(tiny_data, tmp_path, config, before,
                                                                            after):
    run = tmp_path / "run"
    accum = 2 if before == 1 else 1  # the same global batch (16 samples a step) on 1 and on 2 processes
    launch(config, before, _overrides(tiny_data, run, **{"train.max_steps": 3, "train.test_at_end": "false",
                                                         "optim.grad_accum": accum}))
    saved = json.loads((run / "checkpoints" / "step-00000003" / "train_state.json").read_text())
    assert saved["world_size"] == before and saved["grad_accum"] == accum
    expected = _epoch_zero(tiny_data, saved["data_layout"])

    resumed = launch(config, after, _overrides(tiny_data, run, **{
        "train.max_steps": 8, "resume": "latest", "optim.grad_accum": accum, "train.test_at_end": str(after > 1)}))
    out = resumed.stdout + resumed.stderr
    assert (f"resumed on {after} process(es), saved on {before}: optim.grad_accum {accum} -> {accum * before // after} "
            "keeps the global batch at 16 samples per step") in out
    assert "the unread rest of epoch 0" in out

    rows = [row for path in ledger_files(run) for row in read_ledger(path)]
    epoch0 = Counter(key for epoch, _, key in rows if epoch == 0)
    assert epoch0 == expected  # every sample of the epoch once: none twice, none left out
    assert {step for _, step, _ in rows} == set(range(1, 9))  # the resume dropped no step and repeated none
    assert max(step for epoch, step, _ in rows if epoch == 0) == 7  # 7 steps of 16: the epoch ends where it would
    meta = json.loads((run / "final" / "meta.json").read_text())
    assert meta["step"] == 8 and len(meta["param_digests"]) == after and len(set(meta["param_digests"])) == 1
    if after > 1:  # what the 2-process run reports is what its final/ scores on one process
        reported = json.loads((run / "test_metrics.json").read_text())
        evaluated = tmp_path / "eval.json"
        subprocess.run([sys.executable, "-m", "vkd_dist.evaluate", "--run", str(run), "--checkpoint", "final",
                        "--out", str(evaluated)], cwd=REPO, check=True, capture_output=True, env={
                            **os.environ, "HF_HUB_OFFLINE": "1"})
        single = json.loads(evaluated.read_text())
        assert single["macro_auroc"] == pytest.approx(reported["macro_auroc"], abs=1e-6)
        for name, scores in reported["per_label"].items():
            assert single["per_label"][name]["auroc"] == pytest.approx(scores["auroc"], abs=1e-6), name


@pytest.mark.distributed
def test_zero2_resume_on_another_number_of_processes_is_refused_in_one_line(tiny_data, tmp_path):
    run = tmp_path / "run"
    launch("deepspeed_zero2.yaml", 2, _overrides(tiny_data, run, **{"train.max_steps": 2,
                                                                   "train.test_at_end": "false"}))
    refused = launch("deepspeed_zero2.yaml", 1, _overrides(tiny_data, run, **{
        "train.max_steps": 4, "resume": "latest", "train.test_at_end": "false"}), check=False)
    assert refused.returncode != 0
    line = next(ln for ln in refused.stderr.splitlines() if "config error" in ln)
    assert "written by 2 process(es) under deepspeed_zero2" in line and "resume on 2 process(es)" in line
    assert json.loads((run / "checkpoints" / "step-00000002" / "train_state.json").read_text())["step"] == 2


@pytest.mark.slow  # three trainer launches, ~60-120 s on 2 loaded cores
@pytest.mark.distributed
def test_one_to_two_processes_at_batch_size_1_reads_every_key_once_with_an_odd_rest_and_with_one_left(tiny_data,
                                                                                                       tmp_path):
    """1 process x grad_accum 2 at batch size 1 over epochs of 21 samples, saved at step 7 (7 samples unread) and
    step 10 (1 unread), each resumed on 2 processes: the odd rest is dealt in 3 equal steps (one batch of 2), the
    single sample is read with epoch 1; the ledger holds every key of those epochs once, every step once."""
    import shutil

    first = tmp_path / "first"
    launch("ddp.yaml", 1, _overrides(tiny_data, first, **{
        "data.batch_size": 1, "data.samples_per_epoch": 21, "optim.grad_accum": 2, "train.max_steps": 10,
        "train.ckpt_every": 7, "train.keep_last": 5, "train.test_at_end": "false"}))
    shards = read_dataset(tiny_data).shards("train")
    for step, left, steps in ((7, 7, 11), (10, 1, 22)):
        run = tmp_path / f"from-{step}"
        shutil.copytree(first, run)
        for newer in (run / "checkpoints").glob("step-*"):
            if int(newer.name.split("-")[1]) > step:
                shutil.rmtree(newer)
        saved = json.loads((run / "checkpoints" / f"step-{step:08d}" / "train_state.json").read_text())
        assert len(unread(Layout.from_dict(saved["data_layout"]), saved["data_reads"], shards)) == left
        resumed = launch("ddp.yaml", 2, _overrides(tiny_data, run, **{
            "data.batch_size": 1, "data.samples_per_epoch": 21, "optim.grad_accum": 2, "train.max_steps": steps,
            "resume": "latest", "train.test_at_end": "false"}))
        out = resumed.stdout + resumed.stderr
        assert "optim.grad_accum 2 -> 1 keeps the global batch at 2 samples per step" in out
        rows = [row for path in ledger_files(run) for row in read_ledger(path)]
        expected = _epoch_zero(tiny_data, saved["data_layout"])
        read = Counter(key for epoch, _, key in rows if epoch == 0)
        if left == 1:  # read with epoch 1: that epoch, as 2 processes deal it, is owed too
            assert "is too small to give each of 2 processes one: it is read with epoch 1" in out
            last = json.loads((run / "checkpoints" / f"step-{steps:08d}" / "train_state.json").read_text())
            second = Layout.from_dict({**last["data_layout"], "epoch": 1, "rest_of": None})
            expected.update(key for _, key in unread(second, [[0]] * 2, shards))
            read.update(key for epoch, _, key in rows if epoch == 1)
        else:
            assert "the unread rest of epoch 0 (7 samples, read so far by 1 process(es) x 1 worker(s), batch 1) is " \
                   "dealt to 2 x 1, batch 1: 3 batches per process; batches of up to 2 samples" in out
        assert read == expected  # every key of the epoch(s) once: none twice, none left out
        assert sorted({s for _, s, _ in rows}) == list(range(1, steps + 1))  # no step dropped or repeated
