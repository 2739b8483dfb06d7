"""A study: objectives ("arms") x seeds x data regimes, every cell a real training run, with honest error bars.

    python -m benchmarks.study                               # the full grid, 150 cells, into runs/study
    python -m benchmarks.study --quick                       # QUICK below, into runs/study-quick
    python -m benchmarks.study --evidence                    # EVIDENCE below, into runs/study-evidence
    python -m benchmarks.study --regimes n500,labels0.1 --arms vkd,image_only --seeds 3 --set train.max_steps=300
    python -m benchmarks.study --arm beta1=objective.beta=1.0,objective.beta_schedule=constant --arms image_only
    python -m benchmarks.study --arm neg=data.missing=negative --policy-control neg --arms vkd,image_only
    python -m benchmarks.study --report-only --out runs/study  # study.md, plots, comparisons again; no training

Grid. Regimes are settings of the synthetic corpus (vkd_dist/data/synthetic.py), one factor varied at a time
around a base (BASE_REGIME, CORPUS): `n<N>` sets num_train, `noise<p>` label_noise, `contrast<c>`
lesion_contrast, `labels<F>` label_fraction (0 < F <= 1: a seeded 1 - F of the training studies keep image and
report but have no labels; the labelled subsets are nested, the images and reports those of the fully labelled
corpus; each seed k trains on its own labelled subset, label_seed k, built into OUT/data/<regime>-subset<k>;
`labels1` is the base), the other knobs staying at the base (`--corpus key=value` moves the base or the
split sizes; two names for one corpus are refused). The full grid is n500, n2000 (the base), n8000, noise0.2,
contrast0.5, contrast0.25, with 400 validation and 1,000 test studies each and data seed 0, so every arm and seed
of a regime is scored on the same test samples (the comparisons are paired). Each regime's corpus is built once
into OUT/data/<regime>. `testbed<F>` is the observation testbed (vkd_dist/data/testbed.py: a true state, a
radiologist's report of it with error rates, training labels read off the report, test labels the truth) with F of
the training studies labelled; `--corpus` sets its rates (miss_rate, false_rate, hedge_rate, gold_fraction). The
`labeller` arm trains image_only on OUT/data/<regime>-labeller, the regime's corpus with every training report
labelled by the report labeller (`vkd-data label`). Seeds are train.seed=0..N-1 (--first-seed K: K..K+N-1).

Tuning. `python -m benchmarks.study.tune` (tune.py) gives every competing arm the same validation budget on a pilot
seed and labelled subset; `--tuned OUT/tuned.json` then runs each arm it tuned at its best trial's settings (the
grid records them), and refuses a grid that would train the pilot's seed.

Arms are the ARMS table: key=value overrides on the base config (configs/default.yaml, or --config). The full
grid runs DEFAULT_ARMS (vkd, vkd_paper, image_only, text_only, kd); the VKD variants vkd_mean, vkd_sep, vkd_reg,
vkd_reg_init and vkd_distil run when named (vkd_distil with --evidence). An override KEY=@ARM gives KEY the
path of ARM's run of the same regime and seed (vkd_reg_init: objective.text_init=@text_only), and an arm of
objective kd gets objective.kd_teacher=@text_only unless it sets that key: ARM is added to the grid and runs
first, and a cell whose ARM run has not finished fails without training.

Label policy. Every arm trains under one label policy: data.missing and data.uncertain as the base config and
--set leave them (unset: the data set's own training policy, dataset.json train_policy). An arm whose overrides
give either another value is refused (exit 2) unless it is named with --policy-control ARM (repeatable, part of
the grid): a deliberate comparison of policies, marked as such in study.md.

Presets (explicit flags still win): --quick, the faint-lesion regime contrast0.5, vkd against image_only, 3 seeds,
300 steps: 6 cells, ~15 minutes on 2 CPU cores. --evidence, labels0.1 and the base n2000; image_only, kd (with
its text_only teacher), vkd and vkd_distil (the validation pilot's best variant, with the same text_only run as
its text_init); 5 seeds; 300 steps, validation every 100 so that best/ is picked on validation: 50 cells.

Per-cell budget. Every cell trains train.max_steps x data.batch_size x optim.grad_accum samples, the same for
every arm (arms may not set those keys; `--set` sets them for all). study.json and study.md state it.

A cell runs `python -m vkd_dist.train` in a subprocess (run_dir OUT/runs/<regime>/<arm>/seed<k>, resume=latest,
offline; its output in RUN/train.log) and is scored from what the trainer writes: RUN/test_metrics.json (the
final/ model on the test split) and the validation macro AUROC in RUN/best/meta.json. A failed cell is recorded
(exit code, the end of its log) and the study goes on. SIGTERM to the study stops the running cell at a step
boundary with a checkpoint (Ctrl-C stops it too, at its last periodic checkpoint). Rerunning the same command
skips done cells, retries failed ones and resumes interrupted ones through the trainer's own resume; a different
grid in the same OUT is refused (exit 2), naming the difference. At the README's ~7 min per 600-step default
run, the full grid is over a day on 2 CPU cores (an estimate: it has not been run).

Outputs in OUT: study.json (the grid, the budget, every cell, per regime x arm summaries with a 95 %
t-interval over seeds, the paired comparisons), study.md (the table), auroc_vs_train_size.png and, where the
grid varies them, auroc_vs_label_noise.png, auroc_vs_lesion_contrast.png and auroc_vs_label_fraction.png (log
axis; the base, fully labelled, is its point at 1). Each image-inference arm is
compared with image_only within each regime by vkd_dist.compare (each arm's seeds averaged; the delta's 95 % CI
and p over seeds and test patients, with the paired patient bootstrap alone beside it as test-set noise only), on
the final/ checkpoints that test_metrics.json describes. text_only reads the report at inference: it is listed
as the teacher's ceiling, not compared.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

from benchmarks.study.cells import (
    _interrupt,
    build_corpora,
    load_study,
    provenance,
    read_metrics,
    run_cells,
    write_study,
)
from benchmarks.study.grid import (
    ARMS,
    DEFAULT_ARMS,
    SEEDS,
    StudyError,
    budget_text,
    build_grid,
    cells_of,
    grid_difference,
    preset_of,
    resolve,
)
from benchmarks.study.results import report


# ------------------------------------------------------------------------------------------ the command
def parse_args(argv=None) -> argparse.Namespace:
    from vkd_dist import RawDefaultsHelpFormatter

    ap = argparse.ArgumentParser(prog="python -m benchmarks.study", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=RawDefaultsHelpFormatter)
    ap.add_argument("--out", help="study directory (default: runs/study, runs/study-quick with --quick, "
                    "runs/study-evidence with --evidence)")
    ap.add_argument("--config", help="base trainer YAML (default: configs/default.yaml)")
    ap.add_argument("--regimes", help="comma-separated regimes, e.g. n500,noise0.2,contrast0.5,labels0.1 (default: "
                    "the full grid around the base)")
    ap.add_argument("--arms", help=f"comma-separated arms of {','.join(ARMS)} or --arm's (default: "
                    f"{','.join(DEFAULT_ARMS)})")
    ap.add_argument("--arm", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                    help="define (and add) an arm: overrides on the base config")
    ap.add_argument("--seeds", type=int, help=f"train.seed 0..N-1 (default {SEEDS})")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="seeds FIRST..FIRST+N-1 (a tuning pilot's seed is one the table does not use)")
    ap.add_argument("--tuned", metavar="TUNED_JSON",
                    help="a finished tuning pilot's OUT/tuned.json (python -m benchmarks.study.tune): each arm it "
                    "tuned runs with its best trial's settings")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override for every cell, e.g. train.max_steps=300 (an arm's own keys win)")
    ap.add_argument("--corpus", action="append", default=[], metavar="KEY=VALUE",
                    help="the base corpus: num_train, num_val, num_test, image_size, label_noise, lesion_contrast, "
                    "label_fraction; the testbed<F> regimes' rates: miss_rate, false_rate, hedge_rate, gold_fraction")
    ap.add_argument("--policy-control", action="append", default=[], metavar="ARM",
                    help="an arm that may train under another label policy (data.missing, data.uncertain)")
    preset = ap.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="the smaller grid QUICK (explicit flags still win)")
    preset.add_argument("--evidence", action="store_true",
                        help="the grid EVIDENCE: label scarcity and the VKD variants (explicit flags still win)")
    ap.add_argument("--bootstrap", type=int, help="paired patient-bootstrap resamples per comparison (default: "
                    "the study's, else 1000)")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild study.md, the plots and the comparisons from OUT; no training")
    args = ap.parse_args(argv)
    args.out = Path(args.out or preset_of(args).get("out", "runs/study"))
    return args


def lock(out: Path):
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".study.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StudyError(f"another study is running in {out}; wait for it or use another --out") from None
    return handle


def study_main(args: argparse.Namespace) -> int:
    out, path = args.out, args.out / "study.json"
    held = load_study(path)
    if args.report_only:
        if held is None:
            raise StudyError(f"{path}: no study here to report on")
        with lock(out):
            for cell in held["cells"].values():  # the run directories are the source: re-read what they hold
                if cell.get("status") == "ok":
                    try:
                        cell.update(read_metrics(out / cell["run_dir"], test=cell.get("test_macro_auroc") is not None))
                    except (ValueError, OSError) as exc:  # moved or removed: what study.json holds stands
                        print(f"[study] {cell['run_dir']}: {exc}; keeping the recorded metrics", file=sys.stderr)
            if "budget" not in held:
                held.update(resolve(held["grid"], out))
            print(report(held, out, args.bootstrap or held.get("bootstrap") or 1000, force=True))
        return 0
    study, finished = train_grid(out, build_grid(args), held)
    if not finished:
        return 130
    with lock(out):
        print(report(study, out, args.bootstrap or study.get("bootstrap") or 1000, force=False))
    failed = [k for k, c in study["cells"].items() if c["status"] != "ok"]
    if failed:
        print(f"[study] {len(failed)} cell(s) failed ({', '.join(failed)}); the same command retries them",
              file=sys.stderr)
        return 1
    return 0


def train_grid(out: Path, grid: dict, held: Optional[dict]) -> tuple[dict, bool]:
    """Every cell of the grid not done yet (the corpora first), under OUT's lock; (the study, False when
    interrupted). A held study.json must hold the same grid."""
    if held is not None:
        grid["label_subsets"] = held["grid"]["label_subsets"]  # a study keeps the subsets it began with
        diff = grid_difference(held["grid"], grid)
        if diff:
            raise StudyError(f"{out / 'study.json'} holds another grid: {'; '.join(diff)}; start another --out")
    with lock(out):
        study = held or {"format": 1, "grid": grid, "cells": {}, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                         **provenance()}
        if "budget" not in study:  # the grid fixes it: once per study
            study.update(resolve(grid, out))
        print(f"[study] {out}: {len(grid['regimes'])} regimes x {len(grid['arms'])} arms x {len(grid['seeds'])} "
              f"seeds = {len(cells_of(grid))} cells; {budget_text(study['budget'])}, the same for every arm",
              flush=True)
        write_study(out, study)
        build_corpora(grid, out)
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return study, run_cells(grid, out, study)
        finally:
            signal.signal(signal.SIGTERM, previous)


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the comparisons load tokenizers in this process
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = parse_args(argv)
    try:
        return study_main(args)
    except StudyError as exc:
        print(f"study: {exc}", file=sys.stderr)
        return 2

