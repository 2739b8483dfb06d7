"""Lines of checkpoints: what a rollback sets aside, and what undoing one brings back.

A resume from a checkpoint older than the run's newest (an explicit `resume=PATH`, or `resume=latest` falling back
from newer ones that do not verify) starts a new line. The line it leaves is set aside whole, into
`checkpoints/abandoned-<step>-<UTC time>/`, which has the layout of a run directory: its newer step-* checkpoints,
its sample-ledger rows of later steps (`ledger/rank-R.csv`), and its exports and metrics when they came from a later
step (`best/`, `final/`, `test_metrics.json`). Kept, never deleted by retention, never read by `resume=latest`, so
retention (the `keep_last` highest steps), `latest`, the ledger and best/ are the current line's only.

Undoing a rollback is resuming a checkpoint inside an `abandoned-<fork>-.../` directory: the current line's steps
after the fork (and its ledger rows and exports of them) are set aside the same way, and the abandoned line up to
the resumed step comes back (its checkpoints, ledger rows and exports), so that `resume=latest` after a crash
continues the line being continued, never the other. Its later steps stay aside.

After either, best/ and the best metric come from the line being continued: when that line's best/ is not on disk
(it was replaced by the other line's export), the best metric starts afresh and the next validation exports best/.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from vkd_dist import ledger
from vkd_dist.checkpoint import (
    ABANDONED,
    CONSOLIDATED,
    OLD,
    STATE_FILE,
    _recover,
    _step_number,
    on_main,
)
from vkd_dist.fileio import fsync_path, publish_dir, stage_version
from vkd_dist.run_dir import EXPORTS, RunDir


@dataclass
class LineChange:
    ckpt: Path  # where the resumed checkpoint is now (one brought back from an abandoned line moved into the line)
    note: Optional[str] = None  # the line to log; None when nothing was set aside or brought back
    best_kept: bool = True  # False: the continued line's best/ is not on disk, its best metric starts afresh


def continue_line(run_dir: str | Path, ckpt: Path, accelerator=None) -> LineChange:
    """Collective: after `checkpoint.resolve` chose (and verified) `ckpt`, rank 0 sets aside what is not of its
    line and brings back what is (see the module's docstring); every rank gets rank 0's answer."""
    return on_main(accelerator, lambda: _continue(RunDir(run_dir), Path(ckpt)))


def _saved_step(ckpt: Path) -> int:
    try:
        return int(json.loads((ckpt / STATE_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        number = _step_number(ckpt.name)
        if number is None:
            raise
        return number


def _fork_of(aside: Path) -> int:
    """abandoned-<fork>-<UTC time>[-n]: the step the lines parted at."""
    return int(aside.name[len(ABANDONED):].split("-")[0])


def _export_step(run: RunDir, which: str) -> Optional[int]:
    meta = run.path / which / "meta.json"
    try:
        return int(json.loads(meta.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _move_export(src: RunDir, dest: RunDir, which: str) -> None:
    """`which` (best/final, a symlink to a version or a plain directory) of `src` to `dest`, where it is published
    as the current version; with final/ goes its test_metrics.json."""
    link = src.path / which
    target = src.path / os.readlink(link) if link.is_symlink() else link
    staged = stage_version(dest.path / which)
    staged.rmdir()
    os.replace(target, staged)
    if link.is_symlink():
        link.unlink()
    publish_dir(staged, dest.path / which)
    if which == "final" and src.test_metrics_file.is_file():
        os.replace(src.test_metrics_file, dest.test_metrics_file)


def _checkpoints(line: RunDir) -> Path:
    """Where a line keeps its step-* directories: a run's checkpoints/, an abandoned line's own directory."""
    return line.path if line.path.name.startswith(ABANDONED) else line.checkpoints_dir


def _move_line(src: RunDir, dest: RunDir, moves) -> list[str]:
    """Step-* checkpoints, ledger rows and exports of the steps `moves(step)` says, from one line to another (the
    run, or an abandoned line: its checkpoints in its own directory, its ledger/ and exports beside them).
    Returns the checkpoints' names."""
    names = []
    for path in sorted(_checkpoints(src).glob("step-*")):
        if (n := _step_number(path.name)) is not None and moves(n):
            os.replace(path, _checkpoints(dest) / path.name)
            names.append(path.name)
    ledger.move_rows(src.path, dest.path, moves)
    for which in EXPORTS:
        step = _export_step(src, which)
        if step is not None and moves(step):  # over dest's own: the line it comes from continues
            _move_export(src, dest, which)
    return names


def _clear_caches_after(root: Path, step: int) -> None:
    """The superseded versions, weight caches and unfinished saves of steps after `step`: of the line left."""
    for prefix in (OLD, CONSOLIDATED, ".tmp-"):
        for stale in root.glob(f"{prefix}step-*"):
            if (n := _step_number(stale.name[len(prefix):])) is not None and n > step:
                shutil.rmtree(stale, ignore_errors=True)


def _new_aside(root: Path, fork: int) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = root / f"{ABANDONED}{fork:08d}-{stamp}"
    suffix = 1
    while dest.exists():  # two rollbacks within a second
        suffix += 1
        dest = root / f"{ABANDONED}{fork:08d}-{stamp}-{suffix}"
    dest.mkdir()
    return dest


def _continue(run: RunDir, ckpt: Path) -> LineChange:
    root = run.checkpoints_dir
    if not root.is_dir():
        return LineChange(ckpt)
    step = _saved_step(ckpt)
    _recover(run.path)
    from_aside = ckpt.parent.parent.resolve() == root.resolve() and ckpt.parent.name.startswith(ABANDONED)
    fork = _fork_of(ckpt.parent) if from_aside else step
    _clear_caches_after(root, fork)
    after_fork = [p for p in root.glob("step-*")
                  if (n := _step_number(p.name)) is not None and n > fork and p.resolve() != ckpt.resolve()]
    if not (after_fork or from_aside):  # the newest of its line (a crash resume): its later steps are redone
        return LineChange(ckpt)
    exports_after = [w for w in EXPORTS if (s := _export_step(run, w)) is not None and s > fork]
    said = []
    if after_fork or exports_after:
        aside = _new_aside(root, fork)
        moved = _move_line(run, RunDir(aside), lambda n: n > fork)
        fsync_path(aside)
        kept = ", ".join([*moved, *(f"{w}/" for w in exports_after)])
        said.append(f"{kept} moved to {RunDir.CHECKPOINTS}/{aside.name} with the sample-ledger rows after step {fork} "
                    "(kept; never deleted by retention)")
    if from_aside:
        line = RunDir(ckpt.parent)
        back = _move_line(line, run, lambda n: fork < n <= step)
        if not any(line.path.iterdir()):
            line.path.rmdir()
        said.append(f"{', '.join(back)} brought back from {RunDir.CHECKPOINTS}/{line.path.name}")
        ckpt = root / ckpt.name
    fsync_path(root)
    best = _export_step(run, "best")
    note = f"rolled back to {ckpt.name}: {'; '.join(said)}"
    return LineChange(ckpt, note, best_kept=best is not None and best <= step)
