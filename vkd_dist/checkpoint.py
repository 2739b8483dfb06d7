"""Checkpoints: crash-consistent save and verified resume of the whole training state, and retention.

A checkpoint is `RUN/checkpoints/step-00000200/`: Accelerate's state (model, optimizer, RNG of every rank;
DeepSpeed's or FSDP's per-rank shard files) plus `train_state.json` (step, data position, best metric) and,
written last, `manifest.json`: every other file's size and SHA-256. It is written under a temporary name, each
node's files are fsynced, rank 0 writes train_state.json and lists the files, every rank hashes a share of them
(dealt by size, largest first, so the shares balance), and rank 0 writes the gathered digests as the manifest
and renames the directory into place; a save that fails on any rank fails on every rank, leaves no step-*
directory and says so. Re-saving a step that exists (after a resume) renames the old one to `.old-step-X`, the
new one into place, and only then removes the old one; a crash between the two renames leaves `.old-step-X`
without `step-X`, which resume (and the next save) renames back.

Resume verifies the manifest before anything is unpickled; `resume=latest` skips (with a warning naming the
file) a checkpoint whose manifest is missing or whose files are missing, truncated, changed or added, in favour
of the newest one that verifies. Rank 0 reads the manifest and stats the files, every rank hashes a share, and
all ranks reach the same answer (the first problem in the manifest's file order) and so load the same
checkpoint; each (shared) file is read once rather than once per rank. A file written by another node is visible
to every rank because the writer closed it before the save's barrier (NFS close-to-open; Lustre is coherent).

A resume from a checkpoint older than the run's newest starts a new line: vkd_dist/lines.py sets the other line
aside into `checkpoints/abandoned-<step>-<UTC time>/` (kept, never deleted by retention, never read by
`resume=latest`); vkd_dist/resume.py decides, once for every rank, what a resume loads.

A step's consolidated weights (`checkpoints/.consolidated-step-X/`, vkd_dist/weights.py) are outside every
manifest and removed with their step. The exports (best/, final/) are vkd_dist/weights.py's too.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar

from accelerate.utils import broadcast_object_list, gather_object

from vkd_dist.config import ConfigError
from vkd_dist.fileio import atomic_write_text, fsync_path, fsync_tree, share_like_parent
from vkd_dist.run_dir import RunDir

CKPT_DIR = RunDir.CHECKPOINTS
STATE_FILE = "train_state.json"
MANIFEST_FILE = "manifest.json"
OLD = ".old-"  # + step-X: the previous version of a step being re-saved
CONSOLIDATED = ".consolidated-"  # + step-X: its sharded weights as one safetensors file (find_weights)
ABANDONED = "abandoned-"  # + <step>-<UTC time>: the newer checkpoints a rollback moved aside
T = TypeVar("T")


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written, or that does not verify."""


def _step_dirs(run_dir: Path) -> list[Path]:
    """The run's current line: step-* directories with a train_state.json (never .old-*, .tmp-*, abandoned-*)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())


def _recover(run_dir: str | Path) -> list[str]:
    """Rank 0 (or one process) only: a `.old-step-X` whose `step-X` is missing is a re-save of step X that
    stopped between its two renames; the old checkpoint goes back in place. Returns the names put back."""
    root = Path(run_dir) / CKPT_DIR
    restored = []
    for old in sorted(root.glob(f"{OLD}step-*")) if root.is_dir() else []:
        final = old.with_name(old.name[len(OLD):])
        if not final.exists() and (old / STATE_FILE).is_file():
            os.replace(old, final)
            restored.append(final.name)
            warnings.warn(f"checkpoint {final.name} restored from {old.name} (a re-save of it was interrupted)",
                          RuntimeWarning, stacklevel=3)
    if restored:
        fsync_path(root)
    return restored


def _step_number(name: str) -> Optional[int]:
    digits = name[len("step-"):]
    return int(digits) if name.startswith("step-") and digits.isdigit() else None


def latest(run_dir: str | Path) -> Optional[Path]:
    """The newest step-* directory, unverified (see `resolve` for the one a resume would load)."""
    dirs = _step_dirs(Path(run_dir))
    return dirs[-1] if dirs else None


# --------------------------------------------------------------------------- the manifest
def _files(ckpt: Path) -> dict[str, Path]:
    return {p.relative_to(ckpt).as_posix(): p for p in sorted(ckpt.rglob("*"))
            if p.is_file() and p.name != MANIFEST_FILE}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _sizes(ckpt: Path) -> dict[str, int]:
    """Every file but the manifest -> its size, in the manifest's order."""
    return {rel: p.stat().st_size for rel, p in _files(ckpt).items()}


def _deal(sizes: dict[str, int], ranks: int) -> list[list[str]]:
    """Files -> one share per rank: largest first, each to the rank with the fewest bytes so far (ties: the lower
    rank, then the file name), so the shares balance and every rank deals the same shares from the same sizes."""
    shares: list[list[str]] = [[] for _ in range(ranks)]
    loads = [(0, rank) for rank in range(ranks)]  # a heap: the least loaded rank (then the lowest) first
    for rel in sorted(sizes, key=lambda r: (-sizes[r], r)):
        load, rank = heapq.heappop(loads)
        shares[rank].append(rel)
        heapq.heappush(loads, (load + sizes[rel], rank))
    return shares


def _rank_of(accelerator) -> tuple[int, int]:
    if accelerator is None:
        return 0, 1
    return accelerator.process_index, accelerator.num_processes


def _gathered(accelerator, value: T) -> list[T]:
    """Collective: every rank's `value`, in rank order, on every rank."""
    return gather_object([value]) if _rank_of(accelerator)[1] > 1 else [value]


def write_manifest(ckpt: Path, files: Optional[dict[str, dict]] = None) -> None:
    """manifest.json: every other file's size and SHA-256. `files` ({rel: {size, sha256}}, as `save` gathers
    them from the ranks' shares); without it this process hashes every file itself."""
    if files is None:
        files = {rel: {"size": p.stat().st_size, "sha256": _sha256(p)} for rel, p in _files(ckpt).items()}
    atomic_write_text(ckpt / MANIFEST_FILE, json.dumps({"files": files}, indent=1))


_verified: dict[tuple, Optional[str]] = {}  # a stat of every file -> verify's answer: resume asks up to 3 times


def verify(ckpt: str | Path, accelerator=None) -> Optional[str]:
    """None when `ckpt` holds exactly the files its manifest lists, at their sizes and digests; otherwise what
    is wrong, naming the file (the first problem in the manifest's order). With an `accelerator`, collective:
    rank 0 reads the manifest and stats the files, every rank hashes a share, every rank gets the same answer."""
    ckpt = Path(ckpt)
    rank, ranks = _rank_of(accelerator)
    plan = on_main(accelerator, lambda: _verify_plan(ckpt))
    if isinstance(plan, tuple):  # answered without hashing: cached, or a problem found by stat alone
        return plan[1]
    want = plan["hash"]
    mine: dict[str, str] = {}
    for rel in _deal({rel: size for rel, (size, _) in want.items()}, ranks)[rank]:
        path = ckpt / rel
        try:
            if _sha256(path) != want[rel][1]:
                mine[rel] = f"{path} does not match its SHA-256 in {MANIFEST_FILE} (changed since the save)"
        except OSError as exc:  # removed or unreadable since rank 0's stat: reported, never left uncollected
            mine[rel] = f"{path} could not be read ({exc.strerror or exc})"
    found = {rel: problem for share in _gathered(accelerator, mine) for rel, problem in share.items()}
    answer = next((found.get(rel) or cheap for rel, cheap in plan["order"] if found.get(rel) or cheap), None)
    if rank == 0:
        _verified[plan["key"]] = answer
    return answer


def _verify_plan(ckpt: Path) -> tuple[str, Optional[str]] | dict[str, Any]:
    """Rank 0's half of `verify`: ("answer", problem-or-None) when no digest is needed; otherwise the files to hash
    ({rel: (size, sha256)}), the manifest's file order with each file's problem found by stat (or None), and
    the cache key. Files after the first problem found by stat are not hashed: they cannot be the first problem."""
    files = _files(ckpt)
    stats = [(p, p.stat()) for p in [*files.values(), ckpt / MANIFEST_FILE] if p.is_file()]
    # By file identity, not path: a checkpoint a rollback moved (vkd_dist/lines.py) is not hashed again.
    key = tuple((p.relative_to(ckpt).as_posix(), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) for p, st in stats)
    if key in _verified:
        return "answer", _verified[key]
    manifest = ckpt / MANIFEST_FILE
    try:
        listed = json.loads(manifest.read_text())["files"]
    except FileNotFoundError:
        problem: Optional[str] = f"{manifest} is missing (the save did not finish)"
        _verified[key] = problem
        return "answer", problem
    except (ValueError, KeyError, TypeError) as exc:
        problem = f"{manifest} is unreadable ({exc!r})"
        _verified[key] = problem
        return "answer", problem
    order: list[tuple[str, Optional[str]]] = []
    to_hash: dict[str, tuple[int, str]] = {}
    for rel, want in listed.items():
        path = ckpt / rel
        if rel not in files:
            order.append((rel, f"{path} is missing (expected {want['size']} bytes)"))
            break
        size = files[rel].stat().st_size
        if size != want["size"]:
            order.append((rel, f"{path} has {size} bytes, expected {want['size']} (truncated or changed)"))
            break
        order.append((rel, None))
        to_hash[rel] = (size, want["sha256"])
    else:
        extra = sorted(set(files) - set(listed))
        if extra:
            order.append(("", f"{ckpt / extra[0]} is not in {MANIFEST_FILE} (added after the save)"))
    return {"hash": to_hash, "order": order, "key": key}


# --------------------------------------------------------------------------- resume
def on_main(accelerator, fn: Callable[[], T]) -> T:
    """fn() on the main process only, its result (or its exception, raised on every rank) broadcast to all."""
    if accelerator is None or accelerator.num_processes == 1:
        return fn()
    box: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            box = [(True, fn())]
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            box = [(False, exc)]
    broadcast_object_list(box)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _newest_good(run_dir: Path, accelerator=None) -> Optional[Path]:
    """Collective with an `accelerator`: every rank verifies the same candidates (rank 0's listing) together."""
    dirs, problems = on_main(accelerator, lambda: _step_dirs(run_dir)), []
    for path in reversed(dirs):
        problem = verify(path, accelerator)
        if problem is None:
            return path
        problems.append(problem)
        if _rank_of(accelerator)[0] == 0:
            warnings.warn(f"resume=latest: checkpoint {path.name} skipped: {problem}; trying the one before",
                          RuntimeWarning, stacklevel=3)
    if dirs:  # never silently start afresh: retention would then delete the evidence
        raise CheckpointError(f"resume=latest: none of the {len(dirs)} checkpoints under {run_dir / CKPT_DIR} "
                              f"verifies ({'; '.join(problems)}); move them aside to start afresh")
    return None


def resolve(run_dir: str | Path, which: Optional[str], accelerator=None) -> Optional[Path]:
    """`resume` value -> checkpoint directory: None, 'latest' (the newest that verifies; None if there is none
    yet) or a path (which must verify). With an `accelerator`, collective: every rank hashes a share, all agree.
    First (rank 0) a step left as `.old-step-X` by an interrupted re-save is put back (`_recover`)."""
    if which in (None, ""):
        return None
    on_main(accelerator, lambda: _recover(run_dir))
    if which == "latest":
        return _newest_good(Path(run_dir), accelerator)
    path = Path(which)
    if not on_main(accelerator, lambda: (path / STATE_FILE).is_file()):  # rank 0's look, as for latest
        raise ConfigError(f"resume={which}: {path}: not a checkpoint (no {STATE_FILE})")
    problem = verify(path, accelerator)
    if problem is not None:
        raise CheckpointError(f"resume={which}: not a complete checkpoint: {problem}")
    return path


def load(accelerator, path: Path) -> dict:
    """Collective: restore model, optimizer and RNG states; return train_state.json."""
    # DeepSpeed (and Accelerate, for the RNG and optimizer files) read with torch.load(weights_only=False), which
    # unpickles: the manifest is verified first so that only the files this trainer wrote, complete and unchanged,
    # reach it. (An integrity check, not a signature: whoever can write the run directory can rewrite both.)
    problem = verify(path, accelerator)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} not loaded: {problem}")
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())


# --------------------------------------------------------------------------- save
def _agreed(accelerator, final: Path, fn: Callable[[], T], here: bool = True) -> list[Optional[T]]:
    """fn() where `here`; every rank's result (None where not `here`), in rank order, on every rank. When it
    failed on any rank, every rank raises the same CheckpointError (one rank's full disk must not leave the
    others waiting in the next collective) and the partial save is removed."""
    error, result = None, None
    if here:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - shared, then raised on every rank
            filename = getattr(exc, "filename", None)
            where = f"{filename}, " if filename else ""
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
            error = f"{reason} ({where}rank {accelerator.process_index})"
    gathered = _gathered(accelerator, (error, result))
    errors = [e for e, _ in gathered if e]
    if not errors:
        return [r for _, r in gathered]
    if accelerator.is_main_process:
        shutil.rmtree(final.with_name(f".tmp-{final.name}"), ignore_errors=True)  # frees the space
        _recover(final.parent.parent)  # a re-save that failed between its renames: the old one goes back
    previous = next((d for d in reversed(_step_dirs(final.parent.parent)) if d != final), None)
    intact = f"the previous checkpoint {previous.name} is intact" if previous else "there is no earlier checkpoint"
    raise CheckpointError(f"checkpoint {final.name} not written: {errors[0]}; {intact}")


def _write_state(tmp: Path, state: dict) -> dict[str, int]:
    """Rank 0, once every rank's files are on disk: train_state.json; returns every file's size (what the ranks
    then hash, each its share)."""
    atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=2))
    share_like_parent(tmp)  # a shared group reads the weights too (data.shared_group)
    if delay := os.environ.get("VKD_TEST_SAVE_DELAY_S"):  # test-only: widens the window tests/test_kill.py kills in
        time.sleep(float(delay))
    return _sizes(tmp)


def _hash_share(tmp: Path, sizes: dict[str, int], rank: int, ranks: int) -> dict[str, str]:
    return {rel: _sha256(tmp / rel) for rel in _deal(sizes, ranks)[rank]}


def _commit(tmp: Path, final: Path, files: dict[str, dict]) -> None:
    """Rank 0, once every file is hashed: the manifest (last), then the renames. A step saved before (a re-save
    after a resume) is renamed to .old-step-X, the new one into place, and only then is the old one removed:
    a crash between the two renames leaves .old-step-X without step-X, which `_recover` puts back."""
    write_manifest(tmp, files)
    fsync_path(tmp)
    shutil.rmtree(final.with_name(f"{CONSOLIDATED}{final.name}"), ignore_errors=True)  # the old one's weights
    old = final.with_name(f"{OLD}{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)  # left by a crash after both renames: step-X is the newer one
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def save(accelerator, run_dir: str | Path, step: int, state: dict, keep_last: int,
         also: Optional[Callable[[Path], None]] = None) -> Path:
    """Collective: every rank must call. Returns the final checkpoint directory; raises CheckpointError on every
    rank when any rank could not write its part (the previous checkpoints are then untouched). `also(dir)`: more
    files every rank writes into it beside Accelerate's state (listed and hashed with them)."""
    root = Path(run_dir) / CKPT_DIR
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    _agreed(accelerator, final, lambda: (accelerator.save_state(str(tmp), safe_serialization=True),
                                         also(tmp) if also is not None else None))
    # One process per node flushes what every rank on the node wrote (page caches are per node).
    _agreed(accelerator, final, lambda: fsync_tree(tmp), here=accelerator.is_local_main_process)
    sizes = _agreed(accelerator, final, lambda: _write_state(tmp, {**state, "step": step}),
                    here=accelerator.is_main_process)[0] or {}
    rank, ranks = accelerator.process_index, accelerator.num_processes
    digests = {rel: sha for share in _agreed(accelerator, final, lambda: _hash_share(tmp, sizes, rank, ranks))
               for rel, sha in (share or {}).items()}
    files = {rel: {"size": size, "sha256": digests[rel]} for rel, size in sizes.items()}  # the listing's order
    _agreed(accelerator, final, lambda: _commit(tmp, final, files), here=accelerator.is_main_process)
    if accelerator.is_main_process:
        _recover(run_dir)  # an earlier re-save stopped between its renames: its step goes back, not away
        for stale in _step_dirs(Path(run_dir))[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
            shutil.rmtree(stale.with_name(f"{CONSOLIDATED}{stale.name}"), ignore_errors=True)
        for leftover in [*root.glob(".tmp-step-*"), *root.glob(f"{OLD}step-*")]:  # from a crash in an earlier save
            if leftover.name.startswith(".tmp-") or (root / leftover.name[len(OLD):]).is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
        for cache in root.glob(f"{CONSOLIDATED}step-*"):  # of a step that is gone
            if not (root / cache.name[len(CONSOLIDATED):]).is_dir():
                shutil.rmtree(cache, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
