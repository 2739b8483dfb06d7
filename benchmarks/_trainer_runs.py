"""Running the real trainer (`vkd_dist.train.train`) for the benchmark and reading its throughput back.

Also the entry point of the scaling runs, one process per rank under torchrun (from the repository root):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m benchmarks._trainer_runs --out DIR [--in-memory N] key=value ...

Each rank writes DIR/rank<R>.json (peak memory); rank 0 also writes the trainer's samples/s and data-wait
fraction read back from the run's TensorBoard, warm-up window excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from dataclasses import replace
from pathlib import Path

from vkd_dist.config import Config


class MemoryStream:
    """The trainer's data stream (train(stream=...)) over batches already in memory: no decoding, no workers.
    Every epoch is the same batches."""

    def __init__(self, batches: list):
        self.batches, self.batches_per_epoch = batches, len(batches)

    def epoch(self, epoch: int, skip: int = 0):
        return iter(self.batches[skip:])


def take_batches(stream, n: int) -> list:
    """The first `n` batches of a stream, over as many epochs as that takes."""
    out, epoch = [], 0
    while len(out) < n:
        for batch in stream.epoch(epoch):
            out.append(batch)
            if len(out) == n:
                break
        epoch += 1
    return out


def memory_batches(cfg: Config, info, tokenizer, n: int, rank: int = 0, world: int = 1) -> list:
    """`n` batches of this rank's real training stream (in-process: no worker to outlive them)."""
    from vkd_dist.data.pipeline import train_loader

    data = replace(cfg.data, num_workers=0)
    return take_batches(train_loader(info, cfg.data.train_split, data, tokenizer, rank, world, cfg.train.seed), n)


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


def trainer_overrides(run_dir: Path, steps: int, log_every: int, threads: int) -> list[str]:
    """Measure-only overrides: no mid-run eval or checkpoint, no test pass; `threads` CPU threads per process,
    stated, so the trainer runs on the threads its comparison runs on (train.cpu_threads auto would decide)."""
    return [f"run_dir={run_dir}", f"train.max_steps={steps}", f"logging.log_every={log_every}",
            f"train.eval_every={10 ** 9}", f"train.ckpt_every={10 ** 9}", "train.test_at_end=false",
            "train.eval_max_batches=1", "optim.warmup_steps=0",  # warm-up no longer than the measured run
            f"train.cpu_threads={threads}"]


def train_on(cfg: Config, batches: list | None = None) -> None:
    """Train as configured: on `batches`, cycled, when given; else with the real loader."""
    from vkd_dist.train import StopRequest, train

    # install=False: the benchmark's process keeps its own signal handlers
    train(cfg, StopRequest(install=False), stream=MemoryStream(batches) if batches else None)


def run_trainer(cfg: Config, batches: list | None = None) -> dict:
    """`train_on`, then the run's throughput (one process: rank 0 logs)."""
    train_on(cfg, batches)
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
    from vkd_dist.configure import load_config
    from vkd_dist.data.schema import read_dataset
    from vkd_dist.prepare import resolve_tokenizer

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    batches = None
    if args.in_memory:  # the benchmark names the tokenizer (model.tokenizer): every rank only loads it
        info = read_dataset(cfg.data.path)
        batches = memory_batches(cfg, info, resolve_tokenizer(cfg, info), args.in_memory, rank, world)
    train_on(cfg, batches)
    result = {"rank": rank, "world": world, **peak_memory_mb()}
    if rank == 0:
        result.update(read_throughput(Path(cfg.run_dir)))
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
