"""Training throughput stage by stage, against ceilings and a peer, on the same shards in one run.

    python benchmarks/throughput.py --json bench.json                       # default config, synthetic corpus
    python benchmarks/throughput.py --config F --data DIR --device cuda --json bench.json
    python benchmarks/throughput.py --quick --json q.json                   # tiny sizes (the smoke test)
    python benchmarks/throughput.py --only decode,pipeline,open_clip        # a subset

Parts (`--only` names), each a function returning a dict, assembled into one JSON object:
  decode      the raw ceiling: read the shard tars + decode JPEG to uint8 grayscale, one core
  pipeline    our training stream (decode, tokenise, batch; the augmentation runs batch-wise on the device,
              in the step): in-process (one worker, one thread) and with data.num_workers worker processes;
              plus a per-sample cost breakdown, including the device augmentation
  open_clip   the peer: open_clip_train.data.get_wds_dataset on the same shards, with the same tokenizer
              (padding to max_text_len) and equivalent transforms in its workers, as open_clip is used
              (affine + brightness/contrast, grayscale uint8); and without the augmentation (the same work
              as our workers)
  model_step  device augmentation + forward + backward + clip + AdamW on batches already in memory: a bare
              PyTorch loop with the configured model, objective and optimizer, nothing of the trainer (also
              "the bare loop")
  trainer     the real trainer (vkd_dist.train.train) fed the same in-memory batches: its step against the
              bare loop; samples/s read from its TensorBoard, warm-up window excluded
  end_to_end  the real trainer with its real loader: samples/s and data-wait fraction
  mfu         FLOPs per sample (torch.utils.flop_counter, one fwd+bwd) x samples/s / dense matmul rate
              measured on the same device in this run
  frozen_text the model step with a BERT-base-sized live text encoder (random init, seq max_text_len) against
              the same step given precomputed text features (VKDModel.posterior(text_features=...))
  profile     torch.profiler over the benchmark's own step split into components (image/text encoder fwd/bwd,
              heads+loss, clip, optimizer): wall / busy / host ms, FLOPs and MFU per component, the Chrome
              trace next to --json (benchmarks/step_profile.py)
  scaling     1 vs 2 processes (OMP_NUM_THREADS=1 each, torchrun, in-memory batches): weak-scaling
              efficiency; DDP vs DeepSpeed ZeRO-2 vs ZeRO-3 step time and peak memory per rank
Every figure is a rate measured in this run; ratios are taken between figures of the same run, so that a
shared, noisy machine still gives comparable numbers. Timing parts run `--repeat` times, interleaved, best
kept. On CUDA (`--device cuda`) the model parts use bf16 autocast, channels_last and torch.compile
(`--no-compile` to skip).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

PARTS = ("decode", "pipeline", "open_clip", "model_step", "trainer", "end_to_end", "mfu", "frozen_text", "profile",
         "scaling")
QUICK = {  # a seconds-long configuration (cf. tests/conftest.py tiny_overrides)
    "data.image_size": 64, "data.batch_size": 8, "data.num_workers": 2, "data.shuffle_buffer": 16,
    "model.image_encoder": "vit_small_patch16_224",
    "model.image_encoder_kwargs": "{depth: 1, embed_dim: 48, num_heads: 2, patch_size: 16}",
    "model.text_config": "{hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 128}",
    "model.vocab_size": 400, "model.latent_dim": 16, "model.hidden_dim": 32, "model.num_samples": 2,
    "data.max_text_len": 64,
}
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


class Bench:
    """What every part needs: config, data, tokenizer, device and sizes."""

    def __init__(self, args, cfg, info, tokenizer, workdir: Path, tokenizer_dir: Path):
        import torch

        self.args, self.cfg, self.info, self.tokenizer, self.workdir = args, cfg, info, tokenizer, workdir
        self.tokenizer_dir = tokenizer_dir
        self.quick, self.repeat = args.quick, args.repeat
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.compile = self.cuda and not args.no_compile
        self.urls = info.shards(cfg.data.train_split)
        self.batch = cfg.data.batch_size
        # sizes: batches timed per measurement
        self.n_steps = 4 if self.quick else 20
        self.results: dict = {}

    def sync(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()


def _best(fn, repeat: int) -> float:
    """Best (highest) rate of `repeat` calls."""
    return max(fn() for _ in range(repeat))


def _one_thread():
    import torch

    class _Ctx:
        def __enter__(self):
            self.n = torch.get_num_threads()
            torch.set_num_threads(1)

        def __exit__(self, *exc):
            torch.set_num_threads(self.n)

    return _Ctx()


# ------------------------------------------------------------------------------------------------ data
def _labels_and_patient(raw_json: bytes) -> dict:
    meta = json.loads(raw_json)
    return {"labels": meta["labels"], "patient_id": meta["patient_id"]}


def measure_decode(b: Bench) -> dict:
    """Read the tar members and decode each image to uint8 grayscale: nothing else. One core."""
    from vkd_dist.data.schema import decode_image

    limit = 200 if b.quick else 2000

    def once() -> float:
        n, start = 0, time.perf_counter()
        for data in itertools.islice(_image_members(b.urls), limit):
            decode_image(data)
            n += 1
        return n / (time.perf_counter() - start)

    with _one_thread():
        rate = _best(once, b.repeat)
    return {"decode_img_s_per_core": rate}


def _image_members(urls) -> Iterator[bytes]:
    """The ceiling's read: each tar opened for random access, only the image members' bytes extracted."""
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                if member.name.endswith((".jpg", ".png")):
                    yield tar.extractfile(member).read()


def _epoch_rates(epochs, batch_size=len) -> list[float]:
    """Samples/s of each whole epoch: shuffle-buffer fill and drain included, as a training run pays them."""
    rates = []
    for batches in epochs:
        samples, start = 0, time.perf_counter()
        for batch in batches:
            samples += batch_size(batch)
        rates.append(samples / (time.perf_counter() - start))
    return rates


def _bench_epoch_samples(b: Bench) -> int:
    return min(b.info.num_samples(b.cfg.data.train_split), 20_000)  # a virtual epoch on a large corpus


def measure_pipeline(b: Bench) -> dict:
    """Our train_loader as the trainer runs it (with the run's token table, built here and timed), whole
    epochs: in-process (= one worker, one thread), first epoch and second; with data.num_workers worker
    processes (second epoch: workers already started); and in-process without the token table (reports
    tokenised in the loader, cached per worker from the second epoch)."""
    from dataclasses import replace

    from vkd_dist.data.pipeline import train_loader
    from vkd_dist.data.tokens import build_token_table

    split, workers = b.cfg.data.train_split, max(1, b.cfg.data.num_workers)
    start = time.perf_counter()
    tokens = build_token_table(b.workdir / "tokens", split, b.info.shards(split), b.tokenizer, b.cfg.data.max_text_len)
    build_s = time.perf_counter() - start

    def rates(num_workers: int, table=tokens) -> list[float]:
        cfg = replace(b.cfg.data, num_workers=num_workers, samples_per_epoch=_bench_epoch_samples(b))
        stream = train_loader(b.info, split, cfg, b.tokenizer, seed=b.cfg.train.seed, tokens=table)
        return _epoch_rates(stream.epoch(e) for e in range(2))

    with _one_thread():
        in_process = [rates(0) for _ in range(b.repeat)]
        untabled = [rates(0, None) for _ in range(b.repeat)]
    n_workers = max(rates(workers)[1] for _ in range(b.repeat))
    return {"pipeline_samples_s_per_worker": max(r[0] for r in in_process),
            "pipeline_samples_s_per_worker_epoch2": max(r[1] for r in in_process),
            "pipeline_no_token_table_samples_s_per_worker": max(r[0] for r in untabled),
            "pipeline_no_token_table_samples_s_per_worker_epoch2": max(r[1] for r in untabled),
            "token_table_build_s": build_s, "token_table_reports_s": len(tokens) / build_s if tokens else None,
            "pipeline_workers": workers, "pipeline_samples_s_n_workers": n_workers, **_pipeline_breakdown(b, tokens)}


def _pipeline_breakdown(b: Bench, tokens) -> dict:
    """Per-sample cost of each stage of our pipeline, in-process: where the time of a sample goes; and the
    device-side batch augmentation that the training step adds."""
    import torch
    import webdataset as wds

    from vkd_dist.data.augment import BatchAugment
    from vkd_dist.data.pipeline import Collate
    from vkd_dist.data.schema import decode_image

    raws = []
    for raw in wds.DataPipeline(wds.SimpleShardList(b.urls[:1]), wds.tarfile_to_samples()):
        raws.append(raw)
        if len(raws) >= 4 * b.batch:
            break
    d = b.cfg.data

    def timed(name: str, fn, repeat: int = 3):
        """Runs fn `repeat` times, records its best ms per sample under `name`, returns its result."""
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - start)
        ms[name] = 1e3 * best / len(raws)
        return out

    def collate_all(collate):
        return [collate(samples[i:i + b.batch]) for i in range(0, len(samples), b.batch)]

    ms: dict = {}
    live = Collate(b.tokenizer, d.max_text_len, d.uncertain, d.missing)
    tabled = Collate(b.tokenizer, d.max_text_len, d.uncertain, d.missing, tokens=tokens)
    for collate in (live, tabled):  # once per worker, not per sample: the tokenizer backend
        collate._token_ids([], [])

    def read_ms(members) -> float:
        start, n = time.perf_counter(), sum(1 for _ in members)
        return 1e3 * (time.perf_counter() - start) / max(1, n)

    with _one_thread():
        ms["tar read, image members only (the ceiling's)"] = min(
            read_ms(_image_members(b.urls[:1])) for _ in range(3))
        ms["tar read, webdataset, every member"] = min(
            read_ms(wds.DataPipeline(wds.SimpleShardList(b.urls[:1]), wds.tarfile_to_samples())) for _ in range(3))
        images = timed("decode", lambda: [decode_image(r["jpg"]) for r in raws])
        samples = timed("json_text", lambda: [
            {"key": r["__key__"], "image": o, "text": r["txt"].decode(), **_labels_and_patient(r["json"])}
            for r, o in zip(raws, images)])
        batches = timed("collate, token table", lambda: collate_all(tabled))
        timed("collate, no table, tokenising", lambda: collate_all(live), repeat=1)
        timed("collate, no table, per-worker cache", lambda: collate_all(live))  # the same reports again
        timed("tokenizer __call__ alone", lambda: [
            b.tokenizer([s["text"] for s in samples[i:i + b.batch]], padding="longest", truncation=True,
                        max_length=d.max_text_len, pad_to_multiple_of=8, return_tensors="pt")
            for i in range(0, len(samples), b.batch)])
    augment = BatchAugment(d, b.cfg.train.seed)
    on_device = [batch.to(b.device) for batch in batches]
    augment(on_device[0], 0)

    def augment_all():
        for i, batch in enumerate(on_device):
            augment(batch, i)
        b.sync()

    timed(f"batch augment on {b.device.type} ({torch.get_num_threads()} threads)", augment_all, repeat=1)
    return {"breakdown_ms_per_sample": ms}


def measure_open_clip(b: Bench) -> dict:
    """open_clip's WebDataset training pipeline (open-clip-torch 3.3.0) on the same shards, in-process."""
    from types import SimpleNamespace

    from torchvision import transforms as T

    try:
        import open_clip_train.data as oc_data
    except ImportError as exc:
        return {"open_clip_error": f"{type(exc).__name__}: {exc} (pip install -e '.[bench]')"}
    _shim_open_clip(oc_data)
    d = b.cfg.data
    size = d.image_size
    resize = T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR)
    augment = [T.RandomAffine(degrees=d.max_rotate_deg, translate=(d.max_translate, d.max_translate),
                              scale=(1 - d.scale_range, 1 + d.scale_range), interpolation=T.InterpolationMode.BILINEAR),
               T.ColorJitter(brightness=d.brightness, contrast=d.contrast)]
    to_tensor = [T.Grayscale(1), T.PILToTensor()]  # uint8 [1, S, S], like ours
    tok = b.tokenizer

    def tokenize(text):  # open_clip's HFTokenizer behaviour: pad to the context length
        return tok([text], padding="max_length", truncation=True, max_length=d.max_text_len,
                   return_tensors="pt")["input_ids"]

    def rate(preprocess) -> float:
        """In-process, whole epochs like ours; its second epoch (nothing is cached, so the same as its first)."""
        args = SimpleNamespace(train_data="::".join(b.urls), val_data=None, train_num_samples=_bench_epoch_samples(b),
                               dataset_resampled=False, train_data_upsampling_factors=None, seed=b.cfg.train.seed,
                               batch_size=b.batch, workers=0, world_size=1)
        data = oc_data.get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenize)

        def epoch(e: int):
            data.set_epoch(e)
            return data.dataloader

        return _epoch_rates((epoch(e) for e in range(2)), lambda batch: len(batch[0]))[1]

    # As open_clip is used: augmentation in its workers. Same work as ours: augmentation left to the device.
    with_augment, same_work = T.Compose([resize, *augment, *to_tensor]), T.Compose([resize, *to_tensor])
    with _one_thread():
        per_worker = _best(lambda: rate(with_augment), b.repeat)
        per_worker_same_work = _best(lambda: rate(same_work), b.repeat)
    return {"open_clip_samples_s_per_worker": per_worker,
            "open_clip_no_augment_samples_s_per_worker": per_worker_same_work,
            "open_clip_version": _version("open-clip-torch")}


def _shim_open_clip(oc_data) -> None:
    """open-clip-torch 3.3.0 + webdataset 1.0.x: webdataset's tar_file_expander now yields an end-of-shard
    marker `{}` that open_clip's group_by_keys_nothrow cannot take (KeyError: 'fname' at the end of the first
    shard). Drop the marker (eof_value=None, the old behaviour); the per-sample work is unchanged."""
    import functools

    from webdataset.tariterators import tar_file_expander

    if not isinstance(oc_data.tar_file_expander, functools.partial):
        oc_data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


# ----------------------------------------------------------------------------------------------- model
def _in_memory_batches(b: Bench, n: int) -> list:
    if "batches" not in b.results:
        from dataclasses import replace

        from _trainer_runs import take_batches
        from vkd_dist.data.pipeline import train_loader

        stream = train_loader(b.info, b.cfg.data.train_split, replace(b.cfg.data, num_workers=0), b.tokenizer,
                              seed=b.cfg.train.seed)
        b.results["batches"] = take_batches(stream, n)
    return b.results["batches"]


def _model_and_step(b: Bench, cfg=None, vocab=None, channels_last: bool = False):
    """(model, step(batch, i)) for the configured model: a bare loop, no Accelerate, no trainer."""
    import torch

    from vkd_dist.data.augment import BatchAugment
    from vkd_dist.distributed import mark_text_length_dynamic
    from vkd_dist.models.build import build_model
    from vkd_dist.objectives import Objective
    from vkd_dist.train import _optimizer

    cfg = cfg or b.cfg
    augment = BatchAugment(cfg.data, cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, vocab or len(b.tokenizer)).to(b.device)
    if b.cuda and channels_last:  # the model step alone only: the trainer does not (yet) set it
        model = model.to(memory_format=torch.channels_last)
    objective = Objective(cfg.objective, cfg.model.num_samples)
    optimizer = _optimizer(model, cfg)
    fwd = torch.compile(model) if b.compile else model
    model.train()
    clip = cfg.optim.grad_clip

    def step(batch, i: int):
        batch = augment(batch.to(b.device), i)  # part of the step, as in the trainer
        if b.compile:  # as the trainer does: one graph, no recompile inside the timed window
            mark_text_length_dynamic(batch)
        with torch.autocast(b.device.type, dtype=torch.bfloat16, enabled=b.cuda):
            loss = objective(fwd, batch, i)["loss"]
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return model, objective, step


def _step_rate(b: Bench, step, batches: list, n: int, warmup: int = 2) -> float:
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


def measure_model_step(b: Bench) -> dict:
    batches = _in_memory_batches(b, 8)
    _, _, step = _model_and_step(b, channels_last=True)
    rate = _best(lambda: _step_rate(b, step, batches, b.n_steps), b.repeat)
    return {"model_step_samples_s": rate, "model_step_ms": 1e3 * b.batch / rate,
            "bare_loop_samples_s": rate}


def _trainer_cfg(b: Bench, name: str, steps: int, log_every: int, extra=()):
    from _trainer_runs import trainer_overrides

    from vkd_dist.config import load_config

    overrides = list(b.args.overrides) + b.args.quick_overrides + trainer_overrides(b.workdir / name, steps, log_every)
    if b.cuda:
        overrides += ["train.mixed_precision=bf16"] + (["train.compile=true"] if b.compile else [])
    overrides += [f"data.path={b.info.root}", "data.build_synthetic=false",
                  f"model.tokenizer={b.tokenizer_dir}"] + list(extra)
    return load_config(b.args.config, overrides)


def measure_trainer(b: Bench) -> dict:
    """The real trainer on in-memory batches against the bare loop on the same batches, interleaved (best of
    --repeat each), so that both see the same machine load. Trainer rate: its TensorBoard windows after the
    first; bare loop: after 2 warm-up steps."""
    from _trainer_runs import run_trainer

    log_every = max(2, b.n_steps // 2)
    batches = _in_memory_batches(b, 8)
    trainer, bare = 0.0, 0.0
    for _ in range(b.repeat):
        _, _, step = _model_and_step(b)
        bare = max(bare, _step_rate(b, step, batches, 2 * log_every))
        del step
        cfg = _trainer_cfg(b, f"trainer-{time.monotonic_ns()}", log_every * 3, log_every)
        trainer = max(trainer, run_trainer(cfg, in_memory_batches=8)["samples_per_s"])
    return {"trainer_samples_s": trainer, "trainer_step_ms": 1e3 * b.batch / trainer,
            "trainer_bare_loop_samples_s": bare}


def measure_end_to_end(b: Bench) -> dict:
    """The real trainer with its real loader (data.num_workers workers), interleaved with the model step on
    in-memory batches (best of --repeat each)."""
    from _trainer_runs import run_trainer

    log_every = max(2, b.n_steps // 2)
    batches = _in_memory_batches(b, 8)
    best, model_step = None, 0.0
    for _ in range(b.repeat):
        _, _, step = _model_and_step(b)
        model_step = max(model_step, _step_rate(b, step, batches, 2 * log_every))
        del step
        cfg = _trainer_cfg(b, f"e2e-{time.monotonic_ns()}", log_every * 3, log_every)
        r = run_trainer(cfg)
        if best is None or r["samples_per_s"] > best["samples_per_s"]:
            best = r
    return {"end_to_end_samples_s": best["samples_per_s"], "end_to_end_data_wait_frac": best["data_wait_frac"],
            "end_to_end_model_step_samples_s": model_step}


def matmul_rate(b: Bench) -> float:
    """Dense matmul FLOP/s on this device (fp32 on CPU, bf16 on CUDA), best of a few."""
    import torch

    n = 512 if b.quick else (8192 if b.cuda else 2048)
    dtype = torch.bfloat16 if b.cuda else torch.float32
    x = torch.randn(n, n, device=b.device, dtype=dtype)
    y = torch.randn(n, n, device=b.device, dtype=dtype)
    torch.mm(x, y)
    reps = 20 if b.cuda else 3
    best = 0.0
    for _ in range(2):
        b.sync()
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(x, y)
        b.sync()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start))
    return best


def measure_mfu(b: Bench) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import step_profile

    step_profile.register_cpu_sdpa_flops()  # SDPA's CPU flash kernel (ViT attention, no dropout) counts too
    batches = _in_memory_batches(b, 8)
    b_compile, b.compile = b.compile, False  # count FLOPs eagerly
    model, objective, _ = _model_and_step(b)
    b.compile = b_compile
    batch = batches[0].to(b.device)
    counter = FlopCounterMode(display=False)
    with counter:
        objective(model, batch, 0)["loss"].backward()
    flops = counter.get_total_flops() / len(batch)
    del model
    # the matmul rate and the model step alternate (best of each), so that both see the same machine load
    mm, step_rate = 0.0, 0.0
    for _ in range(b.repeat):
        mm = max(mm, matmul_rate(b))
        _, _, step = _model_and_step(b)
        step_rate = max(step_rate, _step_rate(b, step, batches, b.n_steps))
        del step
    return {"flops_per_sample": flops, "matmul_flop_s": mm, "matmul_dtype": "bf16" if b.cuda else "fp32",
            "mfu_model_step_samples_s": step_rate}


def measure_frozen_text(b: Bench) -> dict:
    """Model step with a live BERT-base-sized text encoder (frozen, and trainable) vs precomputed features."""
    import torch

    from vkd_dist.config import load_config
    from vkd_dist.data.pipeline import Batch
    text_config = dict(QUICK_TEXT) if b.quick else dict(BERT_BASE)
    vocab = 400 if b.quick else 30522  # BERT-base's vocabulary: its embedding is part of the cost
    seq = b.cfg.data.max_text_len
    bs = b.batch if b.cuda else 4  # BERT-base steps on a CPU core take seconds: a small batch there
    cfg = _trainer_cfg(b, "frozen-text", 1, 1, [f"model.text_config={json.dumps(text_config)}"])
    g = torch.Generator().manual_seed(0)
    base = _in_memory_batches(b, 8)[0]

    def batch(with_features: int = 0):
        return Batch(image=base.image[:bs], input_ids=torch.randint(5, vocab, (bs, seq), generator=g),
                     attention_mask=torch.ones(bs, seq, dtype=torch.long), targets=base.targets[:bs],
                     target_mask=base.target_mask[:bs],
                     text_features=torch.randn(bs, with_features, generator=g) if with_features else None)

    n = 10 if b.cuda else (3 if b.quick else 2)
    rates = {}
    for kind in ("live_trainable", "live_frozen"):
        cfg.model.freeze_text = kind == "live_frozen"
        _, _, step = _model_and_step(b, cfg, vocab)
        batches = [batch() for _ in range(2)]
        rates[kind] = _best(lambda: _step_rate(b, step, batches, n, warmup=1), 1)
        del step
    dim = text_config["hidden_size"]
    cfg.model.freeze_text = False
    cfg.data.text_features = None
    # the fast path: no text encoder, features of the frozen encoder arrive with the batch
    import vkd_dist.models.build as build_mod
    real = build_mod.build_text_encoder
    build_mod.build_text_encoder = lambda m, v: _FeatureStub(dim)
    try:
        _, _, step = _model_and_step(b, cfg)
    finally:
        build_mod.build_text_encoder = real
    batches = [batch(dim) for _ in range(2)]
    rates["fast_path"] = _best(lambda: _step_rate(b, step, batches, max(n, 10), warmup=2), b.repeat)
    have_cli = (REPO / "vkd_dist" / "data" / "text_features.py").is_file()
    return {"frozen_text_encoder": f"BERT {text_config} vocab {vocab}, seq {seq}, batch {bs}, random init",
            "frozen_text_how": "model step, text_features= precomputed tensor (not via vkd-data embed-text)"
            + ("" if have_cli else "; data.text_features not in the tree when measured"),
            "live_trainable_samples_s": rates["live_trainable"], "live_frozen_samples_s": rates["live_frozen"],
            "fast_path_samples_s": rates["fast_path"]}


QUICK_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


class _FeatureStub:
    """Stands in for a text encoder that never runs: only its output width matters (the posterior head's
    input), the model's forward takes batch.text_features instead. Not an nn.Module, so it adds no weights."""

    def __init__(self, dim: int):
        self.out_dim = dim


# --------------------------------------------------------------------------------------------- scaling
def measure_scaling(b: Bench) -> dict:
    """1 vs 2 processes, one thread each (torchrun, in-memory batches); DDP vs ZeRO-2 vs ZeRO-3."""
    steps = 6 if b.quick else 16
    log_every = 2 if b.quick else 4
    out: dict = {}
    runs = [("1proc", 1, None), ("ddp_2proc", 2, None)]
    if not b.quick:
        runs += [("zero2_2proc", 2, 2), ("zero3_2proc", 2, 3)]
    for name, nproc, stage in runs:
        res_dir = b.workdir / f"scaling-{name}"
        cfg_over = list(b.args.overrides) + b.args.quick_overrides + [
            f"data.path={b.info.root}", "data.build_synthetic=false", f"model.tokenizer={b.tokenizer_dir}",
            "data.num_workers=0", "logging.progress=false"]
        from _trainer_runs import trainer_overrides

        cfg_over += trainer_overrides(res_dir / "run", steps, log_every)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
        env.pop("ACCELERATE_USE_DEEPSPEED", None)
        if stage is not None:
            env.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE=str(stage))
        script = [str(REPO / "benchmarks" / "_trainer_runs.py"), "--out", str(res_dir), "--in-memory", "4"]
        if b.args.config:
            script += ["--config", b.args.config]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--master_port", str(_free_port())]
        start = time.perf_counter()
        for attempt in range(2):  # one retry: a gloo/DeepSpeed start-up race on a loaded machine is not a figure
            proc = subprocess.run(torchrun + script + cfg_over, env=env, capture_output=True, text=True,
                                  timeout=b.args.scaling_timeout)
            if proc.returncode == 0:
                break
            torchrun[-1] = str(_free_port())
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            text = proc.stderr or proc.stdout
            errors = [line for line in text.splitlines() if "Error" in line or "error:" in line][-8:]
            out[name] = {"error": "\n".join(errors) + "\n...\n" + text[-800:], "wall_s": wall}
            continue
        ranks = [json.loads((res_dir / f"rank{r}.json").read_text()) for r in range(nproc)]
        sps = ranks[0]["samples_per_s"]
        out[name] = {"processes": nproc, "zero_stage": stage, "samples_s": sps,
                     "step_ms": 1e3 * b.batch * nproc / sps, "data_wait_frac": ranks[0]["data_wait_frac"],
                     "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in ranks],
                     **({"peak_cuda_mb_per_rank": [r["peak_cuda_mb"] for r in ranks]} if "peak_cuda_mb" in ranks[0] else {}),
                     "wall_s": wall}
    return {"scaling": out}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- report
def measure_profile(b: Bench) -> dict:
    import step_profile

    return step_profile.measure(b, sys.modules[__name__])


MEASURES = {"decode": measure_decode, "pipeline": measure_pipeline, "open_clip": measure_open_clip,
            "model_step": measure_model_step, "trainer": measure_trainer, "end_to_end": measure_end_to_end,
            "mfu": measure_mfu, "frozen_text": measure_frozen_text, "profile": measure_profile,
            "scaling": measure_scaling}


def _ratio(res: dict, a: str, b: str):
    return res[a] / res[b] if a in res and b in res and res[b] else None


def ratios(res: dict) -> dict:
    out = {
        "pipeline_vs_decode": _ratio(res, "pipeline_samples_s_per_worker", "decode_img_s_per_core"),
        "pipeline_epoch2_vs_decode": _ratio(res, "pipeline_samples_s_per_worker_epoch2", "decode_img_s_per_core"),
        "pipeline_vs_open_clip": _ratio(res, "pipeline_samples_s_per_worker", "open_clip_samples_s_per_worker"),
        "pipeline_vs_open_clip_no_augment": _ratio(res, "pipeline_samples_s_per_worker",
                                                   "open_clip_no_augment_samples_s_per_worker"),
        "pipeline_n_workers_vs_one": _ratio(res, "pipeline_samples_s_n_workers", "pipeline_samples_s_per_worker"),
        "trainer_vs_bare_loop": _ratio(res, "trainer_samples_s", "trainer_bare_loop_samples_s"),
        "end_to_end_vs_model_step": _ratio(res, "end_to_end_samples_s", "end_to_end_model_step_samples_s"),
        "frozen_text_vs_live": _ratio(res, "fast_path_samples_s", "live_frozen_samples_s"),
        "frozen_text_vs_live_trainable": _ratio(res, "fast_path_samples_s", "live_trainable_samples_s"),
        "mfu": None, "mfu_model_step": None,
    }
    if "flops_per_sample" in res:
        for key, rate in (("mfu", "end_to_end_samples_s"), ("mfu_model_step", "mfu_model_step_samples_s")):
            if rate in res:
                out[key] = res["flops_per_sample"] * res[rate] / res["matmul_flop_s"]
                if res.get("peak_flop_s"):  # CUDA: also against the device's datasheet dense-bf16 peak
                    out[key + "_vs_datasheet_peak"] = res["flops_per_sample"] * res[rate] / res["peak_flop_s"]
    sc = res.get("scaling", {})
    one, two = sc.get("1proc", {}).get("samples_s"), sc.get("ddp_2proc", {}).get("samples_s")
    out["weak_scaling_efficiency_2proc"] = two / (2 * one) if one and two else None
    return {k: v for k, v in out.items() if v is not None or k in ("mfu",)}


ROWS = [  # (key, label, unit)
    ("decode_img_s_per_core", "decode ceiling: read + decode only, 1 core", "img/s"),
    ("pipeline_samples_s_per_worker", "our pipeline, 1 worker (in-process, 1 thread)", "samples/s"),
    ("pipeline_samples_s_per_worker_epoch2", "our pipeline, 1 worker, 2nd epoch", "samples/s"),
    ("pipeline_samples_s_n_workers", "our pipeline, {pipeline_workers} workers", "samples/s"),
    ("pipeline_no_token_table_samples_s_per_worker", "our pipeline without the token table, 1 worker", "samples/s"),
    ("pipeline_no_token_table_samples_s_per_worker_epoch2", "... 2nd epoch (per-worker token cache warm)", "samples/s"),
    ("token_table_reports_s", "token table build (run start; Rust tokenizer on all cores)", "reports/s"),
    ("open_clip_samples_s_per_worker", "open_clip get_wds_dataset, 1 worker, augmenting in the worker", "samples/s"),
    ("open_clip_no_augment_samples_s_per_worker", "open_clip get_wds_dataset, 1 worker, no augmentation", "samples/s"),
    ("model_step_samples_s", "model step alone = bare loop, in-memory batches", "samples/s"),
    ("trainer_bare_loop_samples_s", "bare loop, interleaved with the trainer run", "samples/s"),
    ("trainer_samples_s", "our trainer, same in-memory batches", "samples/s"),
    ("end_to_end_model_step_samples_s", "model step, interleaved with the end-to-end run", "samples/s"),
    ("end_to_end_samples_s", "end-to-end training (real loader)", "samples/s"),
    ("end_to_end_data_wait_frac", "end-to-end data-wait fraction", ""),
    ("flops_per_sample", "FLOPs per sample (fwd+bwd)", "FLOP"),
    ("matmul_flop_s", "dense matmul rate ({matmul_dtype})", "FLOP/s"),
    ("live_trainable_samples_s", "BERT-base text, live + trainable", "samples/s"),
    ("live_frozen_samples_s", "BERT-base text, live + frozen", "samples/s"),
    ("fast_path_samples_s", "frozen-text fast path (precomputed features)", "samples/s"),
]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def table(res: dict) -> str:
    lines = ["| measure | value | unit |", "|---|---|---|"]
    for key, label, unit in ROWS:
        if key in res:
            lines.append(f"| {label.format(**{k: res.get(k, '?') for k in ('pipeline_workers', 'matmul_dtype')})} "
                         f"| {_fmt(res[key])} | {unit} |")
    for k, v in res.get("breakdown_ms_per_sample", {}).items():
        lines.append(f"| pipeline stage: {k} | {_fmt(v)} | ms/sample |")
    for name, r in res.get("scaling", {}).items():
        if "error" in r:
            lines.append(f"| scaling {name} | error (see JSON) | |")
        else:
            lines.append(f"| scaling {name}: samples/s, step, peak RSS/rank | {_fmt(r['samples_s'])}, "
                         f"{_fmt(r['step_ms'])} ms, {'/'.join(f'{m:.0f}' for m in r['peak_rss_mb_per_rank'])} MB | |")
    import step_profile

    lines += step_profile.table_rows(res)
    lines.append("| **ratio** | | |")
    for k, v in res.get("ratios", {}).items():
        lines.append(f"| {k} | {_fmt(v) if v is not None else 'n/a'} | x |")
    return "\n".join(lines)


def machine() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    try:
        out["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", help="trainer YAML (default: configs/default.yaml)")
    ap.add_argument("--data", help="shard directory with dataset.json (default: the config's synthetic corpus)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--quick", action="store_true", help="tiny corpus and model (seconds; the smoke test)")
    ap.add_argument("--repeat", type=int, default=None, help="best of this many interleaved runs (default 2; quick 1)")
    ap.add_argument("--no-compile", action="store_true", help="CUDA: skip torch.compile")
    ap.add_argument("--peak-tflops", type=float, help="CUDA: dense bf16 peak TFLOP/s for MFU (default: the "
                    "datasheet figure of the device, benchmarks/step_profile.py PEAK_BF16)")
    ap.add_argument("--profile-compile-split", action="store_true", help="profile part, CUDA: compile the image "
                    "and text encoders of the split step too (default: the split step is eager)")
    ap.add_argument("--scaling-timeout", type=int, default=400, help="seconds per scaling launch")
    ap.add_argument("--threads", type=int, help="torch intra-op threads of this process (default: torch's)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (runs, tokenizer)")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = ap.parse_args(argv)
    parts = PARTS if not args.only else tuple(p.strip() for p in args.only.split(",") if p.strip())
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.repeat = args.repeat or (1 if args.quick else 2)
    args.quick_overrides = [f"{k}={v}" for k, v in QUICK.items()] if args.quick else []

    import torch  # (after CUDA_VISIBLE_DEVICES)

    if args.threads:
        torch.set_num_threads(args.threads)

    from dataclasses import replace

    from vkd_dist.config import load_config
    from vkd_dist.data.schema import read_dataset
    from vkd_dist.prepare import ensure_dataset, resolve_tokenizer, tokenizer_dir

    workdir = Path(tempfile.mkdtemp(prefix="vkd-bench-throughput-"))
    t_start = time.perf_counter()
    try:
        cfg = load_config(args.config, list(args.overrides) + args.quick_overrides)
        # one snapshot for every part and subprocess: a config file edited during the run cannot mix in
        from vkd_dist.config import save_config

        save_config(cfg, workdir / "config.yaml")
        args.config_source, args.config = args.config or "configs/default.yaml", str(workdir / "config.yaml")
        if args.data:
            info = read_dataset(args.data)
        elif args.quick:
            from vkd_dist.data.synthetic import build_synthetic

            build_synthetic(workdir / "data", 160, 8, 8, image_size=64, seed=1, samples_per_shard=32, workers=1,
                            progress=False)
            info = read_dataset(workdir / "data")
        else:
            info = ensure_dataset(cfg)
        # the trainer's own choice of tokenizer, built once here and named explicitly to every trainer run
        bench_cfg = replace(cfg, run_dir=str(workdir))
        tokenizer = resolve_tokenizer(bench_cfg, info)
        b = Bench(args, cfg, info, tokenizer, workdir, tokenizer_dir(bench_cfg, workdir))
        res: dict = {"machine": machine(), "device": args.device, "compile": b.compile, "quick": args.quick,
                     "repeat": args.repeat,
                     "config": args.config_source, "overrides": list(args.overrides),
                     "model": {"image_encoder": cfg.model.image_encoder, "text_encoder": cfg.model.text_encoder,
                               "text_config": cfg.model.text_config},
                     "data": str(info.root), "batch_size": cfg.data.batch_size, "image_size": cfg.data.image_size,
                     "max_text_len": cfg.data.max_text_len, "parts": list(parts), "seconds": {}}
        if b.cuda:  # MFU against the datasheet peak too (ratios: *_vs_datasheet_peak)
            import step_profile

            res["peak_flop_s"], res["peak_source"] = step_profile.datasheet_peak(torch.cuda.get_device_name(),
                                                                                 args.peak_tflops)
        for part in parts:
            t0 = time.perf_counter()
            try:
                res.update(MEASURES[part](b))
            except Exception as exc:  # the other parts still run: one failure must not lose a whole run
                import traceback

                traceback.print_exc()
                res.setdefault("errors", {})[part] = f"{type(exc).__name__}: {exc}"[:2000]
            res["seconds"][part] = round(time.perf_counter() - t0, 1)
            print(f"[throughput] {part}: {res['seconds'][part]} s", file=sys.stderr, flush=True)
            if args.json:  # what is done so far survives a run that is killed later
                Path(args.json).write_text(json.dumps(_clean(res), indent=2))
        res["ratios"] = ratios(res)
        res["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
    finally:
        if args.keep:
            print(f"[throughput] work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    res = _clean(res)
    print(json.dumps(res, indent=2))
    print()
    print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if res.get("errors"):
        print(f"[throughput] failed parts: {', '.join(res['errors'])}", file=sys.stderr)
        return 1
    return 0


def _clean(obj):
    if isinstance(obj, float):
        return round(obj, 4) if abs(obj) < 1e4 else float(f"{obj:.4e}")
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


if __name__ == "__main__":
    sys.exit(main())
