"""Preemption stop: the ranks agree on a stop that only one of them was asked for, at the same step, over a CPU
collective (no device read-back per step)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vkd_dist.fileio import free_port

pytestmark = pytest.mark.distributed


def test_single_process_agrees_with_itself_without_collectives():
    from vkd_dist.train import StopRequest

    class OneProcess:
        num_processes = 1

    stop = StopRequest(install=False)
    assert stop.agreed(OneProcess()) is False
    stop.requested = True
    assert stop.agreed(OneProcess()) is True and stop._group is None


def test_two_ranks_stop_together_when_one_is_signalled(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):  # rank 1 alone is signalled after its 3rd step; both see it at step 3, not before
        assert (tmp_path / f"rank{rank}.txt").read_text() == "0,0,1"


if __name__ == "__main__":  # one rank under torchrun
    import signal

    from accelerate import Accelerator

    from vkd_dist.train import StopRequest

    accelerator = Accelerator(cpu=True)
    stop = StopRequest(install=True)
    seen = []
    for step in range(1, 4):
        if step == 3 and accelerator.process_index == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # as SLURM's preemption notice would, to this rank only
        seen.append(int(stop.agreed(accelerator)))
    stop.restore()
    Path(sys.argv[1], f"rank{accelerator.process_index}.txt").write_text(",".join(map(str, seen)))
    accelerator.end_training()  # a rank that exits with gloo still connected can abort ("terminate called ...")
