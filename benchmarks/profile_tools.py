"""Tools of the `profile` part (benchmarks/step_profile.py), each usable on its own: the datasheet peaks, FLOP
counting of the CPU SDPA kernel, the heads' view of the model (where the split step cuts), reading a Chrome
trace into per-range wall / busy / host times, and the AdamW and attention implementation comparisons."""

from __future__ import annotations

import copy
import gzip
import json
import statistics
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.bench import Bench
    from vkd_dist.config import Config

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


def union_ms(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
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
            r["busy_ms"] += union_ms(busy, lo, hi)
    for r in ranges.values():
        r["wall_ms"] /= r["n"]
        r["busy_ms"] /= r["n"]
        r["host_ms"] = max(0.0, r["wall_ms"] - r["busy_ms"])
    return ranges


def median_ms(fn, n: int, sync) -> float:
    times = []
    for _ in range(n):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def optimizer_impl_ms(model, cfg: Config, sync, n: int) -> dict:
    """Median AdamW step (+ zero_grad) time of each implementation on the model's trainable parameters with
    random gradients; the implementations take turns, so that they see the same machine load."""
    import torch

    from vkd_dist.optim import build_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    opts = {}
    for impl in ("fused", "foreach", "single_tensor"):
        try:
            opts[impl] = build_optimizer(model, cfg, implementation=impl)
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
            times[impl].append(median_ms(partial(step, opts[impl]), 1, sync))
    with torch.no_grad():  # the benchmark's model goes on as it was
        for p, s in zip(params, saved):
            p.copy_(s)
    out = {impl: statistics.median(t) for impl, t in times.items()}
    out.update({impl: v for impl, v in opts.items() if isinstance(v, str)})
    return out


def text_attention_ms(b: Bench, model, batches: list, n: int) -> dict:
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
    for e in encoders.values():
        run(e, device_batches[0])
    for i in range(n):
        for k, e in encoders.items():
            times[k].append(median_ms(partial(run, e, device_batches[i % len(device_batches)]), 1, b.sync))
    for e in encoders.values():
        e.zero_grad(set_to_none=True)
    del alt
    return {k: statistics.median(t) for k, t in times.items()}


def image_attention(model) -> str:
    import timm.layers

    enc = getattr(model, "image_encoder", None)
    flags = {m.fused_attn for m in (enc.modules() if enc is not None else ()) if hasattr(m, "fused_attn")}
    if not flags:
        return "none (no attention layers)"
    if flags == {True}:
        return "fused (F.scaled_dot_product_attention)"
    return (f"eager in some layers (fused_attn {sorted(flags)}; "
            f"timm.layers.use_fused_attn()={timm.layers.use_fused_attn()})")
