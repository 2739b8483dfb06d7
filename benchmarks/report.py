"""The benchmark's report: ratios between figures of the same run, the Markdown table, the machine, the JSON."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


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


def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def table(res: dict) -> str:
    lines = ["| measure | value | unit |", "|---|---|---|"]
    names = {k: res.get(k, "?") for k in ("pipeline_workers", "matmul_dtype")}
    for key, label, unit in ROWS:
        if key in res:
            lines.append(f"| {label.format(**names)} | {fmt(res[key])} | {unit} |")
    for k, v in res.get("breakdown_ms_per_sample", {}).items():
        lines.append(f"| pipeline stage: {k} | {fmt(v)} | ms/sample |")
    for name, r in res.get("scaling", {}).items():
        if "error" in r:
            lines.append(f"| scaling {name} | error (see JSON) | |")
        else:
            lines.append(f"| scaling {name}: samples/s, step, peak RSS/rank | {fmt(r['samples_s'])}, "
                         f"{fmt(r['step_ms'])} ms, {'/'.join(f'{m:.0f}' for m in r['peak_rss_mb_per_rank'])} MB | |")
    lines += _profile_rows(res)
    lines.append("| **ratio** | | |")
    for k, v in res.get("ratios", {}).items():
        lines.append(f"| {k} | {fmt(v)} | x |")
    return "\n".join(lines)


def _profile_rows(res: dict) -> list[str]:
    """The profile part's rows (benchmarks/step_profile.py)."""
    p = res.get("profile")
    if not p:
        return []
    where = "GPU" if p["device_name"] != "cpu" else "CPU"
    peak = (f"datasheet peak {fmt(p['peak_flop_s'])} FLOP/s ({p['peak_source']}), " if p.get("peak_flop_s")
            else "")
    lines = [f"| **profile ({where}, {p['device_name']}, {p['dtype']}, compiled={p['compiled']}, batch "
             f"{p['batch_size']})**: {peak}measured {p['matmul_dtype']} matmul {fmt(p['matmul_flop_s'])} FLOP/s | | |",
             "| component: wall / busy / host ms, GFLOP, FLOP/s, MFU vs matmul"
             + (" / vs peak" if p.get("peak_flop_s") else "") + " | | |"]
    for name, r in p["components"].items():
        mfu = fmt(r.get("mfu_vs_matmul")) + (f" / {fmt(r.get('mfu_vs_peak'))}" if p.get("peak_flop_s") else "")
        lines.append(f"| {name} | {fmt(r['wall_ms'])} / {fmt(r['busy_ms'])} / {fmt(r['host_ms'])} ms, "
                     f"{fmt(r['flops'] / 1e9)} GFLOP, {fmt(r.get('flop_s'))}, {mfu} | |")
    lines.append(f"| split step total (wall / host) | {fmt(p['split_step_ms'])} / {fmt(p['split_host_ms'])} | ms |")
    lines.append(f"| plain step: unprofiled wall / profiled wall / busy / host | {fmt(p['step_ms_unprofiled'])} / "
                 f"{fmt(p['step_ms_profiled'])} / {fmt(p['step_busy_ms'])} / {fmt(p['step_host_ms'])} | ms |")
    lines.append("| plain step FLOP/s, MFU vs matmul" + (" / vs peak" if p.get("peak_flop_s") else "")
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


def machine() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            out["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def clean(obj):
    """Floats to 4 decimals (or 4 significant digits past 1e4), through dicts and lists: a readable JSON."""
    if isinstance(obj, float):
        return round(obj, 4) if abs(obj) < 1e4 else float(f"{obj:.4e}")
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean(v) for v in obj]
    return obj


def write_json(path: str | Path, res: dict) -> None:
    """The result, rounded; atomically, since it is rewritten after every part while a reader may look."""
    from vkd_dist.fileio import atomic_write_text

    atomic_write_text(path, json.dumps(clean(res), indent=2))
