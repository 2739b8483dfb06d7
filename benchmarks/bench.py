"""What every part of the throughput benchmark shares: the run's config, corpus, tokenizer and device
(`Bench`, made once by `setup`), and the timing helpers."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from vkd_dist.config import Config, overrides_from_yaml, save_config
from vkd_dist.configure import load_config

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"  # --quick: the tests' tiny run (tests/conftest.py tiny_overrides)
QUICK_EXTRA = ["data.num_workers=2"]  # the pipeline and end_to_end parts measure worker processes


class Bench:
    """What every part needs: config, data, tokenizer, device and sizes."""

    def __init__(self, args: argparse.Namespace, cfg: Config, info, tokenizer, workdir: Path, tokenizer_dir: Path):
        import torch

        self.args, self.cfg, self.info, self.tokenizer, self.workdir = args, cfg, info, tokenizer, workdir
        self.tokenizer_dir = tokenizer_dir
        self.quick, self.repeat = args.quick, args.repeat
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.compile = self.cuda and not args.no_compile
        self.urls = info.shards(cfg.data.train_split)
        self.batch = cfg.data.batch_size
        self.n_steps = 4 if self.quick else 20  # batches timed per measurement
        self.results: dict = {}  # what parts share within a run (the in-memory batches)

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def run_overrides(self) -> list[str]:
        """What every trainer run of the benchmark adds to the snapshot: this run's corpus and tokenizer."""
        return [f"data.path={self.info.root}", "data.build_synthetic=false", f"model.tokenizer={self.tokenizer_dir}"]

    def trainer_cfg(self, *extra: str) -> Config:
        """An in-process trainer config: the snapshot (it cannot drift), this run's data, the device's precision."""
        overrides = self.run_overrides()
        if self.cuda:
            overrides += ["train.mixed_precision=bf16"] + (["train.compile=true"] if self.compile else [])
        return load_config(self.args.config, overrides + list(extra))


def setup(args: argparse.Namespace, workdir: Path) -> Bench:
    """The run's config (snapshot in `workdir`, named in args.config from then on), corpus and tokenizer."""
    from vkd_dist.data.schema import read_dataset
    from vkd_dist.prepare import ensure_dataset, resolve_tokenizer, tokenizer_dir

    if args.quick and not args.data:  # seconds to build: the tiny corpus of the smoke test
        from vkd_dist.data.synthetic import build_synthetic

        build_synthetic(workdir / "data", 160, 8, 8, image_size=64, seed=1, samples_per_shard=32, workers=1,
                        progress=False)
        args.data = str(workdir / "data")
    quick = overrides_from_yaml(TINY_CONFIG) + QUICK_EXTRA if args.quick else []
    data = [f"data.path={args.data}"] if args.data else []
    cfg = load_config(args.config, quick + data + list(args.overrides))  # the command line's overrides win
    # one snapshot for every part and subprocess: a config file edited during the run cannot mix in
    save_config(cfg, workdir / "config.yaml")
    args.config_source, args.config = args.config or "configs/default.yaml", str(workdir / "config.yaml")
    info = read_dataset(args.data) if args.data else ensure_dataset(cfg)
    # the trainer's own choice of tokenizer, built once here and named explicitly to every trainer run
    bench_cfg = replace(cfg, run_dir=str(workdir))
    tokenizer = resolve_tokenizer(bench_cfg, info)
    return Bench(args, cfg, info, tokenizer, workdir, tokenizer_dir(bench_cfg, workdir))


def best(fn: Callable[[], float], repeat: int) -> float:
    """Best (highest) rate of `repeat` calls."""
    return max(fn() for _ in range(repeat))


@contextmanager
def one_thread():
    """Torch on one intra-op thread inside: the per-core figures."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def epoch_rates(epochs, batch_size: Callable = len) -> list[float]:
    """Samples/s of each whole epoch: shuffle-buffer fill and drain included, as a training run pays them."""
    rates = []
    for batches in epochs:
        samples, start = 0, time.perf_counter()
        for batch in batches:
            samples += batch_size(batch)
        rates.append(samples / (time.perf_counter() - start))
    return rates


def timed_rate(b: Bench, step: Callable, batches: list, n: int, warmup: int = 2) -> float:
    """Samples/s of `n` calls of step(batch, i) cycling over `batches`, after `warmup` untimed ones."""
    for i in range(warmup):
        step(batches[i % len(batches)], i)
    b.sync()
    start = time.perf_counter()
    samples = 0
    for i in range(n):
        batch = batches[i % len(batches)]
        step(batch, i)
        samples += len(batch)
    b.sync()
    return samples / (time.perf_counter() - start)
