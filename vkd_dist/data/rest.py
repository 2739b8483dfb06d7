"""The rest of an interrupted epoch, read exactly once by another layout (number of processes or data workers).

An epoch's layout (`Layout`: seed, epoch, processes, workers, batch size, shuffle buffer, batches per worker)
fixes which raw samples each (rank, worker) slot reads and in what order: its shards in the order
`shard_order` gives, its quota shuffled by `shuffled`. A checkpoint saves the layout and each slot's count of
raw samples consumed (`reads`). Resumed on the same layout, each worker skips its count (vkd_dist/data/pipeline.py).
Resumed on another, the old slots' unread samples are replayed from the shards' member names alone (no image is
read or decoded), and dealt to the new slots (`RestPlan`): each new rank gets the same number of batches, every
unread sample is read once, none that was consumed is read again. The next epoch starts on the new layout.

Dealing (`deal`): every rank makes the same number of batches, none empty, their sizes within one of each other
and at most the batch size, so one step means the same on every rank and nothing runs out of memory. Two rests
cannot be dealt that way, and each has the one answer that reads every sample once in equal steps:
- fewer samples than processes (a rank would get nothing): the rest is read together with the next epoch, as one
  rest epoch numbered like the next (`rest_of["with_next"]`); the epoch after it is the new layout's own;
- at batch size 1, a rest that does not divide over the processes: the ranks with one sample more than the others
  make one batch of 2 (equal steps and every sample once leave no other way).
An empty rest (a checkpoint at the epoch's end) deals nothing: the next epoch starts on the new layout.

A rest epoch is itself a layout (`Layout.rest_of`): resumed mid-way on a third layout, its own rest is replayed
the same way. The replay reads the shards' tar headers only, seeking over every member's data
(`shard_members`), once per resume: the main process computes it and every rank receives it (`shared` in
pipeline.TrainStream.resume).
"""

from __future__ import annotations

import itertools
import random
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from typing import Any, Optional

import numpy as np
from webdataset.filters import _shuffle
from webdataset.tariterators import group_by_keys, meta_prefix, meta_suffix


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
        return {f.name: getattr(self, f.name) for f in fields(self)}  # rest_of as it is: no deep copy of reads

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


SKIP_META = r"__[^/]*__($|/)"  # webdataset's tar_file_iterator: members it never yields
COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz: tarfile's "r|*" opens them, seeking cannot


@lru_cache(maxsize=4096)
def shard_members(url: str) -> tuple[tuple[str, ...], bool]:
    """The names of the members webdataset's tar reader yields from a shard, in order, and whether it reaches the
    shard's end (else its last sample stays open into the next shard, as webdataset's grouping does after an
    error). Read from the tar headers only: each member's data is seeked over, never read.

    As the reader (tar_file_iterator, stream mode): it yields the regular files that are not metadata, reading
    each one's data; a member whose data the file cuts short fails there, and that ends the shard (the next
    header cannot be reached), as does any header tarfile cannot read. A compressed shard cannot be seeked: its
    members are read through."""
    names: list[str] = []
    try:
        with open(url, "rb", buffering=0) as fh:  # unbuffered: a 512-byte header costs 512 bytes, not a block
            streamed = fh.read(6).startswith(COMPRESSED)
            end = fh.seek(0, 2)
            fh.seek(0)
            with tarfile.open(fileobj=fh, mode="r|*" if streamed else "r:") as tar:
                for info in iter(tar.next, None):
                    if _yielded(info):
                        if streamed:
                            tar.extractfile(info).read()  # type: ignore[union-attr]  # raises if cut short
                        elif info.offset_data + info.size > end:
                            return tuple(names), False
                        names.append(info.name)
                    tar.members = []  # type: ignore[attr-defined]  # a shard of 10^5 members need not keep them
    except (OSError, tarfile.TarError):
        return tuple(names), False
    return tuple(names), True


def _yielded(info: tarfile.TarInfo) -> bool:
    name = info.name
    return (info.isreg() and name is not None
            and not ("/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix))
            and not re.match(SKIP_META, name))


def _duplicate_member(exc: Exception) -> bool:
    """group_by_keys' handler: a second member of the same name in a sample is dropped, as the reader's handler
    drops it (faults.SkipLedger.shard_failed); anything else is a bug."""
    if isinstance(exc, ValueError):
        return True
    raise exc


def samples_of(urls: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(url, key) of each sample webdataset's reader yields from `urls` read one after another (one
    tarfile_to_samples stream: a shard that ends in an error leaves its last sample open to the next one)."""
    def members() -> Iterator[dict]:
        for url in urls:
            names, whole = shard_members(url)
            yield from ({"fname": name, "data": b"", "__url__": url} for name in names)
            if whole:
                yield {}  # tar_file_expander's end-of-shard marker

    for sample in group_by_keys(members(), handler=_duplicate_member):
        yield sample["__url__"], sample["__key__"]


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


def batches_per_rank(samples: int, world: int, batch_size: int) -> int:
    """How many batches each rank makes of `samples` (at least one per rank, or none at all) dealt over `world`
    ranks: as few as the largest share needs at `batch_size`, but never more than the smallest share holds (a
    batch is never empty). The two bounds cross only at batch size 1 with an uneven share: then the larger shares
    make one batch of 2 (equal steps and every sample read once leave no other way)."""
    if samples < world:
        if samples:
            raise ValueError(f"{samples} sample(s) cannot give each of {world} processes a batch: read them with "
                             "the next epoch (rest_layout)")
        return 0
    smallest, largest = samples // world, -(-samples // world)
    return min(smallest, -(-largest // batch_size))


def deal(items: Sequence[tuple[str, str]], layout: Layout) -> RestPlan:
    """Contiguous chunks of `items` to ranks (sizes within one of each other); each rank's chunk in the same
    number of batches (`batches_per_rank`; sizes within one of each other across every rank), the batches dealt
    to workers in turn."""
    world, workers = layout.world, layout.workers
    k = batches_per_rank(len(items), world, layout.batch_size)
    bounds = [len(items) * r // world for r in range(world + 1)]
    plan = RestPlan(layout)
    cut: dict[int, list[tuple[list[int], list[tuple[int, int]]]]] = {}  # chunk length -> per worker: sizes, spans
    for rank in range(world if k else 0):
        chunk = list(items[bounds[rank]:bounds[rank + 1]])
        if len(chunk) not in cut:  # two lengths at most: the same cut for every rank of a length
            edges = (np.arange(k + 1) * len(chunk) // k).tolist()
            cut[len(chunk)] = [([edges[j + 1] - edges[j] for j in range(wid, k, workers)],
                                [(edges[j], edges[j + 1]) for j in range(wid, k, workers)])
                               for wid in range(min(workers, k))]  # batch j to worker j % workers
        for wid, (sizes, spans) in enumerate(cut[len(chunk)]):
            plan.sizes[(rank, wid)] = list(sizes)
            plan.slots[(rank, wid)] = chunk if workers == 1 else list(itertools.chain.from_iterable(
                chunk[a:b] for a, b in spans))
    return plan


def slot_order(layout: Layout, urls: Sequence[str], rank: int, wid: int,
               plan: Optional[RestPlan] = None) -> list[tuple[str, str]]:
    """The (url, key) pairs slot (rank, wid) of `layout` reads in its epoch, in order (its quota only). For a rest
    epoch, `plan` is its plan (`rest_plan(layout)`), computed here when not given."""
    if layout.rest_of is None:
        order = shard_order(len(urls), layout.seed, layout.epoch, rank, wid, layout.world, layout.workers)
        raw = samples_of(urls[i] for i in order)
        quota = layout.per_worker * layout.batch_size
    else:
        plan = plan or rest_plan(layout, urls)
        raw = take(samples_of(plan.urls(rank, wid)), plan.wanted(rank, wid), lambda uk: uk)
        quota = len(plan.slots.get((rank, wid), []))
    shuffled_raw = shuffled(raw, quota, layout.shuffle_buffer, layout.seed, layout.epoch, rank, wid)
    return list(itertools.islice(shuffled_raw, quota))


def unread(layout: Layout, reads: Sequence[Sequence[int]], urls: Sequence[str]) -> list[tuple[str, str]]:
    """What the slots of `layout` had still to read in its epoch, having consumed `reads[rank][wid]` raw samples."""
    if len(reads) != layout.world or any(len(row) != layout.workers for row in reads):
        raise ValueError(f"the checkpoint's data position has {len(reads)} rank rows for {layout.world} processes x "
                         f"{layout.workers} workers: it does not describe its own layout")
    plan = rest_plan(layout, urls) if layout.rest_of is not None else None  # once for every slot
    rest: list[tuple[str, str]] = []
    for rank in range(layout.world):
        for wid in range(layout.workers):
            rest.extend(slot_order(layout, urls, rank, wid, plan)[int(reads[rank][wid]):])
    return rest


def rest_layout(saved: Layout, reads: Sequence[Sequence[int]], here: Layout, rest: int) -> Layout:
    """The layout that reads the `rest` samples `saved`'s slots left unread (having read `reads`) on `here`'s
    slots: a rest epoch numbered like `saved`'s, or, when the rest is too small to give every process a sample,
    numbered like the next one and reading that epoch too (`with_next`; see the module's docstring)."""
    made_from = {"layout": saved.to_dict(), "reads": [[int(n) for n in row] for row in reads]}
    if 0 < rest < here.world:
        return replace(here, epoch=saved.epoch + 1, rest_of={**made_from, "with_next": True})
    return replace(here, epoch=saved.epoch, rest_of=made_from)


def plan_items(layout: Layout, urls: Sequence[str], rest: Optional[list] = None) -> list[tuple[str, str]]:
    """What a rest epoch's layout deals, in order: the rest of the epoch it was made from (`rest`, when already
    replayed), then, `with_next`, every sample of the next epoch as `layout`'s own slots would read it."""
    assert layout.rest_of is not None
    made_from = layout.rest_of
    items = rest if rest is not None else unread(Layout.from_dict(made_from["layout"]), made_from["reads"], urls)
    if made_from.get("with_next"):
        untouched = [[0] * layout.workers for _ in range(layout.world)]
        items = items + unread(replace(layout, rest_of=None), untouched, urls)
    return items


def rest_plan(layout: Layout, urls: Sequence[str]) -> RestPlan:
    """The plan of a rest epoch's layout, replayed from the shards."""
    return deal(plan_items(layout, urls), layout)


def rest_epoch(saved: Layout, reads: Sequence[Sequence[int]], here: Layout,
               urls: Sequence[str]) -> tuple[RestPlan, int]:
    """The plan that reads on `here`'s slots what `saved`'s left unread, and how many of its samples are that rest
    (the others, `with_next`, the next epoch's)."""
    rest = unread(saved, reads, urls)
    layout = rest_layout(saved, reads, here, len(rest))
    return deal(plan_items(layout, urls, rest), layout), len(rest)
