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
against the peak: on CUDA the datasheet dense-bf16 peak of the device (PEAK_BF16 below, or --peak-tflops) and the
dense matmul rate measured in this run; on the CPU the measured matmul rate only.

Also: the AdamW step time of each implementation (fused / foreach / single_tensor) on the model's parameters,
the text encoder's forward+backward with SDPA against eager attention (same weights, same batches), the
padding fraction of the text batches, and whether timm's ViT attention is the fused (SDPA) one.
The Chrome trace is written next to the --json output (<json stem>.trace.json.gz; open in Perfetto or
chrome://tracing) and its path recorded in the JSON.
"""

from __future__ import annotations

import copy
import gzip
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

COMPONENTS = ("augment", "image_encoder.fwd", "text_encoder.fwd", "heads_loss.fwd", "heads_loss.bwd",
              "text_encoder.bwd", "image_encoder.bwd", "grad_clip", "optimizer.step")
SPLIT, STEP = "vkd/split/", "vkd/step"
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, FLOP/s; the first name contained in
# torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_BF16 = (("H200 NVL", 835e12), ("H200", 989e12), ("GH200", 989e12), ("H100 NVL", 835e12),
             ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12),
             ("L40S", 362e12))
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def datasheet_peak(device_name: str, override_tflops: float | None = None) -> tuple[float | None, str]:
    """(dense bf16 peak FLOP/s, where it came from) for a CUDA device name; (None, why) when unknown."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    for key, peak in PEAK_BF16:
        if key.lower() in device_name.lower():
            return peak, f"datasheet dense bf16, {key}"
    return None, f"unknown device {device_name!r}: pass --peak-tflops"


def register_cpu_sdpa_flops() -> None:
    """torch.utils.flop_counter counts the CUDA SDPA kernels (flash, efficient, cudnn) but not the CPU flash
    kernel that SDPA runs without dropout (eval mode, a frozen encoder): count it with the same formulas, so
    that SDPA and eager attention count the same FLOPs on the CPU too. Before any FlopCounterMode is made."""
    import torch
    from torch.utils import flop_counter

    aten, registry = torch.ops.aten, flop_counter.flop_registry
    for cpu_op, like in ((aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention),
                         (aten._scaled_dot_product_flash_attention_for_cpu_backward,
                          aten._scaled_dot_product_flash_attention_backward)):
        if cpu_op not in registry and like in registry:  # same argument order: (grad_out,) query, key, value
            registry[cpu_op] = registry[like]


class _Feed:
    """Stands in for an encoder inside the heads' view of the model: returns the features it was given."""

    def __init__(self, out_dim: int):
        self.out_dim, self.value = out_dim, None

    def __call__(self, *args, **kwargs):
        return self.value


def heads_view(model):
    """A shallow copy of the VKDModel whose encoders return precomputed features: the heads and classifier
    (shared parameters) run on them, so the heads' forward and backward can be timed on their own."""
    view = copy.copy(model)
    view.__dict__["_modules"] = dict(model._modules)
    feeds = {}
    for name in ("image_encoder", "text_encoder"):
        if getattr(model, name) is not None:
            feeds[name] = _Feed(getattr(model, name).out_dim)
            del view._modules[name]
            view.__dict__[name] = feeds[name]
    return view, feeds


def _union_ms(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length (ms) of the union of [start, end) intervals (us) clipped to [lo, hi]."""
    clipped = sorted((max(s, lo), min(e, hi)) for s, e in intervals if e > lo and s < hi)
    total, cur_s, cur_e = 0.0, None, None
    for s, e in clipped:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total / 1e3


def trace_breakdown(trace_path: Path, cuda: bool) -> dict:
    """Per range name: occurrences, mean wall ms, mean busy ms (device intervals on CUDA, aten-op intervals on
    the CPU), read from the exported Chrome trace."""
    opener = gzip.open if str(trace_path).endswith(".gz") else open
    with opener(trace_path, "rt") as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    busy_cats = DEVICE_CATS if cuda else ("cpu_op",)
    busy = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events if e.get("cat") in busy_cats]
    ranges: dict = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") == "user_annotation" and (name.startswith(SPLIT) or name == STEP):
            lo, hi = float(e["ts"]), float(e["ts"]) + float(e["dur"])
            r = ranges.setdefault(name, {"n": 0, "wall_ms": 0.0, "busy_ms": 0.0})
            r["n"] += 1
            r["wall_ms"] += (hi - lo) / 1e3
            r["busy_ms"] += _union_ms(busy, lo, hi)
    for r in ranges.values():
        r["wall_ms"] /= r["n"]
        r["busy_ms"] /= r["n"]
        r["host_ms"] = max(0.0, r["wall_ms"] - r["busy_ms"])
    return ranges


def _median_ms(fn, n: int, sync) -> float:
    times = []
    for _ in range(n):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def optimizer_impl_ms(model, cfg, sync, n: int) -> dict:
    """Median AdamW step (+ zero_grad) time of each implementation on the model's trainable parameters with
    random gradients; the implementations take turns, so that they see the same machine load."""
    import torch

    from vkd_dist.train import _optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    opts = {}
    for impl in ("fused", "foreach", "single_tensor"):
        try:
            opts[impl] = _optimizer(model, cfg, implementation=impl)
        except (RuntimeError, ValueError) as exc:  # e.g. fused on a device without the kernel
            opts[impl] = f"{type(exc).__name__}: {exc}"[:200]

    def step(opt):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)

    times: dict = {k: [] for k, v in opts.items() if not isinstance(v, str)}
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
    for impl in times:  # state initialisation and first-call costs stay out of the timings
        step(opts[impl])
        step(opts[impl])
    for _ in range(n):
        for impl in times:
            times[impl].append(_median_ms(lambda: step(opts[impl]), 1, sync))
    with torch.no_grad():  # the benchmark's model goes on as it was
        for p, s in zip(params, saved):
            p.copy_(s)
    out = {impl: statistics.median(t) for impl, t in times.items()}
    out.update({impl: v for impl, v in opts.items() if isinstance(v, str)})
    return out


def text_attention_ms(b, model, batches, n: int) -> dict:
    """Median forward+backward time of the text encoder with SDPA and with eager attention, same weights."""
    import torch

    from vkd_dist.models.encoders import attention_implementation, build_text_encoder

    enc = model.text_encoder
    if enc is None or not hasattr(enc, "model") or not hasattr(enc.model, "config"):
        return {}
    have = attention_implementation(enc.model)
    other = "eager" if have != "eager" else "sdpa"
    cfg = copy.deepcopy(b.cfg.model)
    cfg.attn_implementation = other
    if cfg.text_encoder == "tiny-bert":
        alt = build_text_encoder(cfg, enc.model.config.vocab_size)
    else:
        alt = build_text_encoder(cfg, len(b.tokenizer))
    alt.load_state_dict(enc.state_dict())
    alt = alt.to(b.device).train(enc.training)
    encoders = {have: enc, attention_implementation(alt.model): alt}
    device_batches = [x.to(b.device) for x in batches[:2]]

    def run(e, batch):  # forward + backward as the step runs it (forward alone when frozen)
        with torch.autocast(b.device.type, dtype=torch.bfloat16, enabled=b.cuda):
            out = e(batch.input_ids, batch.attention_mask)
        if out.requires_grad:
            out.float().sum().backward()

    times: dict = {k: [] for k in encoders}
    for k, e in encoders.items():
        run(e, device_batches[0])
    for i in range(n):
        for k, e in encoders.items():
            times[k].append(_median_ms(lambda: run(e, device_batches[i % len(device_batches)]), 1, b.sync))
    for e in encoders.values():
        e.zero_grad(set_to_none=True)
    del alt
    return {k: statistics.median(t) for k, t in times.items()}


def _image_attention(model) -> str:
    import timm.layers

    enc = getattr(model, "image_encoder", None)
    flags = {getattr(m, "fused_attn") for m in (enc.modules() if enc is not None else ()) if hasattr(m, "fused_attn")}
    if not flags:
        return "none (no attention layers)"
    if flags == {True}:
        return "fused (F.scaled_dot_product_attention)"
    return f"eager in some layers (fused_attn {sorted(flags)}; timm.layers.use_fused_attn()={timm.layers.use_fused_attn()})"


def measure(b, tp) -> dict:
    """The profile part. `b`: throughput.Bench; `tp`: the throughput module (its batch and model helpers)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    from torch.utils.flop_counter import FlopCounterMode

    from vkd_dist.models.encoders import attention_implementation

    register_cpu_sdpa_flops()
    n_time = 3 if b.quick else 8
    n_prof = 2
    batches = tp._in_memory_batches(b, 8)
    # The plain step as the model_step part runs it (compiled on CUDA unless --no-compile).
    plain_model, _, plain_step = tp._model_and_step(b, channels_last=True)
    for i in range(2):
        plain_step(batches[i % len(batches)], i)
    step_ms = _median_ms(lambda: plain_step(batches[0], 0), n_time, b.sync)

    # The split step: an eager model (its encoders compiled on their own with --profile-compile-split).
    b_compile, b.compile = b.compile, False
    try:
        model, objective, _ = tp._model_and_step(b, channels_last=True)
    finally:
        b.compile = b_compile
    from vkd_dist.data.augment import BatchAugment
    from vkd_dist.distributed import mark_text_length_dynamic
    from vkd_dist.train import _optimizer

    cfg = b.cfg
    augment = BatchAugment(cfg.data, cfg.train.seed)
    optimizer = _optimizer(model, cfg)
    view, feeds = heads_view(model)
    image_enc, text_enc = model.image_encoder, model.text_encoder
    run_image = image_enc is not None and objective.mode in ("vkd", "image")
    run_text = text_enc is not None and objective.mode in ("vkd", "text")
    compile_split = b.compile and getattr(b.args, "profile_compile_split", False)
    if compile_split:  # two more compiles: minutes on a GPU, so only when asked
        image_fwd = torch.compile(image_enc) if run_image else None
        text_fwd = torch.compile(text_enc) if run_text else None
    else:
        image_fwd, text_fwd = image_enc, text_enc
    clip = cfg.optim.grad_clip
    autocast = lambda: torch.autocast(b.device.type, dtype=torch.bfloat16, enabled=b.cuda)  # noqa: E731
    wall: dict = {}
    flops: dict = {}

    @contextmanager
    def phase(name: str, counter: bool = False):
        counting = FlopCounterMode(display=False) if counter else None
        start = time.perf_counter()
        with record_function(SPLIT + name):
            if counting is not None:
                with counting:
                    yield
            else:
                yield
            b.sync()
        wall.setdefault(name, []).append(1e3 * (time.perf_counter() - start))
        if counting is not None:
            flops[name] = counting.get_total_flops()

    def split_step(batch, i: int, count: bool = False):
        with phase("augment"):
            batch = augment(batch.to(b.device), i)
            if compile_split:
                mark_text_length_dynamic(batch)
        feats = {}
        if run_image:
            with phase("image_encoder.fwd", count), autocast():
                feats["image_encoder"] = (image_enc if count else image_fwd)(batch.image)
        if run_text and batch.text_features is None:
            with phase("text_encoder.fwd", count), autocast():
                feats["text_encoder"] = (text_enc if count else text_fwd)(batch.input_ids, batch.attention_mask)
        cut = {k: v.detach().requires_grad_() for k, v in feats.items()}
        for k, v in cut.items():
            feeds[k].value = v
        with phase("heads_loss.fwd", count), autocast():
            loss = objective(view, batch, i)["loss"]
        with phase("heads_loss.bwd", count):
            loss.backward()
        for k in ("text_encoder", "image_encoder"):
            if k in feats and feats[k].requires_grad:  # a frozen text encoder has no backward
                with phase(f"{k}.bwd", count):
                    feats[k].backward(cut[k].grad)
        for feed in feeds.values():
            feed.value = None
        with phase("grad_clip"):
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        with phase("optimizer.step"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    split_step(batches[0], 0, count=True)  # eager: the FLOPs of each component (also a warm-up)
    for i in range(2):
        split_step(batches[i % len(batches)], i)
    wall.clear()
    for i in range(n_time):
        split_step(batches[i % len(batches)], i)
    split_wall = {k: statistics.median(v) for k, v in wall.items()}

    trace = Path(b.args.json).with_suffix("") if b.args.json else Path("step_profile")
    trace = trace.with_name(trace.name + ".trace.json.gz")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.cuda else [])
    with profile(activities=activities) as prof:
        for i in range(n_prof):
            split_step(batches[i % len(batches)], i)
        for i in range(n_prof):
            with record_function(STEP):
                plain_step(batches[i % len(batches)], i)
                b.sync()
    trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    ranges = trace_breakdown(trace, b.cuda)

    # peaks: the measured matmul rate always; the datasheet peak on CUDA
    matmul = tp.matmul_rate(b)
    peak, peak_source = (datasheet_peak(torch.cuda.get_device_name(), b.args.peak_tflops) if b.cuda
                         else (None, "none on the CPU: the measured matmul rate only"))
    components = {}
    for name in COMPONENTS:
        r = ranges.get(SPLIT + name)
        if r is None:
            continue
        f = flops.get(name, 0)
        row = {"wall_ms": r["wall_ms"], "busy_ms": r["busy_ms"], "host_ms": r["host_ms"],
               "wall_ms_unprofiled": split_wall.get(name), "flops": f}
        if f:
            row["flop_s"] = f / (r["wall_ms"] / 1e3)
            row["mfu_vs_matmul"] = row["flop_s"] / matmul
            if peak:
                row["mfu_vs_peak"] = row["flop_s"] / peak
        components[name] = row
    total_flops = sum(flops.values())
    step_row = ranges.get(STEP, {})
    split_total = sum(r["wall_ms"] for r in components.values())
    pad = [1.0 - float(x.attention_mask.float().mean()) for x in batches]
    samples = len(batches[0])
    out = {
        "device_name": torch.cuda.get_device_name() if b.cuda else "cpu",
        "compiled": bool(b.compile), "split_compiled": bool(compile_split), "dtype": "bf16 autocast" if b.cuda else "fp32",
        "batch_size": samples, "trace": str(trace.resolve()),
        "peak_flop_s": peak, "peak_source": peak_source, "matmul_flop_s": matmul,
        "matmul_dtype": "bf16" if b.cuda else "fp32",
        "components": components,
        "split_step_ms": split_total,
        "split_host_ms": sum(r["host_ms"] for r in components.values()),
        "step_ms_unprofiled": step_ms,
        "step_ms_profiled": step_row.get("wall_ms"), "step_busy_ms": step_row.get("busy_ms"),
        "step_host_ms": step_row.get("host_ms"),
        "step_busy_frac": step_row["busy_ms"] / step_row["wall_ms"] if step_row.get("wall_ms") else None,
        "flops_per_step": total_flops, "flops_per_sample": total_flops / samples,
        "step_flop_s": total_flops / (step_ms / 1e3),
        "step_mfu_vs_matmul": total_flops / (step_ms / 1e3) / matmul,
        "step_mfu_vs_peak": total_flops / (step_ms / 1e3) / peak if peak else None,
        "text_attn_implementation": attention_implementation(text_enc.model) if run_text else None,
        "image_attention": _image_attention(model),
        "text_pad_fraction": statistics.mean(pad) if run_text else None,
        "text_padded_len": sorted({int(x.input_ids.shape[1]) for x in batches}) if run_text else None,
        "optimizer_impl_ms": optimizer_impl_ms(model, cfg, b.sync, n_time),
        "text_fwd_bwd_ms_by_attention": text_attention_ms(b, model, batches, n_time) if run_text else {},
    }
    if b.cuda:
        out["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    del plain_model, model, optimizer, view
    return {"profile": out}


def table_rows(res: dict) -> list[str]:
    """Markdown rows of the profile part for throughput.table()."""
    p = res.get("profile")
    if not p:
        return []
    fmt = lambda v: "n/a" if v is None else (f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}")  # noqa: E731
    where = "GPU" if p["device_name"] != "cpu" else "CPU"
    peak = (f"datasheet peak {fmt(p['peak_flop_s'])} FLOP/s ({p['peak_source']}), " if p.get("peak_flop_s")
            else "")
    lines = [f"| **profile ({where}, {p['device_name']}, {p['dtype']}, compiled={p['compiled']}, batch "
             f"{p['batch_size']})**: {peak}measured {p['matmul_dtype']} matmul {fmt(p['matmul_flop_s'])} FLOP/s | | |",
             "| component: wall / busy / host ms, GFLOP, FLOP/s, MFU vs matmul" + (" / vs peak" if p.get("peak_flop_s") else "")
             + " | | |"]
    for name, r in p["components"].items():
        mfu = fmt(r.get("mfu_vs_matmul")) + (f" / {fmt(r.get('mfu_vs_peak'))}" if p.get("peak_flop_s") else "")
        lines.append(f"| {name} | {fmt(r['wall_ms'])} / {fmt(r['busy_ms'])} / {fmt(r['host_ms'])} ms, "
                     f"{fmt(r['flops'] / 1e9)} GFLOP, {fmt(r.get('flop_s'))}, {mfu} | |")
    lines.append(f"| split step total (wall / host) | {fmt(p['split_step_ms'])} / {fmt(p['split_host_ms'])} | ms |")
    lines.append(f"| plain step: unprofiled wall / profiled wall / busy / host | {fmt(p['step_ms_unprofiled'])} / "
                 f"{fmt(p['step_ms_profiled'])} / {fmt(p['step_busy_ms'])} / {fmt(p['step_host_ms'])} | ms |")
    lines.append(f"| plain step FLOP/s, MFU vs matmul" + (" / vs peak" if p.get("peak_flop_s") else "")
                 + f" | {fmt(p['step_flop_s'])}, {fmt(p['step_mfu_vs_matmul'])}"
                 + (f" / {fmt(p['step_mfu_vs_peak'])}" if p.get("peak_flop_s") else "") + " | |")
    lines.append("| AdamW step: " + ", ".join(f"{k} {fmt(v) if not isinstance(v, str) else 'n/a'}"
                                              for k, v in p["optimizer_impl_ms"].items()) + " | | ms |")
    if p["text_fwd_bwd_ms_by_attention"]:
        lines.append("| text encoder fwd+bwd: " + ", ".join(f"{k} {fmt(v)}" for k, v in
                                                         p["text_fwd_bwd_ms_by_attention"].items()) + " | | ms |")
    lines.append(f"| attention: text {p['text_attn_implementation']}, image {p['image_attention']}; text padding "
                 f"{fmt(p['text_pad_fraction'])} of {p['text_padded_len']} tokens | | |")
    lines.append(f"| profiler trace | {p['trace']} | |")
    return lines
