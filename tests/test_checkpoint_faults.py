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

from conftest import tiny_overrides
from vkd_dist import checkpoint, fileio
from vkd_dist.config import load_config
from vkd_dist.fileio import free_port
from vkd_dist.train import train

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

        def write_manifest(ckpt):
            if STEP(4) in ckpt.name:
                raise _enospc(str(ckpt / checkpoint.MANIFEST_FILE))
            real(ckpt)

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
    checkpoint.export_image_model(accelerator, model, best, {"version": 0})
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
            checkpoint.export_image_model(accelerator, model, best, {"version": version})
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[:3]
    assert reads[0] > 10
    assert best.is_symlink() and json.loads((best / "meta.json").read_text()) == {"version": 59}
    assert torch.equal(load_file(checkpoint.find_weights(tmp_path, "best"))["weight"], torch.full((128, 128), 59.))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".best.v59", ".best.v60", "best"]  # current + previous
    shutil.copytree(tmp_path, tmp_path.parent / "copied", symlinks=True)  # the link is relative: copies work
    assert json.loads((tmp_path.parent / "copied" / "best" / "meta.json").read_text()) == {"version": 59}


@pytest.mark.distributed
def test_a_full_disk_on_one_rank_fails_the_save_on_every_rank_alike(tiny_data, tmp_path):
    """Rank 1 cannot write its part of checkpoint 4: both ranks raise the same error (neither waits forever in
    the next collective) and step 2 stays the newest checkpoint."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, str(tiny_data), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
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


if __name__ == "__main__":  # DATA OUT
    _rank_enospc(sys.argv[1], sys.argv[2])
