"""Following a submitted job to its end (`vkd-slurm --wait`), without SLURM accounting (no slurmdbd -> no sacct):
submitit's result files + `scontrol show job`, with a timeout. A job fails when any task's result is an error,
when SLURM reports a terminal state without a result (FAILED/CANCELLED/TIMEOUT, node lost), or when SLURM has
forgotten it without a result."""

from __future__ import annotations

import pickle
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}


@dataclass
class JobOutcome:
    ok: bool
    state: str
    message: str = ""
    result: Optional[dict] = None


def scontrol_job(job_id: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict; {} when SLURM no longer knows the job."""
    try:
        proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    if proc.returncode != 0:
        return {}
    info = {}
    for tok in proc.stdout.split():
        k, sep, v = tok.partition("=")
        if sep and k not in info:
            info[k] = v
    return info


def _read_result(path: Path) -> Optional[tuple[str, Any]]:
    try:
        with path.open("rb") as f:
            return pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError):
        return None


def _log_tail(folder: Path, job_id: str, n: int = 3000) -> str:
    out = []
    for p in sorted(folder.glob(f"{job_id}_*_log.err")) + sorted(folder.glob(f"{job_id}_*_log.out")):
        text = p.read_text(errors="replace")[-n:]
        if text.strip():
            out.append(f"--- {p.name} (tail)\n{text}")
    return "\n".join(out[:4])


def wait_job(job_id: str, folder: Path, timeout: Optional[float] = None, poll_s: float = 2.0,
             grace_s: float = 20.0, echo=print) -> JobOutcome:
    """Follow a SLURM job until it leaves the queue for good; never waits forever on a job SLURM has forgotten."""
    folder = Path(folder)
    deadline = None if timeout is None else time.time() + timeout
    last, gone_since = None, None
    while True:
        results = sorted(folder.glob(f"{job_id}_*_result.pkl"))
        for p in results:  # any task's error is the job's failure
            res = _read_result(p)
            if res and res[0] == "error":
                return JobOutcome(False, "FAILED", f"task {p.name.split('_')[1]} raised:\n{res[1]}")
        res0 = _read_result(folder / f"{job_id}_0_result.pkl")
        if res0 and res0[0] == "success":
            return JobOutcome(True, "COMPLETED", "", res0[1])
        info = scontrol_job(job_id)
        state = info.get("JobState", "UNKNOWN")
        desc = f"{state} (restarts {info.get('Restarts', '?')}, reason {info.get('Reason', '?')})"
        if desc != last:
            echo(f"[vkd-slurm] job {job_id}: {desc}")
            last = desc
        if state in TERMINAL_STATES or not info:
            gone_since = gone_since or time.time()
            if time.time() - gone_since > grace_s:  # no result file appeared (e.g. killed, node lost)
                why = f"job ended in state {state} (exit code {info.get('ExitCode', '?')}) without a result"
                return JobOutcome(False, state, why + "\n" + _log_tail(folder, job_id))
        else:
            gone_since = None
        if deadline is not None and time.time() > deadline:
            return JobOutcome(False, "WAIT_TIMEOUT", f"job {job_id} still {state} after {timeout:.0f}s (not cancelled)")
        time.sleep(poll_s)


def format_result(result: dict) -> str:
    lines = [f"final step {result.get('step')} | run {result.get('run_dir')} | requeues {result.get('restarts')}"]
    for split in ("val", "test"):
        rep = result.get(split) or {}
        if rep:
            lines.append(f"  {split}: macro AUROC {rep.get('macro_auroc')} | micro AUROC {rep.get('micro_auroc')} | "
                         f"CheXpert-5 {rep.get('macro_auroc_chexpert5')}")
    return "\n".join(lines)




def wait_local(job, timeout: Optional[float]) -> JobOutcome:
    deadline = None if timeout is None else time.time() + timeout
    while not job.done():
        if deadline is not None and time.time() > deadline:
            return JobOutcome(False, "WAIT_TIMEOUT", f"still running after {timeout:.0f}s")
        time.sleep(1.0)
    try:
        results = job.results()
    except Exception as exc:  # submitit re-raises the task's failure
        return JobOutcome(False, "FAILED", str(exc))
    res = results[0] if results else None
    if not isinstance(res, dict):
        return JobOutcome(False, "FAILED", "no result from rank 0")
    if res.get("preempted"):
        return JobOutcome(False, "PREEMPTED", f"stopped at step {res.get('step')}; rerun to resume", res)
    return JobOutcome(True, "COMPLETED", "", res)
