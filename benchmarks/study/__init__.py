"""The study (`python -m benchmarks.study`): objectives ("arms") x seeds x data regimes, every cell a real training
run. Its manual is cli.py's docstring (`python -m benchmarks.study --help`). The parts import downward, cli ->
results -> cells -> grid, results -> plots; verdict and seed_stats take results' delta_text / ci_text, the one
format of a delta and its interval:

    grid.py     the regimes, arms and presets; the grid, its checks, each cell's overrides and budget
    cells.py    the corpora, one training run per cell, study.json
    results.py  summaries, paired comparisons, study.md
    plots.py    the figures: test macro AUROC against one corpus knob
    seed_stats.py  docs/evidence.md's published comparisons re-derived at seed level (`python -m
                benchmarks.study.seed_stats`; on vkd_dist.stats, no study.json)
    cli.py      the command: arguments, the lock, main; train_grid (the corpora and every cell not done yet)
    tune.py     the tuning pilot (`python -m benchmarks.study.tune`): each arm's trials as one study, tuned.json
    verdict.py  the bars a finished study meets or not, and the ranking (`python -m benchmarks.study.verdict`;
                reads study.json after the report)

The names below are the package's interface. Patch a function where it is looked up: run_cell in cells,
comparisons in results."""

from benchmarks.study.cells import Interrupted, build_corpora, load_study, read_metrics, run_cells, write_study
from benchmarks.study.cli import main, parse_args, study_main
from benchmarks.study.grid import (
    ARMS,
    BASELINE,
    DEFAULT_ARMS,
    EVIDENCE,
    QUICK,
    SEEDS,
    StudyError,
    arm_objective,
    build_grid,
    cell_key,
    cell_overrides,
    cells_of,
    grid_difference,
    parse_arm,
    parse_corpus,
    parse_regime,
    regime_name,
    resolve,
    run_rel,
)
from benchmarks.study.plots import PLOTS, plot_knob
from benchmarks.study.results import markdown, report, summarise, t_interval

__all__ = [
    "ARMS", "BASELINE", "DEFAULT_ARMS", "EVIDENCE", "PLOTS", "QUICK", "SEEDS", "Interrupted", "StudyError",
    "arm_objective", "build_corpora", "build_grid", "cell_key", "cell_overrides", "cells_of", "grid_difference",
    "load_study", "main", "markdown", "parse_arm", "parse_args", "parse_corpus", "parse_regime", "plot_knob",
    "read_metrics", "regime_name", "report", "resolve", "run_cells", "run_rel", "study_main", "summarise",
    "t_interval", "write_study",
]
