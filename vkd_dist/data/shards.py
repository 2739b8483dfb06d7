"""Shard writing shared by every source: planned shards, parallel, atomic, resumable, deterministic.

A split's items are cut into shards of `samples_per_shard` planned items. Each shard is built by one
worker process from its items alone, written to a temporary name and renamed into place, with a small
progress record beside it. A rerun keeps every shard whose record exists and rebuilds the rest, so an
interrupted conversion resumes and the same inputs always give byte-identical tars.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Optional, Union

import webdataset as wds
from tqdm import tqdm

from vkd_dist.data.schema import (
    Record,
    Reject,
    add_label_counts,
    empty_label_counts,
    shard_name,
    to_sample,
    write_dataset_json,
)
from vkd_dist.fileio import atomic_write_text
from vkd_dist.labels import LABELS, EvalPolicy, LabelPolicy

MakeRecord = Callable[[Any], Union[Record, Reject]]
PROGRESS_DIR = ".progress"


@dataclass
class SplitResult:
    shards: list = field(default_factory=list)  # [{"name", "num_samples"}]
    rejects: list = field(default_factory=list)  # [Reject]
    label_counts: dict = field(default_factory=empty_label_counts)  # of the labelled studies
    num_unlabelled: int = 0  # studies with a report but no labels
    kept: int = 0  # shards found finished by an earlier run

    @property
    def num_samples(self) -> int:
        return sum(s["num_samples"] for s in self.shards)


def _progress_path(out_dir: Path, split: str, index: int) -> Path:
    return out_dir / PROGRESS_DIR / f"{split}-{index:06d}.json"


def _write_shard(job: tuple) -> dict:
    out_dir, split, index, items, make_record, fmt, fingerprint, labels = job
    tar_path = out_dir / split / shard_name(index)
    # Streamed to a temporary name (atomic_write_bytes would need the whole tar in memory), renamed when complete.
    tmp_path = tar_path.with_name(f".tmp-{tar_path.name}")
    counts, rejects, n, unlabelled = empty_label_counts(labels), [], 0, 0
    with wds.TarWriter(str(tmp_path), mtime=0) as sink:  # an int: a float mtime adds a PAX header per member
        for item in items:
            try:
                rec = make_record(item)
            except Exception as exc:  # a converter bug or bad item must cost one item, not the run
                rec = Reject(split=split, item_id=str(item)[:200], reason=f"error: {type(exc).__name__}: {exc}")
            if isinstance(rec, Reject):
                rejects.append(rec.__dict__)
                continue
            sample = to_sample(rec, fmt, labels)
            sink.write(sample)
            if rec.labelled:
                add_label_counts(counts, json.loads(sample["json"])["labels"])
            else:
                unlabelled += 1
            n += 1
    os.replace(tmp_path, tar_path)
    progress = {"fingerprint": fingerprint, "name": tar_path.name, "num_samples": n, "label_counts": counts,
                "num_unlabelled": unlabelled, "rejects": rejects}
    atomic_write_text(_progress_path(out_dir, split, index), json.dumps(progress))
    return progress


def write_split(out_dir: Path, split: str, items: Sequence, make_record: MakeRecord, *,
                samples_per_shard: int = 1000, workers: int = 1, fmt: str = "jpg",
                progress: bool = True, fingerprint: str = "", labels: Sequence[str] = LABELS) -> SplitResult:
    """Write `items` of one split as shards; `make_record(item)` returns a Record or a Reject.

    `fingerprint` identifies the inputs and parameters: a finished shard is kept on a rerun only when
    its fingerprint matches, so changed parameters never mix with old shards."""
    out_dir = Path(out_dir)
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    (out_dir / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    chunks = [items[i: i + samples_per_shard] for i in range(0, len(items), samples_per_shard)]
    result = SplitResult(label_counts=empty_label_counts(labels))
    done: dict[int, dict] = {}
    jobs = []
    for index, chunk in enumerate(chunks):
        ppath = _progress_path(out_dir, split, index)
        record = json.loads(ppath.read_text()) if ppath.is_file() else None
        if record and record.get("fingerprint") == fingerprint and (out_dir / split / shard_name(index)).is_file():
            done[index] = record
        else:
            jobs.append((out_dir, split, index, chunk, make_record, fmt, fingerprint, tuple(labels)))
    result.kept = len(done)
    bar = tqdm(total=len(chunks), initial=len(done), desc=f"{split} shards", unit="shard",
               disable=not progress, leave=False)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("fork")) as pool:
            for job, res in zip(jobs, pool.map(_write_shard, jobs)):
                done[job[2]] = res
                bar.update()
    else:
        for job in jobs:
            done[job[2]] = _write_shard(job)
            bar.update()
    bar.close()
    for stale in sorted((out_dir / split).glob("shard-*.tar"))[len(chunks):]:  # from a larger earlier run
        stale.unlink()
    for index in sorted(done):
        res = done[index]
        result.shards.append({"name": res["name"], "num_samples": res["num_samples"]})
        result.rejects.extend(Reject(**r) for r in res["rejects"])
        result.num_unlabelled += res.get("num_unlabelled", 0)
        for name, c in res["label_counts"].items():
            for k, v in c.items():
                result.label_counts[name][k] += v
    return result


def finish_dataset(out_dir: Path, results: dict[str, SplitResult], params: dict, source: str,
                   extra_rejects: Iterable[Reject] = (), labels: Sequence[str] = LABELS,
                   eval_policy: Optional[EvalPolicy] = None, train_policy: Optional[LabelPolicy] = None) -> dict:
    """Write rejects.csv and dataset.json for the splits written by `write_split`."""
    out_dir = Path(out_dir)
    rejects = [*extra_rejects, *(r for res in results.values() for r in res.rejects)]
    with open(out_dir / "rejects.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["split", "item_id", "path", "reason"])
        for r in rejects:
            writer.writerow([r.split, r.item_id, r.path, r.reason])
    by_reason: dict[str, int] = {}
    for r in rejects:
        kind = r.reason.split(":", 1)[0]
        by_reason[kind] = by_reason.get(kind, 0) + 1
    splits = {name: {"num_samples": res.num_samples, "shards": res.shards, "num_unlabelled": res.num_unlabelled}
              for name, res in results.items()}
    return write_dataset_json(out_dir, splits, len(rejects), params, source,
                              {name: res.label_counts for name, res in results.items()}, by_reason, labels,
                              eval_policy, train_policy)


def summary_line(meta: dict, seconds: Optional[float] = None) -> str:
    parts = [f"{name}: {s['num_samples']} samples in {len(s['shards'])} shards"
             + (f" ({s['num_unlabelled']} without labels)" if s.get("num_unlabelled") else "")
             for name, s in meta["splits"].items()]
    took = f" in {seconds:.1f}s" if seconds is not None else ""
    return f"wrote {'; '.join(parts)}; {meta['rejects']} rejected{took}"


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
