"""Helpers for benchmarks/throughput.py: run the real trainer (`vkd_dist.train.train`) and read its throughput.

Also the entry point of the scaling runs, one process per rank under torchrun:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/_trainer_runs.py --out DIR [--in-memory] key=value ...

Each rank writes DIR/rank<R>.json (peak memory); rank 0 also writes the trainer's samples/s and data-wait
fraction read back from the run's TensorBoard, warm-up window excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class MemoryStream:
    """A TrainStream look-alike that cycles over batches already in memory (no decoding, no workers)."""

    def __init__(self, batches: list):
        self.batches, self.batches_per_epoch, self.workers = batches, len(batches), 1

    def epoch(self, epoch: int, skip_batches: int = 0):
        return iter(self.batches[skip_batches:])

    def __len__(self) -> int:
        return self.batches_per_epoch


def take_batches(stream, n: int) -> list:
    out, epoch = [], 0
    while len(out) < n:
        for batch in stream.epoch(epoch):
            out.append(batch)
            if len(out) == n:
                break
        epoch += 1
    return out


@contextmanager
def in_memory_loader(n_batches: int):
    """Make the trainer's `train_loader` pre-load `n_batches` of its real stream, then serve them from memory."""
    import vkd_dist.train as train_mod
    from vkd_dist.data.pipeline import train_loader

    def loader(*args, **kwargs):
        stream = train_loader(*args, **kwargs)
        batches = take_batches(stream, n_batches)
        del stream
        return MemoryStream(batches)

    with mock.patch.object(train_mod, "train_loader", loader):
        yield


def read_throughput(run_dir: Path) -> dict:
    """samples/s (harmonic mean = total samples / total time) and data-wait fraction over the logged
    windows after the first (the first holds start-up: worker spawn, first batch, lazy init)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    sps = [e.value for e in acc.Scalars("train/samples_per_s")]
    wait = [e.value for e in acc.Scalars("train/data_wait_frac")]
    if len(sps) < 2:
        raise RuntimeError(f"{run_dir}: need at least 2 logged windows, got {len(sps)}")
    sps, wait = sps[1:], wait[1:]
    time_w = [1.0 / s for s in sps]  # every window has the same number of steps: its time is ~ 1/rate
    return {"samples_per_s": len(sps) / sum(time_w),
            "data_wait_frac": sum(w * t for w, t in zip(wait, time_w)) / sum(time_w),
            "windows": len(sps)}


def trainer_overrides(run_dir: Path, steps: int, log_every: int) -> list[str]:
    """Measure-only overrides: no mid-run eval or checkpoint, no test pass."""
    return [f"run_dir={run_dir}", f"train.max_steps={steps}", f"logging.log_every={log_every}",
            f"train.eval_every={10 ** 9}", f"train.ckpt_every={10 ** 9}", "train.test_at_end=false",
            "train.eval_max_batches=1"]


def run_trainer(cfg, in_memory_batches: int = 0) -> dict:
    from vkd_dist.train import StopRequest, train

    if in_memory_batches:
        with in_memory_loader(in_memory_batches):
            train(cfg, StopRequest(install=False))
    else:
        train(cfg, StopRequest(install=False))
    return read_throughput(Path(cfg.run_dir))


def peak_memory_mb() -> dict:
    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config")
    ap.add_argument("--out", required=True)
    ap.add_argument("--in-memory", type=int, default=0, help="pre-load this many batches per rank")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    from vkd_dist.config import load_config
    from vkd_dist.train import StopRequest, train

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    if args.in_memory:
        with in_memory_loader(args.in_memory):
            train(cfg, StopRequest(install=False))
    else:
        train(cfg, StopRequest(install=False))
    result = {"rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1")), **peak_memory_mb()}
    if rank == 0:
        result.update(read_throughput(Path(cfg.run_dir)))
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
