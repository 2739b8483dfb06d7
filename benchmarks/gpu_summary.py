"""The last step of benchmarks/gpu_check.sh: one table of the figures issue 15 asks for, from the JSON files
the check wrote (eager.json, compiled.json, scaling.json) and its step log; also written as summary.json.

    python benchmarks/gpu_summary.py OUT_DIR [--steps STEPS_TSV] [--env ENV_JSON]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TARGETS = {  # issue 15, one H100/H200, bf16, the MIMIC recipe with random weights
    "mfu_model_step_vs_datasheet_peak": 0.40,  # compiled
    "trainer_vs_bare_loop": 0.95,
    "end_to_end_vs_model_step": 0.95,
}


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def run_figures(res: dict | None) -> dict:
    """The figures of one throughput run (eager or compiled) that the summary reports."""
    if not res:
        return {}
    r = res.get("ratios", {})
    p = res.get("profile", {})
    out = {
        "device": res.get("device"), "compiled": res.get("compile"),
        "model_step_samples_s": res.get("mfu_model_step_samples_s") or res.get("model_step_samples_s"),
        "flops_per_sample": res.get("flops_per_sample"),
        "matmul_flop_s": res.get("matmul_flop_s"), "peak_flop_s": res.get("peak_flop_s"),
        "mfu_model_step_vs_datasheet_peak": r.get("mfu_model_step_vs_datasheet_peak"),
        "mfu_model_step_vs_matmul": r.get("mfu_model_step"),
        "trainer_samples_s": res.get("trainer_samples_s"), "trainer_vs_bare_loop": r.get("trainer_vs_bare_loop"),
        "end_to_end_samples_s": res.get("end_to_end_samples_s"),
        "end_to_end_vs_model_step": r.get("end_to_end_vs_model_step"),
        "end_to_end_data_wait_frac": res.get("end_to_end_data_wait_frac"),
        "mfu_end_to_end_vs_datasheet_peak": r.get("mfu_vs_datasheet_peak"),
        "errors": res.get("errors"),
    }
    if p:
        out.update({
            "profile_step_ms": p.get("step_ms_unprofiled"), "profile_step_busy_frac": p.get("step_busy_frac"),
            "profile_step_host_ms": p.get("step_host_ms"),
            "profile_components_ms": {k: [v.get("wall_ms"), v.get("busy_ms"), v.get("host_ms")]
                                      for k, v in p.get("components", {}).items()},
            "adamw_step_ms": p.get("optimizer_impl_ms"),
            "text_fwd_bwd_ms_by_attention": p.get("text_fwd_bwd_ms_by_attention"),
            "text_attn_implementation": p.get("text_attn_implementation"), "image_attention": p.get("image_attention"),
            "text_pad_fraction": p.get("text_pad_fraction"), "peak_gpu_mem_mb": p.get("peak_gpu_mem_mb"),
            "trace": p.get("trace"),
        })
    return out


def summarise(out_dir: Path, steps_tsv: Path | None = None, env_json: Path | None = None) -> dict:
    steps = []
    if steps_tsv and steps_tsv.is_file():
        for line in steps_tsv.read_text().splitlines():
            name, status, seconds = (line.split("\t") + ["", ""])[:3]
            steps.append({"step": name, "status": status, "seconds": float(seconds or 0)})
    eager, compiled = _load(out_dir / "eager.json"), _load(out_dir / "compiled.json")
    scaling = _load(out_dir / "scaling.json")
    summary = {"steps": steps, "env": _load(env_json) if env_json else None,
               "machine": (compiled or eager or {}).get("machine"),
               "eager": run_figures(eager), "compiled": run_figures(compiled),
               "scaling": (scaling or {}).get("scaling"),
               "weak_scaling_efficiency_2proc": (scaling or {}).get("ratios", {}).get("weak_scaling_efficiency_2proc"),
               "targets": {}}
    for key, target in TARGETS.items():
        after = summary["compiled"].get(key)
        summary["targets"][key] = {"target": target, "eager": summary["eager"].get(key), "compiled": after,
                                   "met": None if after is None else after >= target}
    return summary


def table(s: dict) -> str:
    lines = ["| step | status | s |", "|---|---|---|"]
    lines += [f"| {st['step']} | {st['status']} | {st['seconds']:.0f} |" for st in s["steps"]]
    lines += ["", "| figure | eager | compiled |", "|---|---|---|"]
    keys = ["device", "compiled", "model_step_samples_s", "flops_per_sample", "matmul_flop_s", "peak_flop_s",
            "mfu_model_step_vs_datasheet_peak", "mfu_model_step_vs_matmul", "trainer_samples_s",
            "trainer_vs_bare_loop", "end_to_end_samples_s", "end_to_end_vs_model_step", "end_to_end_data_wait_frac",
            "mfu_end_to_end_vs_datasheet_peak", "profile_step_ms", "profile_step_busy_frac", "profile_step_host_ms",
            "text_pad_fraction", "peak_gpu_mem_mb", "text_attn_implementation", "image_attention"]
    for k in keys:
        lines.append(f"| {k} | {_fmt(s['eager'].get(k))} | {_fmt(s['compiled'].get(k))} |")
    for k in ("adamw_step_ms", "text_fwd_bwd_ms_by_attention"):
        for run in ("eager", "compiled"):
            v = s[run].get(k)
            if v:
                lines.append(f"| {k} ({run} run) | " + ", ".join(f"{a} {_fmt(b)}" for a, b in v.items()) + " | |")
    comps = s["eager"].get("profile_components_ms") or {}
    if comps:
        lines += ["", "| component (eager run): wall / busy / host ms | |", "|---|---|"]
        lines += [f"| {k} | {' / '.join(_fmt(x) for x in v)} |" for k, v in comps.items()]
    lines += ["", "| target | goal | eager | compiled | met |", "|---|---|---|---|---|"]
    for k, t in s["targets"].items():
        lines.append(f"| {k} | >= {t['target']} | {_fmt(t['eager'])} | {_fmt(t['compiled'])} | {_fmt(t['met'])} |")
    if s.get("scaling"):
        lines += ["", "| scaling run | samples/s | step ms |", "|---|---|---|"]
        for name, r in s["scaling"].items():
            lines.append(f"| {name} | {_fmt(r.get('samples_s'))} | {_fmt(r.get('step_ms'))} |"
                         if "error" not in r else f"| {name} | error | |")
        lines.append(f"| weak scaling 1->2 | {_fmt(s.get('weak_scaling_efficiency_2proc'))} | |")
    for run in ("eager", "compiled"):
        if s[run].get("errors"):
            lines.append(f"\n{run} run, failed parts: {json.dumps(s[run]['errors'])[:1500]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--steps", help="the check's step log: name<TAB>status<TAB>seconds per line")
    ap.add_argument("--env", help="the environment JSON the check wrote")
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    s = summarise(out, Path(args.steps) if args.steps else None, Path(args.env) if args.env else None)
    (out / "summary.json").write_text(json.dumps(s, indent=2))
    print(table(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
