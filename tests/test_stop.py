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


def _bn_run(data: Path, run: Path, mode: str) -> None:
    """One 2-process torchrun of the trainer (BatchNorm image encoder, 12 steps, no evaluation or checkpoint before
    the last step): `whole`, `stop` (every rank stops after step 3) or `resume` (resume=latest)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, "bn", str(data), str(run), mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                                                  str(Path(__file__).parent.parent)])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]


@pytest.mark.slow  # three 2-process trainer runs
def test_a_stop_between_sync_steps_leaves_training_as_it_was(tiny_data, tmp_path):
    """A stop at a step with no validation or checkpoint synced the ranks' BatchNorm buffers where an uninterrupted
    run does not (DDP then broadcast rank 0's, now the mean): the resumed run drifted from the uninterrupted one.
    The stop's checkpoint keeps each rank's own buffers and the resumed run ends bit-identical."""
    import json

    import torch
    from safetensors.torch import load_file

    _bn_run(tiny_data, tmp_path / "whole", "whole")
    _bn_run(tiny_data, tmp_path / "stopped", "stop")
    _bn_run(tiny_data, tmp_path / "stopped", "resume")
    whole, resumed = (load_file(tmp_path / r / "final" / "model.safetensors") for r in ("whole", "stopped"))
    assert whole.keys() == resumed.keys()
    assert [k for k in whole if not torch.equal(whole[k], resumed[k])] == []
    digests = [json.loads((tmp_path / r / "final" / "meta.json").read_text())["param_digests"]
               for r in ("whole", "stopped")]
    assert digests[0] == digests[1]
    ckpt = tmp_path / "stopped" / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in (ckpt / "rank-buffers").iterdir()) == ["rank-0.safetensors", "rank-1.safetensors"]


def _bn_rank(data: str, run: str, mode: str) -> None:  # one rank under torchrun
    from conftest import tiny_overrides
    from vkd_dist.configure import load_config
    from vkd_dist.train import StopRequest, train

    class StopAfter(StopRequest):
        def __init__(self, n):
            super().__init__(install=False)
            self.n, self.calls = n, 0

        def agreed(self, accelerator):  # every rank alike, as the agreed stop is
            self.calls += 1
            return self.calls >= self.n

    cfg = load_config(overrides=tiny_overrides(Path(data), Path(run), **{
        "model.image_encoder": "test_resnet", "model.image_encoder_kwargs": "{}", "train.test_at_end": False,
        "train.max_steps": 12, "data.batch_size": 4,
        **({"resume": "latest"} if mode == "resume" else {})}))
    result = train(cfg, stop=StopAfter(3) if mode == "stop" else StopRequest(install=False))
    assert result.preempted == (mode == "stop")


if __name__ == "__main__" and sys.argv[1] == "bn":
    _bn_rank(*sys.argv[2:])
elif __name__ == "__main__":  # one rank under torchrun
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
