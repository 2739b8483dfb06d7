"""The verdict a study supports, read off its study.json after the report (`python -m benchmarks.study ...`):

    python -m benchmarks.study.verdict --out runs/evidence-observed [--scarce testbed0.1 --full testbed1]

- **Label scarcity**: the best arm that learns from the reports, chosen on *validation* (the mean of its seeds'
  best validation macro AUROC, so that the test split picks nothing), against image_only in the scarce regime:
  its delta with the study's seed-level CI and p, and the share of image_only's gap between the scarce and the
  fully labelled regime that it closes. It meets the bar when the delta is at least SUPERIOR, its CI lies above
  0 and it closes at least CLOSED of the gap.
- **Every label**: the shipped default (DEFAULT_ARM) against image_only in the fully labelled regime,
  non-inferior when the delta is at least NONINFERIOR_DELTA and its CI's lower end at least NONINFERIOR_LOWER.
- **The ranking**: every arm in every regime by its mean test macro AUROC over seeds, with its t-interval.

Candidates are the image-inference arms other than image_only and the runs that are only another arm's stage
(contrastive_pre, whose classifier is never trained): an arm that reads the report at inference (text_only) is
the teacher's ceiling, not a candidate."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from benchmarks.study.grid import BASELINE
from benchmarks.study.results import ci_text, delta_text

DEFAULT_ARM = "vkd"  # the embedded default (configs/default.yaml)
SUPERIOR, CLOSED = 0.03, 0.60  # the scarce regime's bar: delta >= 0.03, CI above 0, >= 60 % of the gap closed
NONINFERIOR_DELTA, NONINFERIOR_LOWER = -0.005, -0.015  # every label: delta >= -0.005, CI lower end >= -0.015


class VerdictError(ValueError):
    """The study lacks what the verdict reads: one line, exit 2."""


def _summary(study: dict, regime: str, arm: str) -> dict:
    for s in study.get("summaries", []):
        if s["regime"] == regime and s["arm"] == arm and s["mean"] is not None:
            return s
    raise VerdictError(f"no finished {arm} cell in regime {regime} (run the study, then its report)")


def comparison(study: dict, regime: str, arm: str) -> dict:
    """The study's comparison of `arm` with image_only in `regime`, with its delta and CI."""
    for c in study.get("comparisons", []):
        if c["regime"] == regime and c["arm"] == arm and c.get("delta") is not None and c.get("ci") is not None:
            return c
    raise VerdictError(f"no comparison of {arm} with {BASELINE} in regime {regime} (python -m benchmarks.study "
                       "--report-only --out OUT)")


def candidates(study: dict) -> list[str]:
    """The arms that compete with image_only: image inference, not the baseline, not only another arm's stage."""
    info = study["arm_info"]
    stages = {source for a in info.values() for source in a["runs_of"].values()}
    return [a for a in study["grid"]["arms"] if a != BASELINE and not info[a]["reads_report"] and a not in stages]


def _compared(c: dict) -> dict:
    return {"delta": c["delta"], "ci": list(c["ci"]), "p_value": c["p_value"],
            "p_value_is_bound": c.get("p_value_is_bound", False), "interval": c.get("interval"),
            "seeds": len(c.get("seeds_a", []))}


def verdict(study: dict, scarce: str, full: str) -> dict:
    """The scarce-label bar, the non-inferiority of the default with every label, and the ranking (see above)."""
    for regime in (scarce, full):
        if regime not in study["grid"]["regimes"]:
            raise VerdictError(f"the study has no regime {regime} (it has {', '.join(study['grid']['regimes'])})")
    arms = candidates(study)
    if not arms:
        raise VerdictError(f"the study has no arm to compare with {BASELINE}")
    base_scarce, base_full = _summary(study, scarce, BASELINE)["mean"], _summary(study, full, BASELINE)["mean"]
    gap = base_full - base_scarce

    def val(arm: str) -> float:
        v = _summary(study, scarce, arm)["best_val_macro_auroc_mean"]
        if v is None:
            raise VerdictError(f"{arm} in {scarce}: no validation macro AUROC to choose on")
        return v

    best = max(arms, key=val)
    b = _compared(comparison(study, scarce, best))
    closed = b["delta"] / gap if gap > 0 else None
    b.update(arm=best, val_macro_auroc=val(best), closed=closed,
             met=b["delta"] >= SUPERIOR and b["ci"][0] > 0 and closed is not None and closed >= CLOSED)
    d: dict[str, Any] = {"arm": DEFAULT_ARM, "met": None}
    if DEFAULT_ARM in arms:
        d.update(_compared(comparison(study, full, DEFAULT_ARM)))
        d["met"] = d["delta"] >= NONINFERIOR_DELTA and d["ci"][0] >= NONINFERIOR_LOWER
    ranking = {}
    for regime in study["grid"]["regimes"]:
        rows = [s for s in study.get("summaries", []) if s["regime"] == regime and s["mean"] is not None]
        ranking[regime] = [{"arm": s["arm"], "mean": s["mean"], "ci95": s["ci95"], "n": s["n_ok"],
                            "reads_report": s["reads_report"]} for s in sorted(rows, key=lambda s: -s["mean"])]
    return {"scarce": scarce, "full": full, "baseline_scarce": base_scarce, "baseline_full": base_full, "gap": gap,
            "best": b, "default": d, "ranking": ranking}


def _met(ok: Optional[bool]) -> str:
    return "not judged" if ok is None else ("**met**" if ok else "**not met**")


def markdown(v: dict) -> str:
    b, d = v["best"], v["default"]
    closed = "n/a (image_only gains nothing from the labels)" if b["closed"] is None else f"{100 * b['closed']:.0f} %"
    lines = [
        f"- **{v['scarce']}**: the best arm on validation is {b['arm']} (validation macro AUROC "
        f"{b['val_macro_auroc']:.3f}); against {BASELINE} on test: {delta_text(b)} over {b['seeds']} seeds; it "
        f"closes {closed} of {BASELINE}'s gap between {v['scarce']} ({v['baseline_scarce']:.3f}) and {v['full']} "
        f"({v['baseline_full']:.3f}). Bar (delta >= {SUPERIOR}, CI above 0, >= {100 * CLOSED:.0f} % of the gap): "
        f"{_met(b['met'])}.",
    ]
    if d["met"] is None:
        lines.append(f"- **{v['full']}**: {d['arm']} is not in the study; non-inferiority not judged.")
    else:
        lines.append(f"- **{v['full']}**: {d['arm']} (the shipped default) against {BASELINE}: {delta_text(d)}. "
                     f"Non-inferiority (delta >= {NONINFERIOR_DELTA}, CI lower end >= {NONINFERIOR_LOWER}): "
                     f"{_met(d['met'])}.")
    for regime, rows in v["ranking"].items():
        if not rows:
            lines.append(f"- **{regime}**: no finished cell yet.")
            continue
        ranked = ", ".join(f"{r['arm']}{' (reads the report)' if r['reads_report'] else ''} {r['mean']:.3f}"
                           + (f" {ci_text(r['ci95'])}" if r["ci95"] else "") for r in rows)
        lines.append(f"- **{regime}**, by mean test macro AUROC [95 % t-interval over seeds]: {ranked}.")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.study.verdict", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the study's OUT (its study.json, after the report)")
    ap.add_argument("--scarce", default="testbed0.1", help="the label-scarce regime (default testbed0.1)")
    ap.add_argument("--full", default="testbed1", help="the same corpus with every label (default testbed1)")
    ap.add_argument("--json", action="store_true", help="print the verdict as JSON")
    args = ap.parse_args(argv)
    path = Path(args.out) / "study.json"
    try:
        study = json.loads(path.read_text())
        v = verdict(study, args.scarce, args.full)
    except (OSError, ValueError) as exc:  # VerdictError is a ValueError
        print(f"verdict: {path}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(v, indent=2) if args.json else markdown(v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
