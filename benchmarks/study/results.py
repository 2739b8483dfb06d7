"""The study's results: per regime x arm summaries with a t-interval over seeds, the paired comparisons with
image_only (vkd_dist.compare), study.md's table and notes, and the report that writes them with the plots."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from benchmarks.study.cells import error_line, write_study
from benchmarks.study.grid import (
    BASE_REGIME,
    BASELINE,
    POLICY_KEYS,
    _policy,
    budget_text,
    cell_key,
    cells_of,
    corpus_path,
    override_key,
    runs_of,
    setting,
)
from benchmarks.study.plots import PLOTS, plot_knob
from vkd_dist.fileio import atomic_write_text
from vkd_dist.run_dir import EXPORT_FILE, RunDir

CHECKPOINT = "final"  # the model test_metrics.json describes; the comparisons use the same one
# what a comparison entry keeps of vkd_dist.compare's result (its headline, ci / p_value, counts the seeds too)
COMPARED = ("ci", "p_value", "p_value_is_bound", "interval", "df", "test_noise_only", "seed_t_interval",
            "seeds_paired", "macro_auroc_a", "macro_auroc_b", "per_seed_delta", "bootstrap")


# ------------------------------------------------------------------------------------------ the results
def t_interval(values: list[float], level: float = 0.95) -> tuple[Optional[float], Optional[float], Optional[list]]:
    """(mean, sd, [lo, hi]) with a t-interval over the values (seeds); sd and interval need two."""
    from vkd_dist.stats import t_interval as student

    t = student(values, level)
    return t["mean"], t["sd"], None if t["ci"] is None else list(t["ci"])


def ok_cells(study: dict, regime: str, arm: str) -> list[dict]:
    cells = (study["cells"].get(cell_key(regime, arm, s), {}) for s in study["grid"]["seeds"])
    return [c for c in cells if c.get("status") == "ok"]


def summarise(study: dict) -> list[dict]:
    grid, rows = study["grid"], []
    for regime in grid["regimes"]:
        for arm in grid["arms"]:
            cells = [study["cells"].get(cell_key(regime, arm, s), {}) for s in grid["seeds"]]
            ok = [c for c in cells if c.get("status") == "ok"]
            values = [c["test_macro_auroc"] for c in ok]
            mean, sd, ci = t_interval(values)
            val = [c["best_val_macro_auroc"] for c in ok if c.get("best_val_macro_auroc") is not None]
            info = study["arm_info"][arm]
            rows.append({"regime": regime, "arm": arm, "objective": info["objective"],
                         "reads_report": info["reads_report"], "n_ok": len(ok),
                         "n_failed": sum(c.get("status") == "failed" for c in cells),
                         "seeds_ok": [c["seed"] for c in ok], "test_macro_auroc": values, "mean": mean, "sd": sd,
                         "ci95": ci, "best_val_macro_auroc_mean": sum(val) / len(val) if val else None,
                         "seconds_mean": sum(c["seconds"] for c in ok) / len(ok) if ok else None})
    return rows


def _fingerprint(out: Path, cells: list[dict]) -> list:
    """Which exported models a comparison read: a rerun reuses it while they are unchanged."""
    fp = []
    for c in cells:
        weights = RunDir(out / c["run_dir"]).export_dir(CHECKPOINT).resolve() / EXPORT_FILE  # final/ -> .final.vN/
        fp.append([os.path.relpath(weights, out.resolve()), weights.stat().st_mtime_ns if weights.is_file() else None])
    return fp


def comparisons(study: dict, out: Path, n_boot: int, force: bool) -> list[dict]:
    """Every image-inference arm against image_only, per regime (vkd_dist.compare, all ok seeds at once)."""
    grid, summaries = study["grid"], {(s["regime"], s["arm"]): s for s in study["summaries"]}
    cached = {(c["regime"], c["arm"]): c for c in study.get("comparisons", [])}
    result: list[dict] = []
    if BASELINE not in grid["arms"]:
        return result
    for regime in grid["regimes"]:
        base = ok_cells(study, regime, BASELINE)
        for arm in grid["arms"]:
            if arm == BASELINE or summaries[(regime, arm)]["reads_report"]:
                continue
            cells = ok_cells(study, regime, arm)
            entry: dict[str, Any] = {"regime": regime, "arm": arm, "baseline": BASELINE, "checkpoint": CHECKPOINT}
            if not cells or not base:
                entry["skipped"] = f"no finished run of {arm if not cells else BASELINE} in {regime}"
                result.append(entry)
                continue
            entry.update(seeds_a=[c["seed"] for c in cells], seeds_b=[c["seed"] for c in base],
                         fingerprint=_fingerprint(out, cells + base))
            old = cached.get((regime, arm), {})
            if (not force and old.get("fingerprint") == entry["fingerprint"] and "test_noise_only" in old
                    and old["bootstrap"]["resamples"] == n_boot):  # older entries lack the seed-aware headline
                result.append(old)
                continue
            try:
                from vkd_dist.compare import compare

                r = compare([str(out / c["run_dir"]) for c in cells], [str(out / c["run_dir"]) for c in base],
                            str(corpus_path(out, regime, seed=grid["seeds"][0], grid=grid).resolve()), "test",
                            CHECKPOINT, n_boot=n_boot)  # every labelled subset shares the test split
            except Exception as exc:  # one comparison must not lose the others
                entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
                result.append(entry)
                continue
            entry.update(delta=r["delta_macro_auroc"], num_samples=r["num_samples"], num_patients=r["num_patients"],
                         macro_labels=len(r["macro_labels"]),
                         **{k: r[k] for k in COMPARED})
            result.append(entry)
    return result


def _f(v: Optional[float], signed: bool = False) -> str:
    return "n/a" if v is None else (f"{v:+.3f}" if signed else f"{v:.3f}")


def ci_text(ci: list, signed: bool = False) -> str:
    return f"[{_f(ci[0], signed)}, {_f(ci[1], signed)}]"


def delta_text(c: dict) -> str:
    """`+0.047 [+0.013, +0.081], p = 0.0192` from a comparison's delta, ci, p_value and p_value_is_bound: the one
    format of a delta in the study's table, its verdict and the figures that quote them."""
    from vkd_dist.compare import p_text

    bound = c.get("p_value_is_bound", False)  # a study.json from before the bound was recorded printed an equality
    return f"{_f(c['delta'], True)} {ci_text(c['ci'], True)}, {p_text(c['p_value'], bound)}"


def markdown(study: dict, out: Path) -> tuple[str, str]:
    """(the whole study.md, its table and notes)."""
    grid, cmp = study["grid"], {(c["regime"], c["arm"]): c for c in study["comparisons"]}
    lines = ["| regime | arm | val macro AUROC (best/, mean) | test macro AUROC mean [95% CI] | n "
             "| delta vs image_only [95% CI over seeds and test patients] p | test-set noise only [95% CI] p |",
             "|---|---|---|---|---|---|---|"]
    for s in study["summaries"]:
        ci = f" {ci_text(s['ci95'])}" if s["ci95"] else ""
        n = f"{s['n_ok']}" + (f" ({s['n_failed']} failed)" if s["n_failed"] else "")
        c = cmp.get((s["regime"], s["arm"]))
        noise = ""
        if s["arm"] == BASELINE:
            delta = "(baseline)"
        elif s["reads_report"]:
            delta = "reads the report: the teacher's ceiling, not compared"
        elif c is None or "delta" not in c:
            delta = "not compared" + (f": {c.get('skipped') or c.get('error')}" if c else "")
        elif c["delta"] is None or c["ci"] is None:
            delta = "undefined (a macro label lacks a class)"
        else:
            delta = delta_text(c)
            if c["interval"] != "seeds and test patients":
                delta += " (test-set noise only: fewer than 2 seeds)"
            else:
                t = c["test_noise_only"]
                noise = delta_text({**t, "delta": c["delta"]})
        lines.append(f"| {s['regime']} | {s['arm']} | {_f(s['best_val_macro_auroc_mean'])} | {_f(s['mean'])}{ci} "
                     f"| {n} | {delta} | {noise} |")
    notes = [f"- {c['regime']} {c['arm']} vs {BASELINE}: not compared: {c.get('skipped') or c.get('error')}"
             for c in study["comparisons"] if "delta" not in c]
    if BASELINE not in grid["arms"]:
        notes.append(f"- no {BASELINE} arm in the grid: nothing compared")
    failed = [c for c in study["cells"].values() if c.get("status") != "ok"]
    notes += [f"- {cell_key(c['regime'], c['arm'], c['seed'])} {c['status']}"
              + (f": {error_line(c.get('error'))}" if c.get("error") else "") for c in failed]
    table = "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "")
    base, controls = grid["base"], grid["policy_control"]

    def corpus(k: dict) -> str:
        return ", ".join(f"{knob} {k[knob]:g}" if isinstance(k[knob], float) else f"{knob} {k[knob]}"
                         for knob in BASE_REGIME) + (", the observation testbed" if k.get("testbed") else "")

    def arm(a: str) -> str:
        runs = runs_of(grid, grid["arms"][a])
        items = [i for i in grid["arms"][a] if override_key(i, "") not in runs]
        items += [f"{k}=<{source} run, same regime and seed>" for k, source in runs.items()]
        return f"{a}: {' '.join(items) or '(the config as it is)'}" + (" [policy control]" if a in controls else "")

    regimes = "; ".join(f"{name} ({corpus(k)})" for name, k in grid["regimes"].items())
    policy = ", ".join(f"{key} {_policy(setting(grid, [], key))}" for key in POLICY_KEYS)
    ok = sum(c.get("status") == "ok" for c in study["cells"].values())
    seconds = sum(c.get("seconds") or 0 for c in study["cells"].values())
    head = [f"# Study: {out}", "",
            f"- **Regimes** (synthetic corpus, data seed {base['seed']}, {base['num_val']} val / "
            f"{base['num_test']} test studies at {base['image_size']} px; one knob varied at a time around "
            f"{corpus(base)}; label_fraction F: the other 1 - F of the training studies have image and report, no "
            f"labels): {regimes}",
            f"- **Arms** (on {grid['config'] or 'configs/default.yaml'}): {'; '.join(map(arm, grid['arms']))}",
            f"- **Label policy** (training): {policy} in every arm"
            + (f" but the policy controls ({', '.join(controls)})" if controls else ""),
            f"- **Seeds**: train.seed {', '.join(map(str, grid['seeds']))}; **--set**: "
            f"{' '.join(grid['set']) or '(none)'}",
            f"- **Budget**: {budget_text(study['budget'])}, the same for every arm",
            f"- **Cells**: {ok} of {len(cells_of(grid))} done, {len(failed)} not; {seconds / 3600:.2f} h of training "
            "wall time",
            "- **Test macro AUROC**: the final/ model on the regime's test split (RUN/test_metrics.json), mean over "
            "the seeds that finished, 95 % t-interval over seeds (none with one seed).",
            f"- **Delta**: arm minus {BASELINE} on the same test samples, each arm's seeds averaged "
            f"(vkd_dist.compare on {CHECKPOINT}/). Its 95 % CI and two-sided p count training randomness and "
            "test-set noise: a t-interval whose variance is the per-seed deltas' (seeds paired by train.seed) "
            f"plus that of one paired patient bootstrap ({study.get('bootstrap', 1000)} resamples), on the "
            "seeds' degrees of freedom. The last column is that bootstrap alone, the trained models "
            "held fixed: test-set noise only. `p < x`: no resample fell on the far side of 0, so the p is below "
            "what the resamples resolve.", ""]
    plots = [f"![{p}]({p})" for p in study.get("plots", [])]
    return "\n".join(head + [table, ""] + plots) + "\n", table


def report(study: dict, out: Path, n_boot: int, force: bool) -> str:
    """Summaries, comparisons, plots and study.md from the cells; returns the table for the terminal."""
    study["summaries"] = summarise(study)
    study["bootstrap"] = n_boot
    study["comparisons"] = comparisons(study, out, n_boot, force)
    title = f"{len(study['grid']['seeds'])} seeds; {budget_text(study['budget'])}"
    study["plots"] = [p for p in (plot_knob(study, out, k, title) for k in PLOTS) if p]
    text, table = markdown(study, out)
    atomic_write_text(out / "study.md", text)
    write_study(out, study)
    return table

