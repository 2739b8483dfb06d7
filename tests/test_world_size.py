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


# ------------------------------------------------------------------------------- the global batch, decided once
def _cfg(accum: int, batch: int = 8):
    from vkd_dist.config import Config

    cfg = Config()
    cfg.data.batch_size, cfg.optim.grad_accum = batch, accum
    return cfg


def _resume(saved: dict, world: int, accum: int) -> tuple:
    """One resume on `world` processes with optim.grad_accum=`accum` on its command line: what it trains with and
    the train_state.json fields its next checkpoint holds (as build_run sets them)."""
    from vkd_dist.world_size import keep_global_batch

    plan = keep_global_batch(_cfg(accum), saved, world)
    return plan, {"world_size": world, "grad_accum": plan.grad_accum, "global_batch": plan.global_batch,
                  "asked_grad_accum": plan.asked_grad_accum}


def test_a_second_resume_on_the_same_new_world_size_keeps_the_global_batch():
    """4 x 1 -> 2 (grad_accum 2) -> 2 again: the second resume compared the command line's grad_accum with the saved,
    adjusted one, returned early on an equal world size, and went back to grad_accum 1 (the global batch halved)."""
    first, saved = _resume({"world_size": 4, "grad_accum": 1, "global_batch": 32, "asked_grad_accum": 1}, 2, 1)
    assert first.grad_accum == 2 and first.note == ("resumed on 2 process(es), saved on 4: optim.grad_accum 1 -> 2 "
                                                    "keeps the global batch at 32 samples per step")
    second, saved = _resume(saved, 2, 1)
    assert (second.grad_accum, second.global_batch, second.note) == (2, 32, None)
    third, _ = _resume(saved, 1, 1)  # 2 x 2 -> 1: grad_accum 4 keeps 32 (it went to 8)
    assert third.grad_accum == 4 and third.note.endswith("optim.grad_accum 2 -> 4 keeps the global batch at 32 "
                                                         "samples per step")
    back, _ = _resume(saved, 4, 1)
    assert back.grad_accum == 1 and "optim.grad_accum 2 -> 1 keeps the global batch at 32" in back.note


def test_a_checkpoint_without_the_saved_ask_keeps_what_it_trained_with():
    plan, _ = _resume({"world_size": 2, "grad_accum": 2}, 1, 2)  # written before the ask was saved
    assert (plan.grad_accum, plan.global_batch) == (4, 32)


def test_the_global_batch_message_says_what_happened():
    """The conditions were inverted: "4 micro-batches do not divide over 1"; "changes from 32 to 32"."""
    saved = {"world_size": 4, "grad_accum": 1, "global_batch": 32, "asked_grad_accum": 1}
    odd, saved_odd = _resume(saved, 3, 1)
    assert odd.grad_accum == 1 and odd.note == (
        "resumed on 3 process(es), saved on 4: the global batch changes from 32 to 24 samples per step (32 samples "
        "do not divide into batches of 8 over 3 process(es); optim.grad_accum=1); the lr schedule is by step and "
        "optim.lr is not rescaled")
    again, _ = _resume(saved_odd, 2, 1)  # the ask survives the odd world size: 2 processes keep 32 again
    assert (again.grad_accum, again.global_batch) == (2, 32)
    asked, saved_asked = _resume(saved, 2, 3)  # a new grad_accum on the command line is a new ask
    assert asked.grad_accum == 3 and asked.note == (
        "resumed on 2 process(es), saved on 4: optim.grad_accum=3 asked (was 1): the global batch changes from 32 to "
        "48 samples per step; the lr schedule is by step and optim.lr is not rescaled")
    assert _resume(saved_asked, 2, 3)[0].note is None and _resume(saved_asked, 1, 3)[0].grad_accum == 6
    same, _ = _resume(saved, 2, 2)  # asked 2 on 2 processes: the same 32, nothing to say about the global batch
    assert same.grad_accum == 2 and "changes from" not in (same.note or "")


@pytest.mark.distributed
@pytest.mark.slow  # three trainer launches
def test_a_second_resume_keeps_the_global_batch_in_every_step_of_the_ledger(tiny_data, tmp_path):
    """2 processes x grad_accum 1 -> 1 process (grad_accum 2) -> 1 process again, end to end: every step of the
    ledger holds 16 samples (the second resume used to go back to grad_accum 1: 8 a step)."""
    run = tmp_path / "run"
    common = {"train.test_at_end": "false", "optim.grad_accum": 1}
    launch("ddp.yaml", 2, _overrides(tiny_data, run, **{"train.max_steps": 2, **common}))
    first = launch("ddp.yaml", 1, _overrides(tiny_data, run, **{"train.max_steps": 3, "resume": "latest", **common}))
    assert "optim.grad_accum 1 -> 2 keeps the global batch at 16 samples per step" in first.stdout + first.stderr
    launch("ddp.yaml", 1, _overrides(tiny_data, run, **{"train.max_steps": 4, "resume": "latest", **common}))
    per_step = Counter(step for path in ledger_files(run) for _, step, _ in read_ledger(path))
    assert per_step == {1: 16, 2: 16, 3: 16, 4: 16}
    saved = json.loads((run / "checkpoints" / "step-00000004" / "train_state.json").read_text())
    assert (saved["world_size"], saved["grad_accum"], saved["global_batch"]) == (1, 2, 16)
