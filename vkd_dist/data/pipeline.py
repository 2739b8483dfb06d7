"""WebDataset streams: shards -> samples -> uint8 images + tokens + label masks -> Batch.

Training stream (`train_loader`): each (virtual) epoch, the shard list is permuted by (seed, epoch) and dealt
out explicitly to ranks and then to workers; a worker cycles over its own shards (resampling from all
shards when there are fewer shards than workers), shuffles through a buffer, decodes, tokenises and batches.
Augmentation is not done here: it runs batch-wise on the device (vkd_dist/data/augment.py), which keeps
the workers at the decode rate. Each worker yields exactly `batches_per_worker` batches an epoch, so every
rank takes the same number of steps whatever the shard sizes. The shard order and shuffle are seeded by
(seed, epoch, rank, worker), so a resumed run that skips the batches it already consumed sees exactly the
same stream.

Evaluation stream (`eval_loader`): every sample exactly once across ranks and workers, no shuffle.

Undecodable images, bad json and unreadable tars are skipped and counted; each batch carries its worker's
running count, which the trainer reports. Past data.max_skip_frac of a worker's recent reads the run stops, and
an exception that corrupt data does not raise (a bug) is never skipped: see vkd_dist/data/faults.py.

Resume: each batch also carries how many raw samples its worker had read in the epoch (`Batch.read`), corrupt
ones included; the trainer saves every worker's count (`TrainStream.offsets`, TrainState.data_offsets) and a
resumed run's workers skip exactly that many, so the stream goes on as it would have with corrupt samples too.
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Optional, Protocol, TypeVar

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from vkd_dist.data.faults import CORRUPT, SkipLedger
from vkd_dist.data.rest import Layout, RestPlan, rest_epoch, rest_plan, shard_order, shuffled, take
from vkd_dist.data.schema import IMAGE_KEYS, DatasetInfo, decode_image
from vkd_dist.data.tokens import TokenTable, fast_backend
from vkd_dist.labels import LABELS, LabelPolicy, encode_labels

if TYPE_CHECKING:
    from vkd_dist.config import DataConfig


@dataclass
class Batch:
    """The one batch shape every producer builds and every consumer reads."""

    image: torch.Tensor  # uint8 [B, 1, H, W] (float 0..255 once augmented); normalised on the device
    input_ids: torch.Tensor  # long [B, T]
    attention_mask: torch.Tensor  # long [B, T]
    targets: torch.Tensor  # float [B, L], L = the data set's labels
    target_mask: torch.Tensor  # bool [B, L]
    keys: list = field(default_factory=list)
    patient_ids: list = field(default_factory=list)  # the bootstrap resamples patients, not images
    skipped: int = 0  # the producing worker's running count of skipped samples
    worker: int = 0
    read: int = 0  # raw samples (corrupt too) its worker had read in the epoch, through this batch's last one
    text_features: Optional[torch.Tensor] = None  # [B, D] precomputed text-encoder output (frozen-text fast path)
    labelled: Optional[torch.Tensor] = None  # bool [B]: the study has labels (a study without has every label masked)

    def __len__(self) -> int:
        return self.image.shape[0]

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        mapped: dict[str, Any] = {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
        return Batch(**mapped)

    def to(self, device, non_blocking: bool = True) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        return self._map(lambda t: t.pin_memory())


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class StreamPosition:
    """Epoch, the whole rounds of batches already consumed in it and the raw samples each worker skips for them;
    shared with persistent workers."""

    def __init__(self, workers: int = 1):
        self.epoch: Any = mp.Value("i", 0)
        self.skip_batches: Any = mp.Value("i", 0)
        self.starts: Any = mp.Array("q", workers)

    def set(self, epoch: int, skip_batches: int, starts: Sequence[int]) -> None:
        self.epoch.value = epoch
        self.skip_batches.value = skip_batches
        self.starts[:] = list(starts)


def fit(image: np.ndarray, size: int) -> np.ndarray:
    """The model's input side: shards are written at it, so this is almost always a no-op."""
    if image.shape == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


class Collate:
    """Samples -> Batch: token ids from the run's token table (see vkd_dist/data/tokens.py), else tokenised
    here with each report's ids cached per worker; padded to the longest, rounded up to a multiple of 8."""

    CACHE_REPORTS = 200_000  # token ids kept per worker (int32, unpadded) for reports missing from the table

    def __init__(self, tokenizer, max_len: int, policy: LabelPolicy, labels: Sequence[str] = LABELS,
                 text_features=None, tokens=None, ledger: Optional[SkipLedger] = None):
        self.tokenizer, self.max_len, self.policy = tokenizer, max_len, policy
        self.labels = labels
        self.ledger = ledger or SkipLedger()  # the stream's: its counts go into each Batch
        self.text_features = text_features  # key -> precomputed text-encoder output (frozen-text fast path)
        self.tokens = tokens  # TokenTable or None
        # Built lazily in the worker (see _token_ids): the Rust backend (False: none) and a cache of report ids.
        self._backend: Any = None
        self._ids: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_backend": None, "_ids": {}}

    def _token_ids(self, texts: list[str], keys: list[str]) -> Optional[list[np.ndarray]]:
        """Each report's ids: from the token table, else this worker's cache, else the Rust backend. None for a
        tokenizer without a fast backend (its own call then tokenises)."""
        if self._backend is None:
            if get_worker_info() is not None:
                # A forked worker whose parent ran the tokenizer's thread pool (the token table) deadlocks in
                # that pool, even when the user asked for parallelism: here it must be off.
                os.environ["TOKENIZERS_PARALLELISM"] = "false"
            self._backend = fast_backend(self.tokenizer, self.max_len) or False
        if not self._backend:
            return None
        table = [self.tokens.get(k) for k in keys] if self.tokens is not None else [None] * len(keys)
        new = list(dict.fromkeys(t for t, r in zip(texts, table) if r is None and t not in self._ids))
        encoded = self._backend.encode_batch(new) if new else []
        fresh = {t: np.asarray(e.ids, dtype=np.int32) for t, e in zip(new, encoded)}
        for t, ids in fresh.items():
            if len(self._ids) < self.CACHE_REPORTS:
                self._ids[t] = ids
        return [r if r is not None else fresh[t] if t in fresh else self._ids[t] for t, r in zip(texts, table)]

    def _tokenize(self, texts: list[str], keys: list[str]) -> dict:
        rows = self._token_ids(texts, keys)
        if rows is None:
            return self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_len,
                                  pad_to_multiple_of=8, return_tensors="pt")
        longest = -(-max(len(r) for r in rows) // 8) * 8
        input_ids = np.full((len(rows), longest), self.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), longest), dtype=np.int64)
        for i, r in enumerate(rows):
            input_ids[i, :len(r)], mask[i, :len(r)] = r, 1
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}

    def __call__(self, samples: list[dict]) -> Batch:
        images = torch.from_numpy(np.stack([s["image"] for s in samples]))[:, None]
        keys = [s["key"] for s in samples]
        enc = self._tokenize([s["text"] for s in samples], keys)
        encoded = [encode_labels(s["labels"], self.policy.uncertain, self.policy.missing, self.labels,
                                 s.get("labelled", True)) for s in samples]
        targets = torch.from_numpy(np.stack([t for t, _ in encoded]))
        mask = torch.from_numpy(np.stack([m for _, m in encoded]))
        wid, _ = _worker()
        feats = self.text_features(keys) if self.text_features is not None else None
        return Batch(images, enc["input_ids"], enc["attention_mask"], targets, mask,
                     keys=keys, patient_ids=[s["patient_id"] for s in samples], skipped=self.ledger.count,
                     worker=wid, read=samples[-1].get("read", 0), text_features=feats,
                     labelled=torch.tensor([s.get("labelled", True) for s in samples]))


def decode_sample(raw: dict, size: int) -> dict:
    """Raw tar members -> {key, image uint8 [size, size], text, labels}. Raises one of faults.CORRUPT on anything
    malformed; the messages leave the sample's key and shard to the caller (`decoded` names them), so that
    failures of one kind read alike."""
    key = raw.get("__key__", "?")
    img_key = next((k for k in IMAGE_KEYS if k in raw), None)
    if img_key is None:
        raise ValueError(f"no image member (expected one of {', '.join(IMAGE_KEYS)}; has {_members(raw)})")
    if "json" not in raw or "txt" not in raw:
        raise ValueError(f"no 'json' or no 'txt' member (has {_members(raw)})")
    meta = json.loads(raw["json"])
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), dict):
        raise ValueError("the json has no 'labels' mapping")
    image = fit(decode_image(raw[img_key]), size)
    return {"key": key, "image": image, "text": raw["txt"].decode("utf-8"), "labels": meta["labels"],
            "labelled": meta.get("labelled", True) is not False, "patient_id": str(meta.get("patient_id") or key)}


def _members(raw: dict) -> str:
    return ", ".join(sorted(k for k in raw if not k.startswith("__"))) or "none"


def decoded(src: Iterator[dict], size: int, ledger: Optional[SkipLedger] = None, start: int = 0) -> Iterator[dict]:
    """decode_sample over a stream; a corrupt sample is counted in `ledger` and skipped (which raises past the
    skip-rate ceiling), anything else propagates. Each sample's "read" is the number of raw samples read through
    it, counting from `start` (the collate runs one sample late, so the count travels with the sample)."""
    ledger = ledger or SkipLedger()
    for read, raw in enumerate(src, start + 1):
        try:
            sample = decode_sample(raw, size)
        except CORRUPT as exc:
            ledger.failed(exc, raw.get("__key__", "?"), raw.get("__url__"))
            continue
        ledger.ok()
        yield {**sample, "read": read}


class _Rest:
    """The rest plan of an interrupted epoch (vkd_dist/data/rest.py), shared by the pipeline's stages; set before
    the workers start, so each worker holds it."""

    plan: Optional[RestPlan] = None

    def active(self, epoch: int) -> Optional[RestPlan]:
        return self.plan if self.plan is not None and self.plan.layout.epoch == epoch else None

    def batch_sizes(self, epoch: int, layout: Layout, rank: int, wid: int) -> list[int]:
        """The batches worker `wid` of `rank` makes in `epoch`: the rest plan's sizes, else per_worker of
        batch_size."""
        plan = self.active(epoch)
        return plan.sizes.get((rank, wid), []) if plan is not None else [layout.batch_size] * layout.per_worker


class _TrainShards(IterableDataset):
    """Pipeline source: this worker's shard URLs for the current epoch, cycled without end (an ordinary epoch),
    or the shards holding its share of the rest of an interrupted epoch, once each."""

    def __init__(self, urls: list[str], layout: Layout, rank: int, position: StreamPosition, rest: _Rest):
        self.urls, self.layout, self.rank, self.position, self.rest = urls, layout, rank, position, rest

    def __iter__(self) -> Iterator[dict]:
        wid, nw = _worker()
        epoch = self.position.epoch.value
        plan = self.rest.active(epoch)
        if plan is not None:
            yield from ({"url": url} for url in plan.urls(self.rank, wid))
            return
        for i in shard_order(len(self.urls), self.layout.seed, epoch, self.rank, wid, self.layout.world, nw):
            yield {"url": self.urls[i]}


class _TrainSamples:
    """Shuffle this epoch's quota of samples, skip the raw samples a resumed run already read (before decoding),
    decode. In a rest epoch the quota is the worker's share of the rest, taken from its shards by key."""

    def __init__(self, layout: Layout, rank: int, size: int, position: StreamPosition, ledger: SkipLedger,
                 rest: _Rest):
        self.layout, self.rank, self.size, self.position, self.ledger, self.rest = layout, rank, size, position, \
            ledger, rest

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        wid, _ = _worker()
        epoch = self.position.epoch.value
        skip = self.position.starts[wid]  # raw samples: see TrainStream.epoch
        quota = self.layout.per_worker * self.layout.batch_size
        plan = self.rest.active(epoch)
        if plan is not None:
            wanted = plan.wanted(self.rank, wid)
            src, quota = take(src, wanted, lambda s: (s.get("__url__"), s.get("__key__"))), sum(wanted.values())
        # The shuffle drains exactly the epoch's quota rather than leaving a buffer of read samples behind; if
        # skipped (corrupt) samples leave the epoch short, the next ones follow unshuffled.
        src = shuffled(src, quota, self.layout.shuffle_buffer, self.layout.seed, epoch, self.rank, wid)
        yield from decoded(itertools.islice(src, skip, None), self.size, self.ledger, skip)


T = TypeVar("T")


class Shared(Protocol):
    """fn() computed once for every rank (TrainStream.resume)."""

    def __call__(self, fn: Callable[[], T]) -> T: ...


def computed_here(fn: Callable[[], T]) -> T:  # one process: computed where it is asked
    return fn()


def _loader(pipeline, num_workers: int) -> torch.utils.data.DataLoader:
    # Its own generator: creating an iterator must not draw from the global RNG, or a resumed run's
    # dropout and latent samples would drift from an uninterrupted run's.
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, generator=torch.Generator(),
                         persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
                         prefetch_factor=4 if num_workers > 0 else None)


@dataclass
class TrainStream:
    loader: torch.utils.data.DataLoader
    position: StreamPosition
    batches_per_epoch: int  # per rank in an ordinary epoch; identical on every rank
    layout_: Layout  # this stream's layout (its `epoch` field unused: see `layout`)
    urls: list = field(default_factory=list)
    rank: int = 0
    rest: _Rest = field(default_factory=_Rest)

    # Per worker: the raw samples it had read through the last whole round of batches taken from `epoch`; what
    # a checkpoint saves (every rank's, TrainState.data_offsets) and `resume` gives back.
    offsets: list = field(default_factory=list)
    # Per worker: the raw samples it had read through the last batch taken (TrainState.data_reads): what a resume
    # on another layout replays.
    reads: list = field(default_factory=list)
    _resume: Optional[tuple[int, list]] = None  # (epoch, this rank's saved raw offset per worker) for `epoch`

    @property
    def workers(self) -> int:
        return self.layout_.workers

    def layout(self, epoch: int) -> Layout:
        """The layout epoch `epoch` is read with: the rest plan's, or this stream's."""
        plan = self.rest.active(epoch)
        return plan.layout if plan is not None else replace(self.layout_, epoch=epoch)

    def resume(self, epoch: int, skip: int, offsets_by_rank: Optional[Sequence] = None,
               reads_by_rank: Optional[Sequence] = None, saved_layout: Optional[dict] = None,
               shared: Shared = computed_here) -> tuple[int, int, Optional[str]]:
        """Position the stream where a checkpoint left it, at (epoch, skip batches); returns where to start
        (epoch, skip) and a line to log when the layout changed. On the saved layout, each worker starts at this
        rank's saved raw offset (`offsets_by_rank`; without it, at whole rounds of batches, exact only when no
        sample was skipped). On another (processes, workers, batch size), the unread rest of the epoch is dealt
        to this layout's slots and read exactly once (vkd_dist/data/rest.py); the next epoch is this layout's.

        `shared(fn)` returns fn() computed once for every rank: the main process replays the shards' headers and
        deals the rest, every rank receives the same plan (run.build_run passes a broadcast from rank 0), so ranks
        cannot disagree on it; by default, computed here."""
        row = offsets_by_rank[self.rank] if offsets_by_rank is not None and self.rank < len(offsets_by_rank) else None
        if saved_layout is None:  # a checkpoint written before layouts were saved: the old, same-layout resume
            if skip >= self.batches_per_epoch:  # at the epoch's end: its offsets say nothing of the next one
                return epoch + 1, 0, None
            self._resume = (epoch, list(row)) if row is not None and len(row) == self.workers else None
            return epoch, skip, None
        saved = Layout.from_dict(saved_layout)
        here = replace(self.layout_, epoch=saved.epoch)
        if saved.same_slots(here):
            if saved.rest_of is not None:  # interrupted again inside a rest epoch, resumed on its layout
                self.rest.plan = shared(partial(rest_plan, saved, self.urls))
            self._resume = (epoch, list(row)) if row is not None else None
            return epoch, skip, None
        if reads_by_rank is None:
            raise ValueError("the checkpoint saved a data layout without the reads of its workers")
        plan, unread = shared(partial(rest_epoch, saved, reads_by_rank, here, self.urls))
        layout = plan.layout
        was = f"{saved.world} process(es) x {saved.workers} worker(s), batch {saved.batch_size}"
        now = f"{here.world} x {here.workers}, batch {here.batch_size}"
        if plan.num_samples == 0:
            return saved.epoch + 1, 0, (f"data: epoch {saved.epoch} was read to its end on {was}; epoch "
                                        f"{saved.epoch + 1} on {now}")
        self.rest.plan = plan
        largest = max(max(sizes) for sizes in plan.sizes.values())
        over = f"; batches of up to {largest} samples" if largest > here.batch_size else ""
        if layout.epoch > saved.epoch:  # fewer unread samples than processes: read with the next epoch
            return layout.epoch, 0, (
                f"data: the unread rest of epoch {saved.epoch} ({unread} samples, read so far by {was}) is too small "
                f"to give each of {here.world} processes one: it is read with epoch {layout.epoch}, dealt to {now} "
                f"({plan.num_samples} samples, {plan.batches_per_rank} batches per process{over}), each sample once")
        return saved.epoch, 0, (f"data: the unread rest of epoch {saved.epoch} ({plan.num_samples} samples, read so "
                                f"far by {was}) is dealt to {now}: {plan.batches_per_rank} batches per process{over}, "
                                "each sample once; the next epoch is dealt afresh")

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[Batch]:
        """One epoch's batches, after the first `skip_batches` (already consumed by a resumed run).

        DataLoader takes batches from the workers in turn, starting with worker 0, so workers skip the raw
        samples of whole rounds cheaply before decoding and the last partial round is decoded and dropped here."""
        whole = skip_batches // self.workers * self.workers
        saved = self._resume[1] if self._resume is not None and self._resume[0] == epoch else None
        starts = saved or [sum(self.rest.batch_sizes(epoch, self.layout_, self.rank, w)[:whole // self.workers])
                                  for w in range(self.workers)]
        self._resume = None
        self.position.set(epoch, whole, starts)
        self.offsets, self.reads = list(starts), list(starts)
        return self._tracked(iter(self.loader), whole, skip_batches - whole)

    def _tracked(self, batches: Iterator[Batch], taken: int, drop: int) -> Iterator[Batch]:
        for batch in batches:
            self.reads[batch.worker] = batch.read
            taken += 1
            if taken % self.workers == 0:
                self.offsets = list(self.reads)
            if drop > 0:
                drop -= 1
                continue
            yield batch

    def __len__(self) -> int:
        return self.batches_per_epoch


def _text_features(cfg: DataConfig, split: str):
    """The sidecar lookup for `split` when data.text_features is set (see vkd_dist/data/text_features.py)."""
    if not cfg.text_features:
        return None
    from vkd_dist.data.text_features import TextFeatureLookup

    return TextFeatureLookup(cfg.text_features, split)


def training_policy(info: DatasetInfo, cfg: DataConfig) -> LabelPolicy:
    """The data set's training policy with what data.uncertain / data.missing override."""
    return info.train_policy.overridden(cfg.uncertain, cfg.missing)


def train_loader(info: DatasetInfo, split: str, cfg: DataConfig, tokenizer, rank: int = 0, world: int = 1,
                 seed: int = 0, tokens: Optional[TokenTable] = None, keys: Optional[frozenset] = None) -> TrainStream:
    """`tokens` is the split's TokenTable, if any; `keys`, the samples the stream reads (None: all of them): the
    others are dropped as the shards are read, before they count as read (vkd_dist/data/compose.py). Returns a
    stream whose every rank yields the same number of batches."""
    urls = info.shards(split)
    if not urls:
        raise ValueError(f"{info.root}: split {split!r} has no shards")
    workers = max(1, cfg.num_workers)
    samples = cfg.samples_per_epoch or (len(keys) if keys is not None else info.num_samples(split))
    per_worker = max(1, math.ceil(samples / (cfg.batch_size * world * workers)))
    layout = Layout(0, seed, world, workers, cfg.batch_size, cfg.shuffle_buffer, per_worker)
    position, ledger, rest = StreamPosition(workers), SkipLedger(cfg.max_skip_frac), _Rest()
    collate = Collate(tokenizer, cfg.max_text_len, training_policy(info, cfg), info.labels,
                      _text_features(cfg, split), tokens, ledger)
    pipeline = wds.DataPipeline(
        _TrainShards(urls, layout, rank, position, rest),
        wds.tarfile_to_samples(handler=ledger.shard_failed),
        *([wds.select(_KeyIn(keys))] if keys is not None else []),
        _TrainSamples(layout, rank, cfg.image_size, position, ledger, rest),
        _EpochBatches(layout, rank, collate, position, rest),
    )
    return TrainStream(_loader(pipeline, cfg.num_workers), position, per_worker * workers, layout, urls, rank, rest)


class _KeyIn:
    """The samples whose key is in `keys` (a class, not a lambda: loader workers may be spawned)."""

    def __init__(self, keys: frozenset):
        self.keys = keys

    def __call__(self, sample: dict) -> bool:
        return sample.get("__key__") in self.keys


class _EpochBatches:
    """This worker's share of an epoch, batched: `per_worker` batches of batch_size (a rest epoch: the plan's
    sizes), less the rounds a resumed run skipped."""

    def __init__(self, layout: Layout, rank: int, collate: Collate, position: StreamPosition, rest: _Rest):
        self.layout, self.rank, self.collate, self.position, self.rest = layout, rank, collate, position, rest

    def __call__(self, src: Iterator[dict]) -> Iterator[Batch]:
        wid, nw = _worker()
        epoch = self.position.epoch.value
        rest = self.rest.active(epoch) is not None
        for size in self.rest.batch_sizes(epoch, self.layout, self.rank, wid)[self.position.skip_batches.value // nw:]:
            samples = list(itertools.islice(src, size))
            if not rest:
                if len(samples) < size:
                    return
            elif not samples:  # corrupt samples left a rest slot short: its rank would take fewer steps
                raise RuntimeError(f"rank {self.rank} worker {wid}: the rest of epoch {epoch} ran out of "
                                   "readable samples (corrupt samples were skipped)")
            yield self.collate(samples)


class _EvalShards(IterableDataset):
    """Exactly-once split: whole shards per (rank, worker) when there are enough, else samples modulo."""

    def __init__(self, urls: list[str], rank: int, world: int):
        self.urls, self.rank, self.world = urls, rank, world

    def _slot(self) -> tuple[int, int]:
        wid, nw = _worker()
        return self.rank * nw + wid, self.world * nw

    def by_shard(self) -> bool:
        return len(self.urls) >= self._slot()[1]

    def __iter__(self) -> Iterator[dict]:
        gid, total = self._slot()
        urls = self.urls[gid::total] if self.by_shard() else self.urls
        for url in urls:
            yield {"url": url}

    def select(self, src: Iterator[dict]) -> Iterator[dict]:
        if self.by_shard():
            yield from src
            return
        gid, total = self._slot()
        for i, sample in enumerate(src):
            if i % total == gid:
                yield sample


def eval_loader(info: DatasetInfo, split: str, cfg: DataConfig, tokenizer, rank: int = 0, world: int = 1,
                max_batches: Optional[int] = None) -> Iterable[Batch]:
    """Targets follow the data set's evaluation policy, not the training one (data.uncertain / data.missing),
    so runs trained under different policies are scored on the same targets."""
    urls = info.shards(split)
    policy = info.eval_policy
    shards, ledger = _EvalShards(urls, rank, world), SkipLedger(cfg.max_skip_frac)
    pipeline = wds.DataPipeline(
        shards, wds.tarfile_to_samples(handler=ledger.shard_failed), shards.select,
        partial(decoded, size=cfg.image_size, ledger=ledger),
        wds.batched(cfg.eval_batch_size, collation_fn=Collate(tokenizer, cfg.max_text_len, policy, info.labels,
                                                              _text_features(cfg, split), ledger=ledger),
                    partial=True),
    )
    loader = _loader(pipeline, min(cfg.num_workers, max(1, len(urls))) if len(urls) > 0 else 0)
    return loader if max_batches is None else itertools.islice(loader, max_batches)
