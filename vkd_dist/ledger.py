"""The sample ledger (`logging.sample_ledger: true`): per rank, `RUN/ledger/rank-R.csv` with the columns
`epoch,step,key`, one row per training sample in the order the rank consumed it (sample keys only: no report
text, no labels). A resume first drops every row after the checkpoint's step, on every rank's file (also those of
ranks a smaller resumed run no longer has), so the ledger is what the run's optimizer steps consumed and
exactly-once reading can be checked from outside, e.g. across a resume on another number of processes. A rollback
first moves the abandoned line's rows beside its checkpoints, and undoing it brings them back (`move_rows`, from
vkd_dist/lines.py)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Optional

from vkd_dist.fileio import atomic_write_text
from vkd_dist.run_dir import RunDir

HEADER = ["epoch", "step", "key"]


def ledger_files(run_dir: str | Path) -> list[Path]:
    return sorted(RunDir(run_dir).ledger_dir.glob("rank-*.csv"))


def read_ledger(path: str | Path) -> list[tuple[int, int, str]]:
    """(epoch, step, key) rows; a line cut short by a crash is not a row."""
    rows = []
    with open(path, newline="") as fh:
        for row in csv.reader(fh):
            if len(row) == 3 and row != HEADER and row[0].isdigit() and row[1].isdigit():
                rows.append((int(row[0]), int(row[1]), row[2]))
    return rows


def _write(path: Path, rows: list[tuple[int, int, str]]) -> None:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([HEADER, *rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, out.getvalue())


def truncate_after(run_dir: str | Path, step: int) -> None:
    """Keep the rows of steps <= `step` in every rank's file (one process: the main one, before any rank writes)."""
    for path in ledger_files(run_dir):
        _write(path, [r for r in read_ledger(path) if r[1] <= step])


def move_rows(src_run: str | Path, dest_run: str | Path, moves) -> int:
    """Every rank's rows for which `moves(step)` from src_run's ledger to the end of dest_run's (one process)."""
    moved = 0
    for path in ledger_files(src_run):
        rows = read_ledger(path)
        going = [r for r in rows if moves(r[1])]
        if not going:
            continue
        dest = RunDir(dest_run).ledger_dir / path.name
        _write(dest, [*(read_ledger(dest) if dest.is_file() else []), *going])
        _write(path, [r for r in rows if not moves(r[1])])
        moved += len(going)
    return moved


def open_ledger(run_dir: str | Path, accelerator, step: int) -> SampleLedger:
    """Collective: this rank's sample ledger, after the main process dropped every rank's rows past `step` (the
    step the run resumes at)."""
    if accelerator.is_main_process:
        truncate_after(run_dir, step)
    accelerator.wait_for_everyone()
    return SampleLedger(run_dir, accelerator.process_index)


class SampleLedger:
    """Appends this rank's consumed samples; `flush` (at each checkpoint) makes them durable."""

    def __init__(self, run_dir: str | Path, rank: int):
        path = RunDir(run_dir).ledger_file(rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        self.fh: Optional[io.TextIOWrapper] = open(path, "a", newline="")
        self.writer = csv.writer(self.fh, lineterminator="\n")
        if new:
            self.writer.writerow(HEADER)

    def record(self, epoch: int, step: int, keys: list[str]) -> None:
        self.writer.writerows((epoch, step, key) for key in keys)

    def flush(self) -> None:
        if self.fh is not None:
            self.fh.flush()
            os.fsync(self.fh.fileno())

    def close(self) -> None:
        if self.fh is not None:
            self.flush()
            self.fh.close()
            self.fh = None
