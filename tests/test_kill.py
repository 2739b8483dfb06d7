"""kill -9 anywhere, same result: a run SIGKILLed at three points drawn by a seeded generator (at least one inside
a checkpoint save), each time continued with resume=latest, ends with parameters bit-identical (fp32, CPU) to
the same run left alone. For one process (`python -m vkd_dist.train`) and for 2-process DDP (`accelerate launch`,
gloo on the CPU). After every kill, every step-* directory left behind must verify: a crash never publishes a
partial checkpoint.

The points are events in the run directory, not times, so that they mean the same on a slow or a fast machine:
("save", k) is inside the save of step k, after the tensors and train_state.json are written and before the
manifest and the rename (the test-only VKD_TEST_SAVE_DELAY_S holds the save there); ("after", k) is a random
fraction of a second after checkpoint k appeared (somewhere in the next steps); ("final", 8) is right after
final/ was exported (the resumed run redoes the last steps from checkpoint 8 and exports again).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_overrides
from vkd_dist import checkpoint
from vkd_dist.fileio import free_port

pytestmark = pytest.mark.slow
STEPS, EVERY, SEED = 8, 2, 12  # seed 12: inside save 4, after checkpoint 6, after final/
EVENTS = [*(e for k in range(EVERY, STEPS + 1, EVERY) for e in (("save", k), ("after", k)) if e != ("after", STEPS)),
          ("final", STEPS)]


def _command(nproc: int, data: Path, run: Path, workers: int, resume: bool) -> list[str]:
    overrides = tiny_overrides(data, run, **{"train.max_steps": STEPS, "train.ckpt_every": EVERY,
                                             "train.test_at_end": False, "data.num_workers": workers,
                                             **({"resume": "latest"} if resume else {})})
    if nproc == 1:
        return [sys.executable, "-m", "vkd_dist.train", *overrides]
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
            str(REPO / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", str(nproc),
            "--main_process_port", str(free_port()), "-m", "vkd_dist.train", *overrides]


def _start(cmd: list[str], log: Path, save_delay: bool) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("VKD_TEST_SAVE_DELAY_S", None)
    if save_delay:
        env["VKD_TEST_SAVE_DELAY_S"] = "1.5"
    with open(log, "w") as out:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _fail(why: str, log: Path) -> None:
    pytest.fail(f"{why}\n--- {log} (tail)\n{log.read_text()[-6000:]}", pytrace=False)


def _finish(cmd: list[str], log: Path) -> None:
    proc = _start(cmd, log, save_delay=False)
    if proc.wait(timeout=300) != 0:
        _fail(f"{' '.join(cmd)}: exit {proc.returncode}", log)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def _crash(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group and every descendant's, as a node crash would. The launcher's group
    alone is not enough: torch's elastic agent starts each rank in a session of its own, which would train on."""
    groups = set()
    for pid in _descendants(proc.pid):
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for group in groups - {os.getpgrp()}:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def _latest_step(run: Path) -> int:
    ckpt = checkpoint.latest(run)
    return int(ckpt.name.split("-")[1]) if ckpt else 0


def _final_target(run: Path) -> Optional[str]:
    return os.readlink(run / "final") if (run / "final").is_symlink() else None


def _happened(event: tuple[str, int], run: Path, final_before: Optional[str]) -> bool:
    kind, step = event
    ckpts = run / checkpoint.CKPT_DIR
    if kind == "save":
        return (ckpts / f".tmp-step-{step:08d}" / checkpoint.STATE_FILE).exists()
    if kind == "after":
        return (ckpts / f"step-{step:08d}").is_dir()
    return _final_target(run) not in (None, final_before)


def _kill_points(rng: random.Random) -> list[tuple[str, int]]:
    while True:
        points = [EVENTS[i] for i in sorted(rng.sample(range(len(EVENTS)), 3))]
        if any(kind == "save" for kind, _ in points):
            return points


def _kill_at(event: tuple[str, int], cmd: list[str], run: Path, log: Path, rng: random.Random) -> str:
    final_before = _final_target(run)
    proc = _start(cmd, log, save_delay=event[0] == "save")
    deadline = time.monotonic() + 240
    while not _happened(event, run, final_before):
        if proc.poll() is not None or time.monotonic() > deadline:
            _crash(proc)
            _fail(f"{event} never happened (exit {proc.returncode})", log)
        time.sleep(0.005)
    pause = rng.uniform(0, 0.3) if event[0] == "after" else 0.0
    time.sleep(pause)
    if proc.poll() is not None:
        _fail(f"the run ended before the kill at {event} + {pause:.2f} s", log)
    _crash(proc)
    return f"{event[0]} {event[1]}" + (f" + {pause:.2f} s" if pause else "")


@pytest.mark.parametrize("nproc,workers", [pytest.param(1, 2, id="1-process"),
                                           pytest.param(2, 0, id="ddp-2", marks=pytest.mark.distributed)])
def test_kill_9_at_three_points_then_resume_ends_bit_identical(tiny_data, tmp_path, nproc, workers):
    t0 = time.perf_counter()
    _finish(_command(nproc, tiny_data, tmp_path / "whole", workers, resume=False), tmp_path / "whole.log")
    rng, run, killed = random.Random(SEED), tmp_path / "killed", []
    for i, point in enumerate(_kill_points(rng)):
        # an 'after' kill may have landed past a later point's step: take the next event still ahead
        ahead = _latest_step(run)
        point = next(e for e in EVENTS[EVENTS.index(point):] if e[1] > ahead or e[0] == "final")
        killed.append(_kill_at(point, _command(nproc, tiny_data, run, workers, resume=i > 0), run,
                               tmp_path / f"killed-{i}.log", rng))
        for step_dir in sorted((run / checkpoint.CKPT_DIR).glob("step-*")):
            assert checkpoint.verify(step_dir) is None, (killed, step_dir)
    _finish(_command(nproc, tiny_data, run, workers, resume=True), tmp_path / "resumed.log")
    whole, resumed = load_file(tmp_path / "whole" / "final" / "model.safetensors"), load_file(
        run / "final" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    different = [k for k in whole if not torch.equal(whole[k], resumed[k])]
    assert not different, f"killed at {killed}: {len(different)} tensors differ (first {different[0]})"
    metas = [json.loads((r / "final" / "meta.json").read_text()) for r in (tmp_path / "whole", run)]
    assert metas[0]["param_digests"] == metas[1]["param_digests"] and metas[1]["step"] == STEPS
    print(f"{nproc} process(es): killed at {killed}; final parameters bit-identical; "
          f"{time.perf_counter() - t0:.0f} s")
