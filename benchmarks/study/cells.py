"""Running the study's cells: building each regime's corpus, one training run per cell in a subprocess, reading
what it wrote, and study.json (read, written after each cell, with the commit it ran at)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.bench import REPO
from benchmarks.study.grid import (
    RELABELLED,
    StudyError,
    base_arm,
    cell_key,
    cell_overrides,
    cells_of,
    corpus_knobs,
    corpus_path,
    per_seed_subset,
    run_rel,
    runs_of,
    setting,
)
from vkd_dist.fileio import atomic_write_text
from vkd_dist.run_dir import RunDir

TAIL_LINES = 20  # of a failed cell's log, kept as its error


class Interrupted(Exception):
    """SIGTERM to the study: the running cell is stopped with a checkpoint, to be resumed by the next run."""



# ------------------------------------------------------------------------------------------ running cells
def build_corpora(grid: dict, out: Path) -> None:
    """Each regime's corpus (one per seed where seeds have their own labelled subsets) and, for a relabelled arm,
    its copy with every training report labelled (built from the first seed's: the subset does not matter)."""
    from vkd_dist.data.relabel import label_corpus
    from vkd_dist.data.testbed import build_corpus, rates_line

    for name in grid["regimes"]:
        seeds = grid["seeds"] if per_seed_subset(grid, name) else grid["seeds"][:1]
        for seed in seeds:
            path = corpus_path(out, name, seed=seed, grid=grid)
            if not (path / "dataset.json").is_file():
                t0, knobs = time.time(), corpus_knobs(grid, name, seed)
                meta = build_corpus(path, knobs)
                rates = f"; {rates_line(meta)}" if knobs.get("testbed") else ""
                print(f"[study] corpus {name}: built in {time.time() - t0:.0f} s ({path}){rates}", flush=True)
        for arm in dict.fromkeys(base_arm(a) for a in grid["arms"] if base_arm(a) in RELABELLED):
            labelled = corpus_path(out, name, arm)
            if not (labelled / "dataset.json").is_file():
                label_corpus(corpus_path(out, name, seed=seeds[0], grid=grid), labelled)
                print(f"[study] corpus {name}: every training report labelled by the report labeller ({labelled})",
                      flush=True)


def log_tail(log_path: Path, marker: str) -> str:
    """The last TAIL_LINES lines of the latest attempt in a cell's log."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    lines = text[text.rfind(marker):].splitlines()[1:] if marker in text else text.splitlines()
    return "\n".join(lines[-TAIL_LINES:])


def read_metrics(run_dir: Path, since: float = 0.0, test: bool = True) -> dict:
    """Test macro AUROC (RUN/test_metrics.json, written after `since`; None where the cell has no test pass, as a
    tuning pilot's) and best/'s validation macro AUROC."""
    out = {"test_macro_auroc": None, "test_macro_auroc_ci": None, "test_checkpoint": None,
           "best_val_macro_auroc": None, "best_step": None}
    path = RunDir(run_dir).test_metrics_file
    if test:
        if not path.is_file() or path.stat().st_mtime < since:
            raise ValueError("no test_metrics.json from this run: it stopped before its test pass")
        metrics = json.loads(path.read_text())
        if not isinstance(metrics.get("macro_auroc"), float):
            raise ValueError("test_metrics.json has no macro_auroc")
        out.update(test_macro_auroc=metrics["macro_auroc"], test_macro_auroc_ci=metrics.get("macro_auroc_ci"),
                   test_checkpoint=metrics.get("checkpoint"))
    meta = RunDir(run_dir).export_meta("best")
    if meta.is_file():
        best = json.loads(meta.read_text())
        out["best_val_macro_auroc"], out["best_step"] = best.get("val", {}).get("macro_auroc"), best.get("step")
    if not test and out["best_val_macro_auroc"] is None:
        raise ValueError("no validation macro AUROC in best/meta.json: the run never evaluated on validation")
    return out


def score_text(cell: dict) -> str:
    """What a finished cell scored: its test macro AUROC, or (a pilot's) best/'s validation one."""
    if cell.get("test_macro_auroc") is not None:
        return f"test macro AUROC {cell['test_macro_auroc']:.3f}"
    return f"val macro AUROC {cell['best_val_macro_auroc']:.3f} (best/; no test pass)"


def error_line(error: Optional[str]) -> str:
    """A failed cell's error in one line: what failed, and the log's last line (the exception, usually)."""
    lines = [line for line in (error or "").splitlines() if line.strip()]
    return lines[0] + (f": {lines[-1].strip()}" if len(lines) > 1 else "") if lines else ""


def _interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def run_cell(grid: dict, out: Path, regime: str, arm: str, seed: int) -> dict:
    """One training run in a subprocess; its record (status ok or failed)."""
    run_dir = out / run_rel(regime, arm, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "vkd_dist.train"]
    if grid["config"]:
        cmd += ["--config", str(Path(grid["config"]).resolve())]
    cmd += cell_overrides(grid, out, regime, arm, seed)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    marker = f"=== study: attempt at {time.strftime('%Y-%m-%d %H:%M:%S')}"
    started = time.time()
    with open(RunDir(run_dir).train_log, "a") as log:  # appended: earlier attempts stay readable above
        log.write(f"{marker}: {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait()
        except BaseException:  # Ctrl-C, SIGTERM: the trainer checkpoints at its next step and stops
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
    record: dict[str, Any] = {"exit_code": code, "seconds": round(time.time() - started, 1), "error": None}
    try:
        if code != 0:
            raise ValueError(f"exit code {code}")
        tested = setting(grid, grid["arms"][arm], "train.test_at_end") is not False
        record.update(read_metrics(run_dir, since=started - 1, test=tested), status="ok")
    except (ValueError, OSError) as exc:
        record.update(status="failed", error=f"{exc}\n{log_tail(RunDir(run_dir).train_log, marker)}")
    return record


def load_study(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        study = json.loads(path.read_text())
        for knobs in [study["grid"]["base"], *study["grid"]["regimes"].values()]:  # before label_fraction
            knobs.setdefault("label_fraction", 1.0)
        study["grid"].setdefault("policy_control", [])
        study["grid"].setdefault("label_subsets", "shared")  # before per-seed labelled subsets
    except (ValueError, KeyError, TypeError) as exc:
        raise StudyError(f"{path}: not a study file ({exc}); start another --out") from None
    return study


def write_study(out: Path, study: dict) -> None:
    study["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_text(out / "study.json", json.dumps(study, indent=1))


def provenance() -> dict:
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True, timeout=30).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def run_cells(grid: dict, out: Path, study: dict) -> bool:
    """Every cell not done yet, in order; study.json rewritten after each. False when interrupted."""
    todo = cells_of(grid)
    for i, (regime, arm, seed) in enumerate(todo, 1):
        key = cell_key(regime, arm, seed)
        head = f"[study] {i}/{len(todo)} {key}"
        old = study["cells"].get(key, {})
        if old.get("status") == "ok":
            print(f"{head}: skipped (done: {score_text(old)})", flush=True)
            continue
        cell = {"regime": regime, "arm": arm, "seed": seed, "run_dir": run_rel(regime, arm, seed),
                "attempts": old.get("attempts", 0) + 1, "status": "running"}
        waiting = [f"{cell_key(regime, a, seed)} ({k})" for k, a in runs_of(grid, grid["arms"][arm]).items()
                   if study["cells"].get(cell_key(regime, a, seed), {}).get("status") != "ok"]
        if waiting:
            cell.update(status="failed", exit_code=None, seconds=0.0,
                        error=f"the run it reads, {', '.join(waiting)}, has not finished")
            study["cells"][key] = cell
            write_study(out, study)
            print(f"{head}: failed ({cell['error']})", flush=True)
            continue
        again = {"failed": " (retrying)", "running": " (resuming)", "interrupted": " (resuming)"}
        print(f"{head}: training{again.get(old.get('status', ''), '')} ...", flush=True)
        study["cells"][key] = cell
        write_study(out, study)
        try:
            cell.update(run_cell(grid, out, regime, arm, seed))
        except (KeyboardInterrupt, Interrupted):
            cell["status"] = "interrupted"
            write_study(out, study)
            print(f"{head}: interrupted; the same command resumes it", flush=True)
            return False
        write_study(out, study)
        if cell["status"] == "ok":
            print(f"{head}: {score_text(cell)} ({cell['seconds']:.0f} s)", flush=True)
        else:
            print(f"{head}: failed, {error_line(cell['error'])} ({cell['seconds']:.0f} s); "
                  f"log: {RunDir(out / cell['run_dir']).train_log}", flush=True)
    return True

