"""The `profile` part of benchmarks/throughput.py: where one training step's time goes, per component.

    python benchmarks/throughput.py --only profile --json p.json                     # CPU, default config
    python benchmarks/throughput.py --only profile --device cuda --json p.json ...   # bf16 (+ compile)

The benchmark's own step is split into components, each inside a `torch.profiler.record_function` range
("vkd/split/<component>") and followed by a device sync, so that each component's kernels run inside its range:

  augment            batch to the device + the batch-wise augmentation
  image_encoder.fwd  the image encoder's forward              image_encoder.bwd  its backward
  text_encoder.fwd   the text encoder's forward               text_encoder.bwd   its backward
  heads_loss.fwd     prior/posterior heads, samples, classifier and loss, from the encoders' (detached) features
  heads_loss.bwd     their backward, down to the encoders' features
  grad_clip          clip_grad_norm_                          optimizer.step     AdamW step + zero_grad

The split step computes the same gradients as the plain step (the chain rule cut at the encoders' outputs); the
plain step ("vkd/step", one sync at its end) is profiled after it, so the syncs' cost can be read off too. The
plain step is compiled when the run compiles (CUDA without --no-compile); the split step stays eager unless
--profile-compile-split (the encoders compiled on their own: two more compiles).

For each range: wall time; busy time (CUDA: the union of kernel/memcpy/memset intervals inside it; CPU: the union
of the aten ops' intervals, i.e. the op time); host overhead = wall - busy (on the GPU: time the GPU sat idle
waiting for the host; on the CPU: Python and dispatch between ops). FLOPs per component from
torch.utils.flop_counter.FlopCounterMode (one counter per component, over one eager step), and the FLOP rate
against the peak: on CUDA the datasheet dense-bf16 peak of the device (profile_tools.PEAK_BF16, or --peak-tflops)
and the dense matmul rate measured in this run; on the CPU the measured matmul rate only.

Also: the AdamW step time of each implementation (fused / foreach / single_tensor) on the model's parameters,
the text encoder's forward+backward with SDPA against eager attention (same weights, same batches), the
padding fraction of the text batches, and whether timm's ViT attention is the fused (SDPA) one.
The Chrome trace is written next to the --json output (<json stem>.trace.json.gz; open in Perfetto or
chrome://tracing) and its path recorded in the JSON. Its rows of the table: benchmarks/report.py.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from pathlib import Path

from benchmarks import profile_tools as tools
from benchmarks.bench import Bench
from benchmarks.model import eager_model, in_memory_batches, matmul_rate, model_and_step

COMPONENTS = ("augment", "image_encoder.fwd", "text_encoder.fwd", "heads_loss.fwd", "heads_loss.bwd",
              "text_encoder.bwd", "image_encoder.bwd", "grad_clip", "optimizer.step")


class SplitStep:
    """The step cut at the encoders' outputs, each component in its own profiler range followed by a sync;
    `wall` collects each component's ms per call, `flops` its FLOPs from the last counted call."""

    def __init__(self, b: Bench, model, objective):
        import torch

        from vkd_dist.data.augment import BatchAugment
        from vkd_dist.optim import build_optimizer

        self.b, self.model, self.objective = b, model, objective
        self.augment = BatchAugment(b.cfg.data, b.cfg.train.seed)
        self.optimizer = build_optimizer(model, b.cfg)
        self.view, self.feeds = tools.heads_view(model)
        self.run_image = model.image_encoder is not None and objective.needs_image()
        self.run_text = model.text_encoder is not None and objective.needs_text()
        self.compiled = b.compile and getattr(b.args, "profile_compile_split", False)
        compile_ = torch.compile if self.compiled else (lambda m: m)  # two more compiles: minutes on a GPU
        self.encoders = {"image_encoder": compile_(model.image_encoder) if self.run_image else None,
                         "text_encoder": compile_(model.text_encoder) if self.run_text else None}
        self.wall: dict = {}
        self.flops: dict = {}

    @contextmanager
    def phase(self, name: str, count: bool = False):
        from torch.profiler import record_function
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False) if count else None
        start = time.perf_counter()
        with record_function(tools.SPLIT + name):
            if counter is not None:
                with counter:
                    yield
            else:
                yield
            self.b.sync()
        self.wall.setdefault(name, []).append(1e3 * (time.perf_counter() - start))
        if counter is not None:
            self.flops[name] = counter.get_total_flops()

    def __call__(self, batch, i: int, count: bool = False) -> None:
        """One step; `count`: eager encoders under a FLOP counter per component."""
        import torch

        from vkd_dist.distributed import mark_text_length_dynamic

        b, model = self.b, self.model
        autocast = lambda: torch.autocast(b.device.type, dtype=torch.bfloat16, enabled=b.cuda)  # noqa: E731
        encoders = {k: getattr(model, k) for k in self.encoders} if count else self.encoders
        with self.phase("augment"):
            batch = self.augment(batch.to(b.device), i)
            if self.compiled:
                mark_text_length_dynamic(batch)
        feats = {}
        if self.run_image:
            with self.phase("image_encoder.fwd", count), autocast():
                feats["image_encoder"] = encoders["image_encoder"](batch.image)
        if self.run_text and batch.text_features is None:
            with self.phase("text_encoder.fwd", count), autocast():
                feats["text_encoder"] = encoders["text_encoder"](batch.input_ids, batch.attention_mask)
        cut = {k: v.detach().requires_grad_() for k, v in feats.items()}
        for k, v in cut.items():
            self.feeds[k].value = v
        with self.phase("heads_loss.fwd", count), autocast():
            loss = self.objective(self.view, batch, i)["loss"]
        with self.phase("heads_loss.bwd", count):
            loss.backward()
        for k in ("text_encoder", "image_encoder"):
            if k in feats and feats[k].requires_grad:  # a frozen text encoder has no backward
                with self.phase(f"{k}.bwd", count):
                    feats[k].backward(cut[k].grad)
        for feed in self.feeds.values():
            feed.value = None
        with self.phase("grad_clip"):
            if b.cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), b.cfg.optim.grad_clip)
        with self.phase("optimizer.step"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def _trace(b: Bench, split: SplitStep, plain_step, batches: list, n: int) -> Path:
    """Profile `n` split steps then `n` plain ones; the Chrome trace goes next to --json."""
    from torch.profiler import ProfilerActivity, profile, record_function

    trace = Path(b.args.json).with_suffix("") if b.args.json else Path("step_profile")
    trace = trace.with_name(trace.name + ".trace.json.gz")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.cuda else [])
    with profile(activities=activities) as prof:
        for i in range(n):
            split(batches[i % len(batches)], i)
        for i in range(n):
            with record_function(tools.STEP):
                plain_step(batches[i % len(batches)], i)
                b.sync()
    trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    return trace


def _components(ranges: dict, flops: dict, unprofiled: dict, matmul: float, peak: float | None) -> dict:
    components = {}
    for name in COMPONENTS:
        r = ranges.get(tools.SPLIT + name)
        if r is None:
            continue
        f = flops.get(name, 0)
        row = {"wall_ms": r["wall_ms"], "busy_ms": r["busy_ms"], "host_ms": r["host_ms"],
               "wall_ms_unprofiled": unprofiled.get(name), "flops": f}
        if f:
            row["flop_s"] = f / (r["wall_ms"] / 1e3)
            row["mfu_vs_matmul"] = row["flop_s"] / matmul
            if peak:
                row["mfu_vs_peak"] = row["flop_s"] / peak
        components[name] = row
    return components


def measure_profile(b: Bench) -> dict:
    """The profile part."""
    import torch

    from vkd_dist.models.encoders import attention_implementation

    tools.register_cpu_sdpa_flops()
    n_time = 3 if b.quick else 8
    batches = in_memory_batches(b)
    # The plain step as the model_step part runs it (compiled on CUDA unless --no-compile).
    plain_model, _, plain_step = model_and_step(b, channels_last=True)
    for i in range(2):
        plain_step(batches[i % len(batches)], i)
    step_ms = tools.median_ms(lambda: plain_step(batches[0], 0), n_time, b.sync)

    # The split step: an eager model (its encoders compiled on their own with --profile-compile-split).
    model, objective, _ = eager_model(b, channels_last=True)
    split = SplitStep(b, model, objective)
    split(batches[0], 0, count=True)  # eager: the FLOPs of each component (also a warm-up)
    for i in range(2):
        split(batches[i % len(batches)], i)
    split.wall.clear()
    for i in range(n_time):
        split(batches[i % len(batches)], i)
    split_wall = {k: statistics.median(v) for k, v in split.wall.items()}
    trace = _trace(b, split, plain_step, batches, n=2)
    ranges = tools.trace_breakdown(trace, b.cuda)

    # peaks: the measured matmul rate always; the datasheet peak on CUDA
    matmul = matmul_rate(b)
    peak, peak_source = (tools.datasheet_peak(torch.cuda.get_device_name(), b.args.peak_tflops) if b.cuda
                         else (None, "none on the CPU: the measured matmul rate only"))
    components = _components(ranges, split.flops, split_wall, matmul, peak)
    total_flops = sum(split.flops.values())
    step_row = ranges.get(tools.STEP, {})
    pad = [1.0 - float(x.attention_mask.float().mean()) for x in batches]
    samples = len(batches[0])
    run_text = split.run_text
    out = {
        "device_name": torch.cuda.get_device_name() if b.cuda else "cpu",
        "compiled": bool(b.compile), "split_compiled": bool(split.compiled),
        "dtype": "bf16 autocast" if b.cuda else "fp32", "batch_size": samples, "trace": str(trace.resolve()),
        "peak_flop_s": peak, "peak_source": peak_source, "matmul_flop_s": matmul,
        "matmul_dtype": "bf16" if b.cuda else "fp32",
        "components": components,
        "split_step_ms": sum(r["wall_ms"] for r in components.values()),
        "split_host_ms": sum(r["host_ms"] for r in components.values()),
        "step_ms_unprofiled": step_ms,
        "step_ms_profiled": step_row.get("wall_ms"), "step_busy_ms": step_row.get("busy_ms"),
        "step_host_ms": step_row.get("host_ms"),
        "step_busy_frac": step_row["busy_ms"] / step_row["wall_ms"] if step_row.get("wall_ms") else None,
        "flops_per_step": total_flops, "flops_per_sample": total_flops / samples,
        "step_flop_s": total_flops / (step_ms / 1e3),
        "step_mfu_vs_matmul": total_flops / (step_ms / 1e3) / matmul,
        "step_mfu_vs_peak": total_flops / (step_ms / 1e3) / peak if peak else None,
        "text_attn_implementation": attention_implementation(model.text_encoder.model) if run_text else None,
        "image_attention": tools.image_attention(model),
        "text_pad_fraction": statistics.mean(pad) if run_text else None,
        "text_padded_len": sorted({int(x.input_ids.shape[1]) for x in batches}) if run_text else None,
        "optimizer_impl_ms": tools.optimizer_impl_ms(model, b.cfg, b.sync, n_time),
        "text_fwd_bwd_ms_by_attention": tools.text_attention_ms(b, model, batches, n_time) if run_text else {},
    }
    if b.cuda:
        out["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    del plain_model, model, split
    return {"profile": out}
