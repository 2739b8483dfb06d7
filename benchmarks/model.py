"""The model parts: `model_step` (the bare loop on in-memory batches), `trainer` (the real trainer on the same
batches), `end_to_end` (the real trainer with its real loader) and `mfu` (FLOPs per sample against the dense
matmul rate measured in the same run)."""

from __future__ import annotations

import time

from benchmarks._trainer_runs import memory_batches, run_trainer, trainer_overrides
from benchmarks.bench import Bench, best, timed_rate
from vkd_dist.config import Config

N_BATCHES = 8  # in-memory batches every model part cycles over


def in_memory_batches(b: Bench) -> list:
    """The run's first training batches, loaded once and shared by every part."""
    if "batches" not in b.results:
        b.results["batches"] = memory_batches(b.cfg, b.info, b.tokenizer, N_BATCHES)
    return b.results["batches"]


def model_and_step(b: Bench, cfg: Config | None = None, vocab: int | None = None, channels_last: bool = False):
    """(model, objective, step(batch, i)) for the configured model: a bare loop, no Accelerate, no trainer."""
    import torch

    from vkd_dist.build import build_model
    from vkd_dist.data.augment import BatchAugment
    from vkd_dist.distributed import mark_text_length_dynamic
    from vkd_dist.objectives import build_objective
    from vkd_dist.optim import build_optimizer

    cfg = cfg or b.cfg
    augment = BatchAugment(cfg.data, cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, vocab or len(b.tokenizer)).to(b.device)
    if b.cuda and channels_last:  # the model step alone only: the trainer does not (yet) set it
        model = model.to(memory_format=torch.channels_last)
    objective = build_objective(cfg.objective, cfg.model.num_samples)
    optimizer = build_optimizer(model, cfg)
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


def bare_loop_rate(b: Bench, n: int) -> float:
    """Samples/s of a fresh bare loop (the configured model) over the in-memory batches."""
    _, _, step = model_and_step(b)
    return timed_rate(b, step, in_memory_batches(b), n)


def measure_model_step(b: Bench) -> dict:
    batches = in_memory_batches(b)
    _, _, step = model_and_step(b, channels_last=True)
    rate = best(lambda: timed_rate(b, step, batches, b.n_steps), b.repeat)
    return {"model_step_samples_s": rate, "model_step_ms": 1e3 * b.batch / rate, "bare_loop_samples_s": rate}


def _paired_with_trainer(b: Bench, name: str, in_memory: bool) -> tuple[float, dict]:
    """The bare loop and the trainer, interleaved (best of --repeat each), so both see the same machine load:
    (bare loop samples/s, the fastest trainer run's throughput). Trainer rate: its TensorBoard windows after
    the first; bare loop: after 2 warm-up steps."""
    import torch

    log_every = max(2, b.n_steps // 2)
    bare, fastest = 0.0, None
    for _ in range(b.repeat):
        bare = max(bare, bare_loop_rate(b, 2 * log_every))
        cfg = b.trainer_cfg(*trainer_overrides(b.workdir / f"{name}-{time.monotonic_ns()}", log_every * 3, log_every,
                                               torch.get_num_threads()))  # the bare loop's threads
        run = run_trainer(cfg, in_memory_batches(b) if in_memory else None)
        if fastest is None or run["samples_per_s"] > fastest["samples_per_s"]:
            fastest = run
    return bare, fastest


def measure_trainer(b: Bench) -> dict:
    """The real trainer fed the bare loop's in-memory batches, against the bare loop."""
    bare, run = _paired_with_trainer(b, "trainer", in_memory=True)
    return {"trainer_samples_s": run["samples_per_s"], "trainer_step_ms": 1e3 * b.batch / run["samples_per_s"],
            "trainer_bare_loop_samples_s": bare}


def measure_end_to_end(b: Bench) -> dict:
    """The real trainer with its real loader (data.num_workers workers), against the model step."""
    model_step, run = _paired_with_trainer(b, "e2e", in_memory=False)
    return {"end_to_end_samples_s": run["samples_per_s"], "end_to_end_data_wait_frac": run["data_wait_frac"],
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
    fastest = 0.0
    for _ in range(2):
        b.sync()
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(x, y)
        b.sync()
        fastest = max(fastest, 2 * n ** 3 * reps / (time.perf_counter() - start))
    return fastest


def eager_model(b: Bench, **kwargs):
    """(model, objective, step) as `model_and_step` makes them, never compiled (FLOP counting, the profile)."""
    b_compile, b.compile = b.compile, False
    try:
        return model_and_step(b, **kwargs)
    finally:
        b.compile = b_compile


def measure_mfu(b: Bench) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.profile_tools import register_cpu_sdpa_flops

    register_cpu_sdpa_flops()  # SDPA's CPU flash kernel (ViT attention, no dropout) counts too
    batch = in_memory_batches(b)[0].to(b.device)
    model, objective, _ = eager_model(b)
    counter = FlopCounterMode(display=False)
    with counter:
        objective(model, batch, 0)["loss"].backward()
    flops = counter.get_total_flops() / len(batch)
    del model
    # the matmul rate and the model step alternate (best of each), so that both see the same machine load
    mm, step_rate = 0.0, 0.0
    for _ in range(b.repeat):
        mm = max(mm, matmul_rate(b))
        step_rate = max(step_rate, bare_loop_rate(b, b.n_steps))
    return {"flops_per_sample": flops, "matmul_flop_s": mm, "matmul_dtype": "bf16" if b.cuda else "fp32",
            "mfu_model_step_samples_s": step_rate}
