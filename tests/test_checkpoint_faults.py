"""Checkpoints under faults: what is fsynced, what the digest manifest catches, a full disk during a save, a
truncated file at resume, and best/ replaced while a reader keeps reading it."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_overrides
from vkd_dist import checkpoint, fileio, ledger, lines, weights
from vkd_dist.configure import load_config
from vkd_dist.fileio import free_port
from vkd_dist.train import train

TESTS_AND_REPO = os.pathsep.join([str(REPO / "tests"), str(REPO)])  # the ranks import this checkout's vkd_dist
STEP = "step-{:08d}".format


def _fake_checkpoint(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "model.safetensors").write_bytes(os.urandom(4096))
    (path / "sub" / "shard_rank_1.pt").write_bytes(b"x" * 100)
    (path / checkpoint.STATE_FILE).write_text("{}")
    checkpoint.write_manifest(path)
    return path


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    fileio.atomic_write_text(tmp_path / "a.json", "{}")
    assert synced == [str(tmp_path / f".a.json.tmp-{os.getpid()}"), str(tmp_path)]
    synced.clear()
    fileio.fsync_tree(_fake_checkpoint(tmp_path / "ckpt"))
    assert set(synced) >= {str(p) for p in (tmp_path / "ckpt").rglob("*")} | {str(tmp_path / "ckpt")}


@pytest.mark.parametrize("damage,expected", [
    ("remove manifest.json", r"manifest.json is missing \(the save did not finish\)"),
    ("remove sub/shard_rank_1.pt", r"sub/shard_rank_1.pt is missing \(expected 100 bytes\)"),
    ("truncate model.safetensors", r"model.safetensors has 2048 bytes, expected 4096 \(truncated or changed\)"),
    ("flip model.safetensors", r"model.safetensors does not match its SHA-256 in manifest.json"),
    ("add sub/extra.pt", r"sub/extra.pt is not in manifest.json \(added after the save\)"),
])
def test_verify_names_the_file_and_what_is_wrong(tmp_path, damage, expected):
    ckpt = _fake_checkpoint(tmp_path / STEP(2))
    assert checkpoint.verify(ckpt) is None
    action, name = damage.split()
    path = ckpt / name
    if action == "remove":
        path.unlink()
    elif action == "truncate":
        os.truncate(path, 2048)
    elif action == "flip":
        data = bytearray(path.read_bytes())
        data[100] ^= 1
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(b"")
    problem = checkpoint.verify(ckpt)
    assert problem is not None and problem.startswith(str(ckpt)), problem
    assert re.search(expected, problem), problem


def test_resume_latest_with_no_checkpoint_that_verifies_refuses_to_start_afresh(tmp_path):
    ckpt = _fake_checkpoint(tmp_path / checkpoint.CKPT_DIR / STEP(2))
    (ckpt / checkpoint.MANIFEST_FILE).unlink()
    with pytest.warns(RuntimeWarning, match="checkpoint step-00000002 skipped"), \
            pytest.raises(checkpoint.CheckpointError, match=r"none of the 1 checkpoints .* verifies .*move them aside"):
        checkpoint.resolve(tmp_path, "latest")
    with pytest.raises(checkpoint.CheckpointError, match=r"resume=.*step-00000002: not a complete checkpoint"):
        checkpoint.resolve(tmp_path, str(ckpt))


def _overrides(run: Path, data: Path, **extra) -> list[str]:
    return tiny_overrides(data, run, objective="image_only", **{
        "train.max_steps": 4, "train.ckpt_every": 2, "train.test_at_end": False, **extra})


def test_a_truncated_checkpoint_file_is_skipped_and_the_previous_one_resumed_exactly(tiny_data, tmp_path):
    train(load_config(overrides=_overrides(tmp_path, tiny_data)))
    newest = tmp_path / checkpoint.CKPT_DIR / STEP(4)
    uninterrupted = {k: v.clone() for k, v in load_file(newest / "model.safetensors").items()}  # not the mmap
    os.truncate(newest / "model.safetensors", (newest / "model.safetensors").stat().st_size // 2)
    with pytest.warns(RuntimeWarning) as caught:
        result = train(load_config(overrides=_overrides(tmp_path, tiny_data, resume="latest")))
    messages = {str(w.message) for w in caught if "skipped" in str(w.message)}
    assert len(messages) == 1, messages
    message = messages.pop()
    print(message)
    assert message.startswith(f"resume=latest: checkpoint {STEP(4)} skipped: {newest}/model.safetensors has ")
    assert message.endswith("(truncated or changed); trying the one before")
    assert result.step == 4 and checkpoint.verify(newest) is None  # steps 3-4 redone from step 2, saved anew
    redone = load_file(newest / "model.safetensors")
    assert all(torch.equal(uninterrupted[k], redone[k]) for k in uninterrupted)


def _enospc(path: str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


@pytest.mark.parametrize("where", ["manifest", "tensors"])
def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint_loadable(tiny_data, tmp_path, monkeypatch, where):
    from accelerate import Accelerator

    if where == "manifest":
        real = checkpoint.write_manifest

        def write_manifest(ckpt, *args):
            if STEP(4) in ckpt.name:
                raise _enospc(str(ckpt / checkpoint.MANIFEST_FILE))
            real(ckpt, *args)

        monkeypatch.setattr(checkpoint, "write_manifest", write_manifest)
    else:
        real_save = Accelerator.save_state

        def save_state(self, output_dir, **kwargs):
            real_save(self, output_dir, **kwargs)
            if STEP(4) in output_dir:  # written in part, then the disk filled up
                os.truncate(Path(output_dir) / "optimizer.bin", 10)
                raise _enospc(str(Path(output_dir) / "optimizer.bin"))

        monkeypatch.setattr(Accelerator, "save_state", save_state)
    with pytest.raises(checkpoint.CheckpointError) as raised:
        train(load_config(overrides=_overrides(tmp_path, tiny_data, **{"train.max_steps": 6})))
    print(raised.value)
    file = checkpoint.MANIFEST_FILE if where == "manifest" else "optimizer.bin"
    tmp = tmp_path / checkpoint.CKPT_DIR / f".tmp-{STEP(4)}"
    assert str(raised.value) == (f"checkpoint {STEP(4)} not written: No space left on device ({tmp / file}, rank 0); "
                                 f"the previous checkpoint {STEP(2)} is intact")
    assert sorted(p.name for p in (tmp_path / checkpoint.CKPT_DIR).iterdir()) == [STEP(2)]  # nothing half-written
    assert checkpoint.resolve(tmp_path, "latest") == tmp_path / checkpoint.CKPT_DIR / STEP(2)
    monkeypatch.undo()
    resumed = train(load_config(overrides=_overrides(tmp_path, tiny_data, resume="latest",
                                                     **{"train.max_steps": 6})))
    assert resumed.step == 6
    assert json.loads((tmp_path / "final" / "meta.json").read_text())["step"] == 6


def test_best_is_replaced_without_a_moment_in_which_it_is_missing(tmp_path):
    from accelerate import Accelerator

    accelerator, model = Accelerator(cpu=True), torch.nn.Linear(128, 128)
    best = tmp_path / "best"
    best.mkdir()  # as written before exports were versioned: a plain directory, converted on the first export
    (best / "model.safetensors").write_bytes(b"")
    weights.export_image_model(accelerator, model, best, {"version": 0})
    stop, reads, errors = threading.Event(), [0], []

    def reader():
        while not stop.is_set():
            try:
                tensors = load_file(best / "model.safetensors")
                json.loads((best / "meta.json").read_text())
                assert set(tensors) == {"weight", "bias"}
                reads[0] += 1
            except Exception as exc:  # noqa: BLE001 - collected, asserted below
                errors.append(repr(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for version in range(1, 60):
            with torch.no_grad():
                model.weight.fill_(version)
            weights.export_image_model(accelerator, model, best, {"version": version})
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[:3]
    assert reads[0] > 10
    assert best.is_symlink() and json.loads((best / "meta.json").read_text()) == {"version": 59}
    assert torch.equal(load_file(weights.find_weights(tmp_path, "best"))["weight"], torch.full((128, 128), 59.))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".best.v59", ".best.v60", "best"]  # current + previous
    shutil.copytree(tmp_path, tmp_path.parent / "copied", symlinks=True)  # the link is relative: copies work
    assert json.loads((tmp_path.parent / "copied" / "best" / "meta.json").read_text()) == {"version": 59}


def _saved(run: Path, step: int) -> Path:
    """A checkpoint of `run` at `step` as `save` leaves it (train_state.json with its step, a manifest)."""
    ckpt = _fake_checkpoint(run / checkpoint.CKPT_DIR / STEP(step))
    (ckpt / checkpoint.STATE_FILE).write_text(json.dumps({"step": step}))
    checkpoint.write_manifest(ckpt)
    return ckpt


ROLLED_BACK = (r"rolled back to step-00000300: step-00000400 moved to checkpoints/abandoned-00000300-\d{8}T\d{6}Z "
               r"with the sample-ledger rows after step 300 \(kept; never deleted by retention\)")


@pytest.mark.parametrize("keep_last", [1, 2])
def test_a_rollback_keeps_the_abandoned_line_aside_and_the_new_line_survives_retention(tmp_path, keep_last):
    """resume=RUN/checkpoints/step-300 in a run that has step-400: step-400 is moved aside (kept), the save at 350
    survives keep_last=1 (it used to delete itself), and resume=latest follows the new line (it used to load 400)."""
    from accelerate import Accelerator

    accelerator, root = Accelerator(cpu=True), tmp_path / checkpoint.CKPT_DIR
    _saved(tmp_path, 300), _saved(tmp_path, 400)
    ckpt = checkpoint.resolve(tmp_path, str(root / STEP(300)), accelerator)
    message = lines.continue_line(tmp_path, ckpt, accelerator).note
    assert message is not None and re.fullmatch(ROLLED_BACK, message), message
    saved = checkpoint.save(accelerator, tmp_path, 350, {}, keep_last=keep_last)
    assert saved.is_dir() and checkpoint.verify(saved) is None
    assert [p.name for p in checkpoint._step_dirs(tmp_path)] == [STEP(s) for s in (300, 350)][-keep_last:]
    assert checkpoint.resolve(tmp_path, "latest") == root / STEP(350) == checkpoint.latest(tmp_path)
    checkpoint.save(accelerator, tmp_path, 360, {}, keep_last=keep_last)
    (abandoned,) = root.glob(f"{checkpoint.ABANDONED}*")  # one per rollback, never touched by retention
    assert [p.name for p in abandoned.iterdir()] == [STEP(400)] and checkpoint.verify(abandoned / STEP(400)) is None
    assert lines.continue_line(tmp_path, root / STEP(360), accelerator).note is None  # nothing newer: no message


def test_a_fallback_from_a_bad_newest_checkpoint_moves_it_aside_and_keeps_the_good_ones(tmp_path):
    """resume=latest skips a truncated step-400 for step-300; the next save (keep_last=1) used to keep step-400
    alone, deleting every checkpoint that verifies."""
    from accelerate import Accelerator

    accelerator, root = Accelerator(cpu=True), tmp_path / checkpoint.CKPT_DIR
    _saved(tmp_path, 200), _saved(tmp_path, 300)
    bad = _saved(tmp_path, 400)
    os.truncate(bad / "model.safetensors", 100)
    with pytest.warns(RuntimeWarning, match=f"checkpoint {STEP(400)} skipped"):
        ckpt = checkpoint.resolve(tmp_path, "latest", accelerator)
    assert ckpt == root / STEP(300)
    message = lines.continue_line(tmp_path, ckpt, accelerator).note
    assert message is not None and re.fullmatch(ROLLED_BACK, message), message
    checkpoint.save(accelerator, tmp_path, 350, {}, keep_last=1)
    assert [p.name for p in checkpoint._step_dirs(tmp_path)] == [STEP(350)]
    assert checkpoint.resolve(tmp_path, "latest") == root / STEP(350)
    (abandoned,) = root.glob(f"{checkpoint.ABANDONED}*")
    assert (abandoned / STEP(400) / "model.safetensors").stat().st_size == 100  # the evidence, kept as it was


class _Killed(BaseException):
    """A process killed mid-save: nothing after it runs (no except-Exception clean-up either)."""


@pytest.mark.parametrize("then", ["resolve", "save"])
def test_a_resave_killed_between_its_renames_keeps_the_old_checkpoint(tmp_path, monkeypatch, then):
    """Re-saving step 4 (after a resume) renames the old step-4 aside, then the new one into place; killed between
    the two, the old one is kept as .old-step-4 and put back by the next resume or save (it used to be deleted
    before the new one was in place)."""
    from accelerate import Accelerator

    accelerator, root = Accelerator(cpu=True), tmp_path / checkpoint.CKPT_DIR
    checkpoint.save(accelerator, tmp_path, 4, {"attempt": 1}, keep_last=2)
    real = os.replace

    def replace(src, dst):
        if Path(src).name == f".tmp-{STEP(4)}":
            raise _Killed
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(_Killed):
        checkpoint.save(accelerator, tmp_path, 4, {"attempt": 2}, keep_last=2)
    monkeypatch.undo()
    assert not (root / STEP(4)).exists() and (root / f".old-{STEP(4)}" / checkpoint.STATE_FILE).is_file()
    with pytest.warns(RuntimeWarning, match=f"checkpoint {STEP(4)} restored from .old-{STEP(4)}"):
        if then == "resolve":
            assert checkpoint.resolve(tmp_path, "latest") == root / STEP(4)
        else:
            checkpoint.save(accelerator, tmp_path, 6, {}, keep_last=2)
    assert [p.name for p in checkpoint._step_dirs(tmp_path)] == [STEP(4)] + ([STEP(6)] if then == "save" else [])
    assert json.loads((root / STEP(4) / checkpoint.STATE_FILE).read_text())["attempt"] == 1
    assert checkpoint.verify(root / STEP(4)) is None
    checkpoint.save(accelerator, tmp_path, 4, {"attempt": 3}, keep_last=2)  # a re-save that finishes: no .old-* left
    assert json.loads((root / STEP(4) / checkpoint.STATE_FILE).read_text())["attempt"] == 3
    assert not list(root.glob(".old-*")) and not list(root.glob(".tmp-*"))


def test_files_are_dealt_to_ranks_largest_first_so_the_shares_balance():
    sizes = {"model.safetensors": 100, "optimizer.bin": 60, "random_states_0.pkl": 50, "train_state.json": 10}
    assert checkpoint._deal(sizes, 2) == [["model.safetensors", "train_state.json"],
                                          ["optimizer.bin", "random_states_0.pkl"]]
    assert checkpoint._deal(sizes, 1) == [sorted(sizes, key=lambda r: -sizes[r])]
    assert checkpoint._deal(sizes, 8)[4:] == [[], [], [], []]  # more ranks than files: the rest hash nothing


@pytest.mark.distributed
def test_every_rank_hashes_a_share_at_save_and_resume_and_all_agree(tmp_path):
    """2 processes: each hashes about half of the checkpoint's files at the save and at the resume (rank 0 used to
    hash them all while rank 1 waited); the manifest is what one process would write; a file changed in each
    rank's share is reported alike on both ranks, the first in the manifest's order."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, "hashing", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": TESTS_AND_REPO}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-8000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    ckpt = tmp_path / "run" / checkpoint.CKPT_DIR / STEP(2)
    manifest = json.loads((ckpt / checkpoint.MANIFEST_FILE).read_text())["files"]
    assert list(manifest) == list(checkpoint._files(ckpt))  # the order one process writes
    for when in ("save", "resume"):
        shares = [set(r[when]) for r in ranks]
        assert all(shares) and not shares[0] & shares[1] and shares[0] | shares[1] == set(manifest), (when, shares)
    assert ranks[0]["chosen"] == ranks[1]["chosen"] == str(ckpt)
    damaged = ranks[0]["damaged"]
    assert len(damaged) == 2 and {damaged[0] in set(r["resume"]) for r in ranks} == {True, False}
    first = min(damaged, key=list(manifest).index)
    assert ranks[0]["problem"] == ranks[1]["problem"] == ranks[0]["single"] == (
        f"{ckpt / first} does not match its SHA-256 in {checkpoint.MANIFEST_FILE} (changed since the save)")
    for rel, want in manifest.items():
        if rel not in damaged:
            assert checkpoint._sha256(ckpt / rel) == want["sha256"] and (ckpt / rel).stat().st_size == want["size"]


def _rank_hashing(out: str) -> None:  # one rank under torchrun
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rank, run = accelerator.process_index, Path(out) / "run"
    accelerator.prepare(torch.nn.Linear(64, 64))
    hashed: list[str] = []
    real = checkpoint._sha256

    def spy(path):
        hashed.append(Path(path).name)
        return real(path)

    checkpoint._sha256 = spy  # type: ignore[assignment]
    ckpt = checkpoint.save(accelerator, run, 2, {}, keep_last=2)
    report: dict = {"save": sorted(hashed)}
    hashed.clear()
    checkpoint._verified.clear()
    report["chosen"] = str(checkpoint.resolve(run, "latest", accelerator))
    report["resume"] = sorted(hashed)
    shares = [sorted(s) for s in _gather_shares(report["resume"], accelerator)]
    report["damaged"] = [shares[1][0], shares[0][0]]  # one file of each rank's share
    if rank == 0:
        for rel in report["damaged"]:
            data = bytearray((ckpt / rel).read_bytes())
            data[len(data) // 2] ^= 1
            (ckpt / rel).write_bytes(bytes(data))
    accelerator.wait_for_everyone()
    report["problem"] = checkpoint.verify(ckpt, accelerator)
    if rank == 0:
        checkpoint._verified.clear()
        report["single"] = checkpoint.verify(ckpt)  # one process, all files: the same answer
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
    accelerator.end_training()  # a rank that exits with gloo still connected can abort ("terminate called ...")


def _gather_shares(share: list[str], accelerator) -> list[list[str]]:
    from accelerate.utils import gather_object

    return gather_object([share])


@pytest.mark.distributed
def test_a_full_disk_on_one_rank_fails_the_save_on_every_rank_alike(tiny_data, tmp_path):
    """Rank 1 cannot write its part of checkpoint 4: both ranks raise the same error (neither waits forever in
    the next collective) and step 2 stays the newest checkpoint."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, str(tiny_data), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": TESTS_AND_REPO}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == messages[1], messages
    assert messages[0].startswith(f"checkpoint {STEP(4)} not written: No space left on device (") and \
        messages[0].endswith(f"rank 1); the previous checkpoint {STEP(2)} is intact"), messages[0]
    assert sorted(p.name for p in (tmp_path / "run" / checkpoint.CKPT_DIR).iterdir()) == [STEP(2)]


def _rank_enospc(data: str, out: str) -> None:  # one rank under torchrun
    from accelerate import Accelerator

    from vkd_dist.train import StopRequest

    rank, real_save = int(os.environ["RANK"]), Accelerator.save_state

    def save_state(self, output_dir, **kwargs):
        real_save(self, output_dir, **kwargs)
        if rank == 1 and STEP(4) in output_dir:
            raise _enospc(str(Path(output_dir) / f"random_states_{rank}.pkl"))

    Accelerator.save_state = save_state  # type: ignore[method-assign]
    try:
        train(load_config(overrides=_overrides(Path(out) / "run", Path(data), **{"train.max_steps": 6})),
              StopRequest(install=False))
    except checkpoint.CheckpointError as exc:
        (Path(out) / f"rank{rank}.txt").write_text(str(exc))
        raise SystemExit(3) from None


if __name__ == "__main__":  # DATA OUT, or: hashing OUT
    if sys.argv[1] == "hashing":
        _rank_hashing(sys.argv[2])
    else:
        _rank_enospc(sys.argv[1], sys.argv[2])


# --------------------------------------------------------------------------------------------- a used run_dir
@pytest.mark.slow  # three short trainings
def test_a_new_run_in_a_used_run_dir_is_refused_or_keeps_both_runs(tiny_data, tmp_path, capsys):
    """A run without resume= in a run_dir that holds another run used to save into it beside the other run's
    checkpoints (retention then deleted the new ones, `latest` stayed the old run's) and leave its test metrics
    beside the new model. It is refused in one line; overwrite=true moves the old run aside whole."""
    from vkd_dist.train import main as train_main

    run = tmp_path / "run"
    over = tiny_overrides(tiny_data, run, **{"train.max_steps": 2, "train.ckpt_every": 1, "train.keep_last": 2})
    assert train_main([*over, "resume=latest"]) == 0
    assert "resume=latest: no checkpoint in" in capsys.readouterr().out  # said, in one line: a fresh start
    first = {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert train_main(over) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vkd-train: config error: run_dir={run} holds another run (config.yaml, checkpoints/, best/, "
                   "final/, test_metrics.json): continue it with resume=latest, or train into a new run_dir "
                   "(overwrite=true moves the old run aside, kept)"]
    assert {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*") if p.is_file()} == first
    assert train_main([*over, "overwrite=true", "train.seed=1", "train.max_steps=1", "optim.warmup_steps=0"]) == 0
    (old,) = tmp_path.glob("run.previous-*")
    assert f"overwrite=true: the run that was in {run} moved to {old} (kept)" in capsys.readouterr().out
    assert {p.relative_to(old).as_posix(): p.read_bytes() for p in old.rglob("*") if p.is_file()} == first
    assert [p.name for p in checkpoint._step_dirs(run)] == [STEP(1)]  # the new run's own, beside nothing else
    assert json.loads((run / "final" / "meta.json").read_text())["step"] == 1
    assert "overwrite: false" in (run / "config.yaml").read_text()  # a rerun of its config.yaml never overwrites


# --------------------------------------------------------------------------------------------- lines
def _ledger(run: Path, steps: range, ranks: int = 2) -> None:
    """Rows as the ranks append them: two keys a step each."""
    for rank in range(ranks):
        path = run / "ledger" / f"rank-{rank}.csv"
        rows = ledger.read_ledger(path) if path.is_file() else []
        ledger._write(path, [*rows, *((0, s, f"k{rank}-{s}-{i}") for s in steps for i in range(2))])


def _export(run: Path, which: str, step: int) -> None:
    staged = fileio.stage_version(run / which)
    (staged / "meta.json").write_text(json.dumps({"step": step}))
    fileio.publish_dir(staged, run / which)


def _steps_of(run: Path) -> list[int]:
    return sorted({step for path in ledger.ledger_files(run) for _, step, _ in ledger.read_ledger(path)})


def test_a_rollback_keeps_everything_of_the_abandoned_line_and_undoing_it_sets_the_other_aside(tmp_path):
    """Line A ran to step 400 (best/ at 350, final/ and test metrics at 400); resume=step-200 used to truncate the
    ledger past 200 and leave A's best/ as the run's; resuming A's step-300 again (after the new line B saved 250)
    used to set nothing aside, so step-250 stayed in the line and the ledger mixed the two lines."""
    from accelerate import Accelerator

    accelerator, root = Accelerator(cpu=True), tmp_path / checkpoint.CKPT_DIR
    for step in (200, 300, 400):
        _saved(tmp_path, step)
    _ledger(tmp_path, range(1, 401))
    _export(tmp_path, "best", 350), _export(tmp_path, "final", 400)
    (tmp_path / "test_metrics.json").write_text('{"macro_auroc": 0.7}')

    back = checkpoint.resolve(tmp_path, str(root / STEP(200)), accelerator)
    change = lines.continue_line(tmp_path, back, accelerator)
    (a,) = root.glob(f"{checkpoint.ABANDONED}00000200-*")
    assert change.note == (f"rolled back to {STEP(200)}: {STEP(300)}, {STEP(400)}, best/, final/ moved to "
                           f"checkpoints/{a.name} with the sample-ledger rows after step 200 (kept; never deleted by "
                           "retention)")
    assert change.ckpt == root / STEP(200) and not change.best_kept  # A's best/ is not the continued line's
    assert sorted(p.name for p in a.glob("step-*")) == [STEP(300), STEP(400)]
    assert _steps_of(tmp_path) == list(range(1, 201)) and _steps_of(a) == list(range(201, 401))
    assert json.loads((a / "best" / "meta.json").read_text())["step"] == 350 and (a / "test_metrics.json").is_file()
    assert not (tmp_path / "best").exists() and not (tmp_path / "final").exists()
    assert not (tmp_path / "test_metrics.json").exists()

    checkpoint.save(accelerator, tmp_path, 250, {}, keep_last=2)  # line B
    _ledger(tmp_path, range(201, 261))  # and rows of steps past its last checkpoint (a crash)
    _export(tmp_path, "best", 250)

    undo = lines.continue_line(tmp_path, checkpoint.resolve(tmp_path, str(a / STEP(300)), accelerator), accelerator)
    (b,) = [p for p in root.glob(f"{checkpoint.ABANDONED}00000200-*") if p != a]
    assert undo.ckpt == root / STEP(300) and checkpoint.verify(undo.ckpt) is None
    assert undo.note == (f"rolled back to {STEP(300)}: {STEP(250)}, best/ moved to checkpoints/{b.name} with the "
                         f"sample-ledger rows after step 200 (kept; never deleted by retention); {STEP(300)} brought "
                         f"back from checkpoints/{a.name}")
    assert [p.name for p in checkpoint._step_dirs(tmp_path)] == [STEP(200), STEP(300)]
    assert checkpoint.resolve(tmp_path, "latest", accelerator) == root / STEP(300)  # a crash now continues A
    assert _steps_of(tmp_path) == list(range(1, 301))  # A's rows: none of B's
    assert _steps_of(b) == list(range(201, 261)) and json.loads((b / "best" / "meta.json").read_text())["step"] == 250
    assert sorted(p.name for p in a.glob("step-*")) == [STEP(400)] and _steps_of(a) == list(range(301, 401))
    assert not undo.best_kept and (a / "best").exists()  # A's best/ came at 350, after the step continued


def test_after_a_rollback_best_stays_when_it_came_from_the_line_continued(tmp_path):
    from accelerate import Accelerator

    accelerator, root = Accelerator(cpu=True), tmp_path / checkpoint.CKPT_DIR
    _saved(tmp_path, 200), _saved(tmp_path, 400)
    _export(tmp_path, "best", 100)
    change = lines.continue_line(tmp_path, root / STEP(200), accelerator)
    assert change.best_kept and json.loads((tmp_path / "best" / "meta.json").read_text())["step"] == 100
