"""The tuning pilot: every competing arm gets the same validation budget before the table is run.

    python -m benchmarks.study.tune --out runs/evidence-pilot --regime testbed0.1 --seed 100 --trials 8 \\
        --arms image_only,labeller,kd,pseudo,contrastive,vkd,vkd_distil \\
        --set train.max_steps=300 --set train.eval_every=100 --set train.ckpt_every=300
    python -m benchmarks.study --tuned runs/evidence-pilot/tuned.json ...   # the table, each arm at its best trial

Each arm gets --trials trials: trial 0 is the arm as ARMS defines it, trials 1..N-1 distinct draws (a random
search seeded by the arm's name) from its SPACES entry, the keys it is sensitive to. Every trial is one cell of a
study in OUT (arms ARM.t0 .. ARM.t<N-1>, one regime, one seed): the same budget, the same resume, the same teacher
and pre-training runs (text_only, contrastive_pre at their defaults, shared by every trial that reads them).
--seed is both the pilot's train.seed and its labelled subset's seed: the table must use other seeds (the study
refuses a --tuned file whose seed it would train). A trial is scored by best/'s validation macro AUROC; no trial
reads the test split (train.test_at_end=false). OUT/tuned.json holds every trial's settings and score and each
arm's best; OUT/tuned.md the same as a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path
from typing import Any, Optional

from benchmarks.study.cells import load_study
from benchmarks.study.cli import train_grid
from benchmarks.study.grid import (
    ARMS,
    RUN_REF,
    SPACES,
    StudyError,
    build_grid,
    cell_key,
    parse_corpus,
    parse_regime,
)
from vkd_dist.fileio import atomic_write_text

TRIALS = 8
PILOT_SEED = 100  # a seed the table (seeds 0..4) does not use


def text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def space_of(arm: str, every_label: bool = False) -> dict[str, list]:
    """The arm's search space; where every training study is labelled, without data.labelled_share (no batch is
    composed there, so its trials would be the same run)."""
    return {k: v for k, v in SPACES[arm].items() if not (every_label and k == "data.labelled_share")}


def defined_values(arm: str, keys: list[str], set_: list[str], config: Optional[str]) -> tuple:
    """What the arm already says for each key: the trainer's typed config (schema defaults, YAML, --set, the arm)."""
    from vkd_dist.config import read_config
    from vkd_dist.config.checks import value_at

    own = [i for i in [*set_, *ARMS[arm]] if not RUN_REF.fullmatch(i.partition("=")[2].strip())]  # paths: per cell
    cfg = read_config(config, own, checks=())
    return tuple(value_at(cfg, key) for key in keys)


def trials_of(arm: str, n: int, set_: list[str], config: Optional[str] = None,
              every_label: bool = False) -> list[list[str]]:
    """The arm's n trials as override lists: [] (the arm as defined), then n - 1 distinct points of its space that
    differ from what the arm already says (its effective settings, --set included)."""
    space = space_of(arm, every_label)
    defined = defined_values(arm, list(space), set_, config)
    points = [p for p in itertools.product(*space.values()) if p != defined]
    if len(points) < n - 1:
        raise StudyError(f"arm {arm}: its space holds {len(points)} settings besides the arm as defined, fewer than "
                         f"--trials {n} - 1")
    draws = random.Random(f"tune:{arm}").sample(points, n - 1)
    return [[], *([f"{k}={text(v)}" for k, v in zip(space, p)] for p in draws)]


def trial_arms(arms: list[str], n: int, set_: list[str], config: Optional[str],
               every_label: bool) -> dict[str, list[str]]:
    """ARM.t<K> -> that trial's full overrides (the arm's, then the trial's)."""
    return {f"{arm}.t{k}": [*ARMS[arm], *trial] for arm in arms
            for k, trial in enumerate(trials_of(arm, n, set_, config, every_label))}


def every_label(knobs: dict) -> bool:
    """Whether every training study of the regime is labelled (so no batch is composed)."""
    return knobs["label_fraction"] == 1


def summarise(study: dict, arms: list[str], n: int, regime: str, seed: int) -> dict:
    """tuned.json: per arm, every trial (its own overrides, status, validation score) and the best finished one."""
    grid = study["grid"]
    out: dict[str, Any] = {"regime": regime, "seeds": [seed], "trials": n, "budget": study.get("budget"),
                           "config": grid["config"], "set": grid["set"], "commit": study.get("commit"), "arms": {}}
    for arm in arms:
        rows = []
        for k, trial in enumerate(trials_of(arm, n, grid["set"], grid["config"], every_label(grid["regimes"][regime]))):
            cell = study["cells"].get(cell_key(regime, f"{arm}.t{k}", seed), {})
            rows.append({"trial": k, "overrides": trial, "status": cell.get("status", "not run"),
                         "val_macro_auroc": cell.get("best_val_macro_auroc"), "best_step": cell.get("best_step")})
        done = [r for r in rows if r["status"] == "ok" and r["val_macro_auroc"] is not None]
        best = max(done, key=lambda r: (r["val_macro_auroc"], -r["trial"])) if done else None
        out["arms"][arm] = {"complete": len(done) == n, "best": best, "trials": rows}
    return out


def markdown(tuned: dict) -> str:
    lines = [f"# Tuning pilot: regime `{tuned['regime']}`, seed {tuned['seeds'][0]}, {tuned['trials']} trials per arm",
             "", "Scored by best/'s validation macro AUROC (no test pass). Trial 0 is the arm as defined.", "",
             "| arm | trial | settings | val macro AUROC | best |", "|---|---|---|---|---|"]
    for arm, entry in tuned["arms"].items():
        for row in entry["trials"]:
            score = f"{row['val_macro_auroc']:.4f}" if row["val_macro_auroc"] is not None else row["status"]
            chosen = "**yes**" if entry["best"] and entry["best"]["trial"] == row["trial"] else ""
            lines.append(f"| {arm} | {row['trial']} | {' '.join(row['overrides']) or '(as defined)'} | {score} | "
                         f"{chosen} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    from vkd_dist import RawDefaultsHelpFormatter

    ap = argparse.ArgumentParser(prog="python -m benchmarks.study.tune", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=RawDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the pilot's directory (a study directory)")
    ap.add_argument("--regime", required=True, help="the one regime tuned on, e.g. testbed0.1")
    ap.add_argument("--arms", required=True, help=f"comma-separated arms to tune, of {', '.join(SPACES)}")
    ap.add_argument("--trials", type=int, default=TRIALS, help="trials per arm, the same for every arm")
    ap.add_argument("--seed", type=int, default=PILOT_SEED, help="train.seed and labelled-subset seed of the pilot")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every trial")
    ap.add_argument("--corpus", action="append", default=[], metavar="KEY=VALUE", help="as the study's --corpus")
    ap.add_argument("--config", help="base trainer YAML (default: configs/default.yaml)")
    return ap.parse_args(argv)


def tune_main(args: argparse.Namespace) -> int:
    arms = list(dict.fromkeys(a.strip() for a in args.arms.split(",") if a.strip()))
    unknown = [a for a in arms if a not in SPACES]
    if unknown:
        raise StudyError(f"--arms: no search space for {unknown[0]!r} (SPACES in benchmarks/study/tune.py: "
                         f"{', '.join(SPACES)})")
    if args.trials < 1:
        raise StudyError("--trials must be at least 1")
    if args.seed < 0:
        raise StudyError("--seed must be 0 or more")
    settings = [*args.set, "train.test_at_end=false"]  # a pilot never reads the test split
    regime, knobs = parse_regime(args.regime, parse_corpus(args.corpus))
    trials = trial_arms(arms, args.trials, settings, args.config, every_label(knobs))
    grid = build_grid(argparse.Namespace(
        config=args.config, corpus=args.corpus, arm=[f"{name}={','.join(o)}" for name, o in trials.items()],
        arms=",".join(trials), set=settings, seeds=1, first_seed=args.seed, regimes=args.regime, policy_control=[],
        quick=False, evidence=False, tuned=None))
    study, finished = train_grid(args.out, grid, load_study(args.out / "study.json"))
    tuned = summarise(study, arms, args.trials, regime, args.seed)
    atomic_write_text(args.out / "tuned.json", json.dumps(tuned, indent=1))
    atomic_write_text(args.out / "tuned.md", markdown(tuned))
    print(markdown(tuned))
    if not finished:
        return 130
    return 0 if all(e["complete"] for e in tuned["arms"].values()) else 1


def main(argv=None) -> int:
    try:
        return tune_main(parse_args(argv))
    except StudyError as exc:
        print(f"tune: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
