"""The rest of an interrupted epoch (vkd_dist/data/rest.py), without images: the dealing as a pure function over
thousands of random layouts and chains of resizes (hypothesis), the key replay against webdataset's own reader
on shards cut at every offset, and TrainStream.resume at 256 to 1024 simulated ranks over shards of empty
members. The same property with real images and DataLoader workers: tests/test_pipeline.py; end to end across
processes: tests/test_world_size.py."""

import gzip
import io
import itertools
import math
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vkd_dist.data import rest as rest_module
from vkd_dist.data.faults import SkipLedger
from vkd_dist.data.pipeline import TrainStream
from vkd_dist.data.rest import Layout, RestPlan, deal, rest_layout, samples_of, shard_members, slot_order, unread

MAX_REST = 10**5


# --------------------------------------------------------------------------- the dealing, pure
def _layout(world: int, workers: int, batch: int, epoch: int = 0, per_worker: int = 1) -> Layout:
    return Layout(epoch, 0, world, max(1, workers), batch, 16, per_worker)  # num_workers=0 reads as one slot


def _check(plan: RestPlan, items: list) -> None:
    """The plan deals `items` (distinct) exactly; every rank makes the same number of batches, none empty, sizes
    within one of each other and at most the batch size (2 at batch size 1); a rank's batches go to its workers
    in turn (batch j to worker j % workers, as DataLoader takes them)."""
    layout, k = plan.layout, plan.batches_per_rank
    dealt = list(itertools.chain.from_iterable(plan.slots.values()))
    assert len(dealt) == len(items) and set(dealt) == set(items)  # distinct items: the same multiset
    assert (k > 0) == bool(items)
    assert set(plan.sizes) == {(r, w) for r in range(layout.world) for w in range(min(k, layout.workers))}
    for (rank, wid), sizes in plan.sizes.items():
        assert len(sizes) == len(range(wid, k, layout.workers)) and sum(sizes) == len(plan.slots[(rank, wid)])
    sizes = {s for v in plan.sizes.values() for s in v}
    if sizes:
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        assert max(sizes) <= max(layout.batch_size, 2)


class _Epochs:
    """A model of what an ordinary epoch of a layout reads: fresh items (distinct ints), as many as train_loader's
    quota for a data set of `samples` (per_worker batches of batch_size per slot)."""

    def __init__(self, samples: int, start: int):
        self.samples, self.made = samples, start

    def per_worker(self, world: int, workers: int, batch: int) -> int:
        return max(1, math.ceil(self.samples / (batch * world * workers)))

    def of(self, layout: Layout) -> list:
        n = layout.world * layout.workers * layout.per_worker * layout.batch_size
        self.made += n
        return list(range(self.made - n, self.made))


def _resume(rest: list, saved: Layout, here: Layout, epochs: _Epochs) -> tuple[RestPlan, list]:
    """What TrainStream.resume deals on `here` (rest.rest_epoch with the shards modelled): the plan and its items."""
    reads = [[0] * saved.workers for _ in range(saved.world)]
    layout = rest_layout(saved, reads, here, len(rest))
    assert layout.epoch == saved.epoch + (0 < len(rest) < here.world)
    items = rest + (epochs.of(Layout(**{**layout.to_dict(), "rest_of": None})) if layout.epoch > saved.epoch
                    else [])
    return deal(items, layout), items


def _consumed(plan: RestPlan, steps: int) -> tuple[list, list]:
    """Every rank takes `steps` batches (DataLoader takes them from the workers in turn): what was read, and what
    each slot has left."""
    taken, left = [], []
    for slot, items in plan.slots.items():
        n = sum(plan.sizes[slot][:len(range(slot[1], steps, plan.layout.workers))])
        taken += items[:n]
        left += items[n:]
    return taken, left


def scales(lo: int, hi: int) -> st.SearchStrategy[int]:
    """lo..hi, every power of two as likely as the next (1, 2-3, 4-7, ...): the small layouts, where the edge
    cases are, are tried as often as the large ones, whose examples cost the most."""
    return st.integers(lo.bit_length(), hi.bit_length()).flatmap(
        lambda b: st.integers(max(lo, (1 << b) >> 1), min(hi, (1 << b) - 1)))


layouts = st.tuples(scales(1, 1024), st.integers(0, 8), scales(1, 64))  # processes, data workers, batch size


@settings(max_examples=1000, deadline=None, derandomize=True)  # ~15 s of CPU: the large layouts cost the most
@given(rest=scales(0, MAX_REST), old=layouts, hops=st.lists(st.tuples(layouts, st.floats(0, 1)), min_size=1,
                                                             max_size=3), samples=scales(1, MAX_REST))
@example(rest=2, old=(1, 0, 2), hops=[((4, 0, 2), 1.0)], samples=64)  # the rest smaller than the processes
@example(rest=5, old=(1, 0, 1), hops=[((2, 0, 1), 1.0)], samples=64)  # batch size 1, uneven
@example(rest=7, old=(1, 0, 4), hops=[((8, 0, 4), 1.0)], samples=64)
@example(rest=0, old=(2, 0, 8), hops=[((1, 0, 8), 1.0)], samples=64)  # nothing unread: a checkpoint at the end
@example(rest=57, old=(1, 0, 1), hops=[((2, 0, 1), 0.5), ((3, 2, 1), 0.9), ((1024, 8, 64), 1.0)], samples=100)
def test_every_rest_is_dealt_exactly_in_equal_steps_through_chains_of_resizes(rest, old, hops, samples):
    """1-1024 processes x 0-8 workers x batch 1-64, rests of 0 to 10^5 samples, one to three resizes, each
    interrupted after a random share of its steps: each plan deals its items exactly in equal steps, nothing
    raises, and what was read plus what is left is the rest plus the next epochs that small rests were read with."""
    epochs = _Epochs(samples, start=rest)
    saved = _layout(*old)
    left = list(range(rest))
    owed, read = len(left), []
    for (world, workers, batch), share in hops:
        here = _layout(world, workers, batch, per_worker=epochs.per_worker(world, max(1, workers), batch))
        plan, items = _resume(left, saved, here, epochs)
        _check(plan, items)
        taken, left = _consumed(plan, round(share * plan.batches_per_rank))
        read += taken
        saved = plan.layout
    owed = epochs.made  # the rest's items and every next epoch's: 0 .. made-1, each once
    assert len(read) + len(left) == owed and set(read) | set(left) == set(range(owed))


# --------------------------------------------------------------------------- the key replay
def _tar(path: Path, members: list[tuple[str, bytes]], directory: bool = False) -> Path:
    with tarfile.open(path, "w") as tf:
        if directory:
            tf.addfile(_dir("d"))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def _reader(urls: list) -> list[tuple[str, str]]:
    """What the training stream's reader yields: webdataset's tarfile_to_samples with the stream's handler."""
    samples = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=SkipLedger(1.0).shard_failed))
    return [(s["__url__"], s["__key__"]) for s in samples]


def _replay(urls: list) -> list[tuple[str, str]]:
    shard_members.cache_clear()  # the files change under the same names here
    return list(samples_of(urls))


MEMBERS = [("a.jpg", b"x" * 700), ("a.txt", b"report a"), ("__meta__", b"m"), ("noext", b"n"),
           ("b.jpg", b"y" * 1500), ("b.txt", b"report b"), ("b.jpg", b"again"),  # a duplicate member name
           ("c.JPG", b"z" * 30), ("c.json", b"{}"), ("d.jpg", b"w" * 512), ("d.txt", b"report d")]


def test_the_key_replay_yields_what_the_reader_yields_from_a_shard_cut_anywhere(tmp_path):
    """No phantom sample for a key whose first member was cut, the partial sample of a key cut in a later member
    (the reader yields it), a duplicate member name dropped (not raised), metadata, directories and names without
    an extension left out; a cut shard followed by another (its last sample stays open into the next shard)."""
    whole = _tar(tmp_path / "whole.tar", MEMBERS, directory=True)
    data = whole.read_bytes()
    after = _tar(tmp_path / "after.tar", [("e.jpg", b"e"), ("e.txt", b"e")])
    assert [k for _, k in _replay([str(whole)])] == ["a", "b", "c", "d"] == [k for _, k in _reader([str(whole)])]
    cuts = sorted({*range(0, len(data), 97), *(b + d for b in range(0, len(data), 512) for d in (-1, 0, 1))})
    cut = tmp_path / "cut.tar"
    phantom_checked = False
    for size in (c for c in cuts if 0 <= c < len(data)):
        cut.write_bytes(data[:size])
        for urls in ([str(cut)], [str(cut), str(after)], [str(cut), str(cut)]):
            assert _replay(urls) == _reader(urls), (size, urls)
        phantom_checked |= 3072 < size < 3072 + 512 + 1500  # inside b.jpg's data, b's first member
    assert phantom_checked
    cut.write_bytes(data[:3072 + 512 + 100])
    assert [k for _, k in _replay([str(cut)])] == ["a"]  # b's first member is cut: no b


def test_the_key_replay_reads_the_tar_headers_only(tmp_path, monkeypatch):
    """Member data is seeked over: 40 samples of 100 KB cost their headers (two 512-byte blocks each, about 1 %
    of the shard), not the shard."""
    members = [(f"k{i:03d}.{ext}", bytes(50_000)) for i in range(40) for ext in ("jpg", "txt")]
    shard = _tar(tmp_path / "big.tar", members)
    read = []

    class Counted(io.FileIO):
        def read(self, size=-1):
            data = super().read(size)
            read.append(len(data))
            return data

        def readinto(self, buffer):
            n = super().readinto(buffer)
            read.append(n or 0)
            return n

    monkeypatch.setattr(rest_module, "open", lambda path, mode, buffering: Counted(path, "rb"), raising=False)
    assert [k for _, k in _replay([str(shard)])] == [f"k{i:03d}" for i in range(40)]
    assert sum(read) < 0.015 * shard.stat().st_size, (sum(read), shard.stat().st_size)


def test_a_compressed_shard_is_replayed_by_reading_it_through(tmp_path):
    plain = _tar(tmp_path / "plain.tar", MEMBERS)
    packed = tmp_path / "packed.tar.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert [k for _, k in _replay([str(packed)])] == ["a", "b", "c", "d"] == [k for _, k in _reader([str(packed)])]
    packed.write_bytes(gzip.compress(plain.read_bytes())[:900])
    assert _replay([str(packed)]) == _reader([str(packed)])


# --------------------------------------------------------------------------- TrainStream.resume, many ranks
@pytest.fixture(scope="module")
def empty_shards(tmp_path_factory) -> list:
    """64 shards of 64 samples whose members are empty: the replay needs names only."""
    root = tmp_path_factory.mktemp("empty-shards")
    return [str(_tar(root / f"shard-{s:03d}.tar", [(f"s{s:03d}-{i:03d}.{ext}", b"") for i in range(64)
                                                  for ext in ("jpg", "txt")])) for s in range(64)]


SAMPLES = 64 * 64


def _streams(urls: list, world: int, workers: int, batch: int) -> list[TrainStream]:
    """`world` simulated ranks' streams as train_loader lays them out (no loader: nothing is decoded)."""
    per_worker = max(1, math.ceil(SAMPLES / (batch * world * workers)))
    layout = Layout(0, 11, world, workers, batch, 16, per_worker)
    return [TrainStream(None, None, per_worker * workers, layout, urls, rank) for rank in range(world)]


def _take(streams: list[TrainStream], urls: list, epoch: int, steps: int) -> tuple[list, Counter]:
    """Each rank takes `steps` batches of `epoch` (all of them if more), as its DataLoader does (workers in
    turn, each slot reading slot_order): what a checkpoint then saves, and the keys read."""
    first = streams[0]
    layout, plan = first.layout(epoch), first.rest.active(epoch)
    reads, keys = [], Counter()
    lengths = set()
    for stream in streams:
        row = []
        sizes = {w: stream.rest.batch_sizes(epoch, stream.layout_, stream.rank, w) for w in range(stream.workers)}
        lengths.add(sum(len(s) for s in sizes.values()))
        for w in range(stream.workers):
            n = sum(sizes[w][:len(range(w, steps, stream.workers))])
            order = slot_order(layout, urls, stream.rank, w, plan)
            keys.update(order[:n])
            row.append(n)
        reads.append(row)
    assert len(lengths) == 1, lengths  # every rank takes the same number of steps
    return reads, keys


class _Broadcast:
    """TrainStream.resume's `shared` for simulated ranks: the first (the main process) computes, every other
    receives its result, as run.build_run's broadcast from rank 0."""

    def __init__(self):
        self.computed, self.value = 0, None

    def __call__(self, fn):
        if not self.computed:
            self.computed, self.value = 1, fn()
        return self.value


@pytest.mark.parametrize("hops", [
    [(256, 2, 4, 3), (300, 1, 4, 5), (257, 3, 1, None)],  # three layouts, interrupted mid-way twice
    [(256, 2, 4, 3), (300, 1, 1, -1), (1024, 1, 1, None)],  # a rest of 300 on 1024 ranks: read with epoch 1
    [(256, 1, 2, None), (512, 2, 8, None)],  # interrupted at the epoch's end: nothing unread
], ids=["256x2->300x1->257x3", "300-left-on-1024", "at-the-end"])
def test_the_rest_is_read_exactly_once_at_hundreds_of_ranks(empty_shards, hops):
    """TrainStream.resume on every simulated rank, its replay computed once for all (`shared`, as rank 0's
    broadcast): the interrupted epoch is read once in all, none twice, none left out, in equal steps on every
    rank; a rest too small for the ranks is read with the next epoch, and that epoch once too."""
    urls = empty_shards
    world, workers, batch, steps = hops[0]
    streams = _streams(urls, world, workers, batch)
    expected = Counter(unread(streams[0].layout(1), [[0] * workers] * world, urls))
    reads, seen = _take(streams, urls, 1, steps if steps is not None else 10**9)
    epoch, saved = 1, streams[0].layout(1).to_dict()
    for world, workers, batch, steps in hops[1:]:
        streams, shared = _streams(urls, world, workers, batch), _Broadcast()
        starts = {s.resume(epoch, 0, None, reads, saved, shared=shared)[:2] for s in streams}
        assert len(starts) == 1 and shared.computed <= 1
        (start, skip), = starts
        assert skip == 0
        if start > epoch and streams[0].rest.active(start) is not None:  # read with the next epoch: owed too
            nxt = Layout(**{**streams[0].layout(start).to_dict(), "rest_of": None})
            expected.update(unread(nxt, [[0] * workers] * world, urls))
        if streams[0].rest.active(start) is None:  # read to its end: the next epoch is the new layout's own
            assert start == epoch + 1 and streams[0].layout(start).rest_of is None
            break
        epoch = start
        batches = streams[0].rest.active(epoch).batches_per_rank
        reads, keys = _take(streams, urls, epoch, batches if steps is None else batches + steps if steps < 0 else steps)
        seen.update(keys)
        saved = streams[0].layout(epoch).to_dict()
    assert seen == expected, (sum(seen.values()), sum(expected.values()))
