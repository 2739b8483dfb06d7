"""The rest of an interrupted epoch, read exactly once by another layout (number of processes or data workers).

An epoch's layout (`Layout`: seed, epoch, processes, workers, batch size, shuffle buffer, batches per worker)
fixes which raw samples each (rank, worker) slot reads and in what order: its shards in the order
`shard_order` gives, its quota shuffled by `shuffled`. A checkpoint saves the layout and each slot's count of
raw samples consumed (`reads`). Resumed on the same layout, each worker skips its count (vkd_dist/data/pipeline.py).
Resumed on another, the old slots' unread samples are replayed from the shards' member names alone (no image is
read or decoded), and dealt to the new slots (`RestPlan`): each new rank gets the same number of batches, every
unread sample is read once, none that was consumed is read again. The next epoch starts on the new layout.

A rest epoch is itself a layout (`Layout.rest_of`): resumed mid-way on a third layout, its own rest is replayed
the same way. The cost is one pass over the tar headers of the shards, once, at such a resume.
"""

from __future__ import annotations

import itertools
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Optional

import numpy as np
from webdataset.filters import _shuffle
from webdataset.tariterators import group_by_keys, tar_file_iterator


@dataclass(frozen=True)
class Layout:
    """How an epoch's samples were dealt to (rank, worker) slots: what a resume at another layout replays."""

    epoch: int
    seed: int
    world: int
    workers: int
    batch_size: int
    shuffle_buffer: int
    per_worker: int  # batches per worker in an ordinary epoch
    rest_of: Optional[dict] = None  # {"layout": <Layout dict>, "reads": [[int per worker] per rank]} for a rest epoch

    def same_slots(self, other: Layout) -> bool:
        keys = ("seed", "world", "workers", "batch_size", "shuffle_buffer", "per_worker")
        return all(getattr(self, k) == getattr(other, k) for k in keys)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> Layout:
        return cls(**{k: saved[k] for k in cls.__dataclass_fields__ if k in saved})


def shard_order(n_urls: int, seed: int, epoch: int, rank: int, wid: int, world: int, workers: int) -> Iterator[int]:
    """The shard indices one slot of an ordinary epoch reads, cycled without end: the epoch's permutation of
    the shards dealt to slots, or (fewer shards than slots) draws from all shards."""
    gid, total = rank * workers + wid, world * workers
    perm = np.random.default_rng([seed, epoch]).permutation(n_urls)
    mine = perm[gid::total] if n_urls >= total else None
    rng = np.random.default_rng([seed, epoch, rank, wid, 1])
    while True:
        order = rng.permutation(mine) if mine is not None else rng.choice(n_urls, n_urls)
        yield from (int(i) for i in order)


def shuffled(src: Iterator[Any], quota: int, buffer: int, seed: int, epoch: int, rank: int, wid: int) -> Iterator[Any]:
    """A slot's raw samples in the order it reads them: its epoch quota through the shuffle buffer, then (should
    corrupt samples leave the epoch short) the ones after, unshuffled. Seeded by the slot, so replayable."""
    if buffer <= 1:
        return src
    head = itertools.islice(src, quota)
    return itertools.chain(_shuffle(head, buffer, min(buffer, 100), rng=random.Random(f"{seed}-{epoch}-{rank}-{wid}")),
                           src)


@lru_cache(maxsize=4096)
def shard_keys(url: str) -> tuple[str, ...]:
    """The sample keys of a tar shard in the order webdataset yields them, read from the member names only."""
    names: list[str] = []

    def record(fname: str) -> bool:
        names.append(fname)
        return False  # never read the member's data

    try:
        with open(url, "rb") as fh:
            for _ in tar_file_iterator(fh, select_files=record):
                pass
    except (OSError, tarfile.TarError):  # an unreadable shard: the samples before the damage, as the reader sees
        pass
    members = ({"fname": name, "data": b"", "__url__": url} for name in names)
    return tuple(sample["__key__"] for sample in group_by_keys(members))


@dataclass
class RestPlan:
    """The unread samples of an interrupted epoch dealt to the slots of a new layout: per rank, per worker, the
    (url, key) pairs it reads and the sizes of the batches it makes of them. Every rank makes the same number of
    batches, so every rank takes the same number of steps."""

    layout: Layout
    slots: dict = field(default_factory=dict)  # (rank, wid) -> list of (url, key)
    sizes: dict = field(default_factory=dict)  # (rank, wid) -> list of batch sizes

    @property
    def batches_per_rank(self) -> int:
        return sum(len(self.sizes.get((0, w), [])) for w in range(self.layout.workers))

    @property
    def num_samples(self) -> int:
        return sum(len(v) for v in self.slots.values())

    def urls(self, rank: int, wid: int) -> list[str]:
        """The shards the slot reads, in order: each once per copy of a sample it takes from it (an ordinary epoch
        cycles a slot's shards, so its rest may hold a sample twice)."""
        copies = Counter(self.slots.get((rank, wid), []))
        passes = Counter({url: 0 for url, _ in copies})
        for (url, _), n in copies.items():
            passes[url] = max(passes[url], n)
        return [url for p in range(max(passes.values(), default=0)) for url in passes if passes[url] > p]

    def wanted(self, rank: int, wid: int) -> Counter:
        """(url, key) -> copies still to take: `take` counts them down as the slot reads its shards."""
        return Counter(self.slots.get((rank, wid), []))


def take(samples: Iterable[Any], wanted: Counter, url_key: Callable[[Any], tuple[str, str]]) -> Iterator[Any]:
    """The samples a rest slot keeps, in the order its shards yield them: each (url, key) as often as wanted."""
    for sample in samples:
        uk = url_key(sample)
        if wanted[uk] > 0:
            wanted[uk] -= 1
            yield sample


def deal(items: Sequence[tuple[str, str]], layout: Layout) -> RestPlan:
    """Contiguous chunks of `items` to ranks (sizes within one of each other); each rank's chunk in `k` batches
    (the same k on every rank, sizes within one of each other), the batches dealt to workers in turn."""
    world, workers = layout.world, layout.workers
    bounds = [len(items) * r // world for r in range(world + 1)]
    k = -(-len(items) // (world * layout.batch_size))  # batches per rank: ceil(the largest chunk / batch size)
    plan = RestPlan(layout)
    for rank in range(world):
        chunk = items[bounds[rank]:bounds[rank + 1]]
        if len(chunk) < k:
            raise ValueError(f"the rest of epoch {layout.epoch} ({len(items)} samples) is too small to give each of "
                             f"{world} processes {k} batches")
        edges = [len(chunk) * j // k for j in range(k + 1)]
        for j in range(k):
            wid = j % workers
            plan.slots.setdefault((rank, wid), []).extend(chunk[edges[j]:edges[j + 1]])
            plan.sizes.setdefault((rank, wid), []).append(edges[j + 1] - edges[j])
    return plan


def slot_order(layout: Layout, urls: Sequence[str], rank: int, wid: int,
               plan: Optional[RestPlan] = None) -> list[tuple[str, str]]:
    """The (url, key) pairs slot (rank, wid) of `layout` reads in its epoch, in order (its quota only). For a rest
    epoch, `plan` is its plan (`rest_plan(layout)`), computed here when not given."""
    if layout.rest_of is None:
        def raw() -> Iterator[tuple[str, str]]:
            for i in shard_order(len(urls), layout.seed, layout.epoch, rank, wid, layout.world, layout.workers):
                yield from ((urls[i], key) for key in shard_keys(urls[i]))
        quota = layout.per_worker * layout.batch_size
    else:
        plan = plan or rest_plan(layout, urls)

        def raw() -> Iterator[tuple[str, str]]:
            every = ((url, key) for url in plan.urls(rank, wid) for key in shard_keys(url))
            yield from take(every, plan.wanted(rank, wid), lambda uk: uk)
        quota = len(plan.slots.get((rank, wid), []))
    order = shuffled(raw(), quota, layout.shuffle_buffer, layout.seed, layout.epoch, rank, wid)
    return list(itertools.islice(order, quota))


def unread(layout: Layout, reads: Sequence[Sequence[int]], urls: Sequence[str]) -> list[tuple[str, str]]:
    """What the slots of `layout` had still to read in its epoch, having consumed `reads[rank][wid]` raw samples."""
    plan = rest_plan(layout, urls) if layout.rest_of is not None else None  # once for every slot
    rest: list[tuple[str, str]] = []
    for rank in range(layout.world):
        for wid in range(layout.workers):
            rest.extend(slot_order(layout, urls, rank, wid, plan)[int(reads[rank][wid]):])
    return rest


def rest_plan(layout: Layout, urls: Sequence[str]) -> RestPlan:
    """The plan of a rest epoch's layout: the rest of the epoch it was made from, dealt to its slots."""
    assert layout.rest_of is not None
    return plan_rest(Layout.from_dict(layout.rest_of["layout"]), layout.rest_of["reads"], urls, layout)


def plan_rest(old: Layout, reads: Sequence[Sequence[int]], urls: Sequence[str], new: Layout) -> RestPlan:
    if len(reads) != old.world or any(len(row) != old.workers for row in reads):
        raise ValueError(f"the checkpoint's data position has {len(reads)} rank rows for {old.world} processes x "
                         f"{old.workers} workers: it does not describe its own layout")
    return deal(unread(old, reads, urls), new)
