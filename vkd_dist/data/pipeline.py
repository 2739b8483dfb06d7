"""WebDataset streams: shards -> samples -> augmented uint8 images + tokens + label masks -> Batch.

Training stream (`train_loader`): each (virtual) epoch, the shard list is permuted by (seed, epoch) and dealt
out explicitly to ranks and then to workers; a worker cycles over its own shards (resampling from all
shards when there are fewer shards than workers), shuffles through a buffer, decodes, augments, tokenises
and batches. Each worker yields exactly `batches_per_worker` batches an epoch, so every rank takes the same
number of steps whatever the shard sizes. Everything random is seeded by (seed, epoch, rank, worker, sample
position), so a resumed run that skips the batches it already consumed sees exactly the same stream.

Evaluation stream (`eval_loader`): every sample exactly once across ranks and workers, no shuffle.

Undecodable images, bad json and unreadable tars are skipped and counted, never fatal; each batch carries
its worker's running count, which the trainer reports.
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing as mp
import random
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.filters import _shuffle

from vkd_dist.data.schema import IMAGE_KEYS, DatasetInfo, decode_image
from vkd_dist.labels import encode_labels


@dataclass
class Batch:
    """The one batch shape every producer builds and every consumer reads."""

    image: torch.Tensor  # uint8 [B, 1, H, W]; normalised on the device
    input_ids: torch.Tensor  # long [B, T]
    attention_mask: torch.Tensor  # long [B, T]
    targets: torch.Tensor  # float [B, 14]
    target_mask: torch.Tensor  # bool [B, 14]
    keys: list = field(default_factory=list)
    skipped: int = 0  # the producing worker's running count of skipped samples
    worker: int = 0
    text_features: Optional[torch.Tensor] = None  # [B, D] precomputed text-encoder output (frozen-text fast path)

    def __len__(self) -> int:
        return self.image.shape[0]

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Batch":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()})

    def to(self, device, non_blocking: bool = True) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())


class SkipCounter:
    """Per-process count of skipped samples; used as a webdataset exception handler."""

    def __init__(self):
        self.count = 0
        self.last_error = ""

    def __call__(self, exc: Exception) -> bool:
        self.count += 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        return True  # skip and continue


SKIPPED = SkipCounter()


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


@dataclass
class StreamPosition:
    """Epoch and batches already consumed in it, shared with persistent workers."""

    epoch: Any = field(default_factory=lambda: mp.Value("i", 0))
    skip_batches: Any = field(default_factory=lambda: mp.Value("i", 0))

    def set(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch.value = epoch
        self.skip_batches.value = skip_batches


class Augment:
    """Small affine and brightness/contrast on uint8 grayscale; no horizontal flip unless asked."""

    def __init__(self, size: int, enabled: bool, rotate: float = 5.0, translate: float = 0.03, scale: float = 0.05,
                 brightness: float = 0.1, contrast: float = 0.1, hflip: bool = False):
        self.size, self.enabled, self.rotate, self.translate = size, enabled, rotate, translate
        self.scale, self.brightness, self.contrast, self.hflip = scale, brightness, contrast, hflip

    def __call__(self, image: np.ndarray, rng: Optional[np.random.Generator]) -> np.ndarray:
        pil = Image.fromarray(image)
        if not self.enabled or rng is None:
            if pil.size != (self.size, self.size):
                pil = pil.resize((self.size, self.size), Image.BILINEAR)
            return np.asarray(pil)
        w, h = pil.size
        angle = np.deg2rad(rng.uniform(-self.rotate, self.rotate))
        s = rng.uniform(1 - self.scale, 1 + self.scale)
        tx, ty = rng.uniform(-self.translate, self.translate, size=2) * self.size
        # Output pixel (u, v) of the size x size image samples input (x, y) = A @ (u, v, 1): one resampling
        # does rotation, scale, translation and the resize to the model's input size.
        k = w / self.size / s
        cos, sin = np.cos(angle) * k, np.sin(angle) * k
        cx, cy = self.size / 2 + tx, self.size / 2 + ty
        coeffs = (cos, sin, w / 2 - cos * cx - sin * cy, -sin * (h / w), cos * (h / w),
                  h / 2 - (-sin * cx + cos * cy) * (h / w))
        pil = pil.transform((self.size, self.size), Image.AFFINE, coeffs, resample=Image.BILINEAR)
        if self.hflip and rng.random() < 0.5:
            pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        out = np.asarray(pil, dtype=np.float32)
        c = rng.uniform(1 - self.contrast, 1 + self.contrast)
        b = rng.uniform(-self.brightness, self.brightness) * 255
        mean = out.mean()
        return np.clip((out - mean) * c + mean + b, 0, 255).astype(np.uint8)


class Collate:
    """Samples -> Batch, tokenising in the worker."""

    def __init__(self, tokenizer, max_len: int, uncertain: str, missing: str, text_features=None):
        self.tokenizer, self.max_len, self.uncertain, self.missing = tokenizer, max_len, uncertain, missing
        self.text_features = text_features  # key -> precomputed text-encoder output (frozen-text fast path)
        self._backend, self._ids = None, {}  # built lazily in the worker (see _tokenize)

    CACHE_REPORTS = 200_000  # token ids kept per worker (int32, unpadded): later epochs skip tokenisation

    def _tokenize(self, texts: list[str]) -> dict:
        """The tokenizer's own call or, for fast tokenizers padding on the right, its Rust backend directly
        (truncation only) with each report's ids cached, padded here to the longest, rounded up to a multiple
        of 8: the same ids and mask as the call, without its per-call overhead or repeated work."""
        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None or tok.pad_token_id is None or tok.padding_side != "right":
            return tok(texts, padding="longest", truncation=True, max_length=self.max_len, pad_to_multiple_of=8,
                       return_tensors="pt")
        if self._backend is None:
            from tokenizers import Tokenizer

            self._backend = Tokenizer.from_str(backend.to_str())  # a copy: the wrapper resets its own per call
            self._backend.no_padding()
            self._backend.enable_truncation(self.max_len, direction=tok.truncation_side)
        new = [t for t in dict.fromkeys(texts) if t not in self._ids]
        fresh = {t: np.asarray(e.ids, dtype=np.int32) for t, e in zip(new, self._backend.encode_batch(new))} if new else {}
        for t, ids in fresh.items():
            if len(self._ids) < self.CACHE_REPORTS:
                self._ids[t] = ids
        rows = [fresh[t] if t in fresh else self._ids[t] for t in texts]
        longest = -(-max(len(r) for r in rows) // 8) * 8
        input_ids = np.full((len(rows), longest), tok.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), longest), dtype=np.int64)
        for i, r in enumerate(rows):
            input_ids[i, :len(r)], mask[i, :len(r)] = r, 1
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_backend": None, "_ids": {}}

    def __call__(self, samples: list[dict]) -> Batch:
        images = torch.from_numpy(np.stack([s["image"] for s in samples]))[:, None]
        enc = self._tokenize([s["text"] for s in samples])
        encoded = [encode_labels(s["labels"], self.uncertain, self.missing) for s in samples]
        targets = torch.from_numpy(np.stack([t for t, _ in encoded]))
        mask = torch.from_numpy(np.stack([m for _, m in encoded]))
        wid, _ = _worker()
        keys = [s["key"] for s in samples]
        feats = self.text_features(keys) if self.text_features is not None else None
        return Batch(images, enc["input_ids"], enc["attention_mask"], targets, mask,
                     keys=keys, skipped=SKIPPED.count, worker=wid, text_features=feats)


def decode_sample(raw: dict, augment: Augment, rng: Optional[np.random.Generator]) -> dict:
    """Raw tar members -> {key, image uint8 [S, S], text, labels}. Raises on anything malformed."""
    key = raw.get("__key__", "?")
    img_key = next((k for k in IMAGE_KEYS if k in raw), None)
    if img_key is None:
        raise ValueError(f"{raw.get('__url__', '?')}: sample {key} has no image (expected one of {IMAGE_KEYS})")
    if "json" not in raw or "txt" not in raw:
        raise ValueError(f"{raw.get('__url__', '?')}: sample {key} lacks 'json' or 'txt'")
    meta = json.loads(raw["json"])
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), dict):
        raise ValueError(f"{raw.get('__url__', '?')}: sample {key} json has no 'labels' mapping")
    image = augment(decode_image(raw[img_key]), rng)
    return {"key": key, "image": image, "text": raw["txt"].decode("utf-8"), "labels": meta["labels"]}


class _TrainShards(IterableDataset):
    """Pipeline source: this worker's shard URLs for the current epoch, cycled without end."""

    def __init__(self, urls: list[str], seed: int, rank: int, world: int, position: StreamPosition):
        self.urls, self.seed, self.rank, self.world, self.position = urls, seed, rank, world, position

    def __iter__(self) -> Iterator[dict]:
        wid, nw = _worker()
        epoch = self.position.epoch.value
        gid, total = self.rank * nw + wid, self.world * nw
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
        mine = perm[gid::total] if len(self.urls) >= total else None
        rng = np.random.default_rng([self.seed, epoch, self.rank, wid, 1])
        while True:
            order = rng.permutation(mine) if mine is not None else rng.choice(len(self.urls), len(self.urls))
            for i in order:
                yield {"url": self.urls[int(i)]}


class _TrainSamples:
    """Shuffle, skip what a resumed run already consumed, decode + augment with position-seeded RNG."""

    def __init__(self, seed: int, rank: int, batch_size: int, shuffle_buffer: int, augment: Augment,
                 position: StreamPosition):
        self.seed, self.rank, self.batch_size = seed, rank, batch_size
        self.shuffle_buffer, self.augment, self.position = shuffle_buffer, augment, position

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        wid, nw = _worker()
        epoch = self.position.epoch.value
        skip = self.position.skip_batches.value // nw * self.batch_size  # whole rounds: see TrainStream.epoch
        if self.shuffle_buffer > 1:
            src = _shuffle(src, self.shuffle_buffer, min(self.shuffle_buffer, 100),
                           rng=random.Random(f"{self.seed}-{epoch}-{self.rank}-{wid}"))
        position = 0
        for raw in src:
            position += 1
            if position <= skip:
                continue
            rng = np.random.default_rng([self.seed, epoch, self.rank, wid, position])
            try:
                yield decode_sample(raw, self.augment, rng)
            except Exception as exc:
                SKIPPED(exc)


def _augment_from(cfg) -> Augment:
    return Augment(cfg.image_size, cfg.augment, cfg.max_rotate_deg, cfg.max_translate, cfg.scale_range,
                   cfg.brightness, cfg.contrast, cfg.hflip)


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
    batches_per_epoch: int  # per rank; identical on every rank

    workers: int = 1

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[Batch]:
        """One epoch's batches, after the first `skip_batches` (already consumed by a resumed run).

        DataLoader takes batches from the workers in turn, starting with worker 0, so workers skip whole
        rounds cheaply before decoding and the last partial round is decoded and dropped here."""
        whole = skip_batches // self.workers * self.workers
        self.position.set(epoch, whole)
        batches = iter(self.loader)
        for _ in range(skip_batches - whole):
            next(batches)
        return batches

    def __len__(self) -> int:
        return self.batches_per_epoch


def _text_features(cfg, split: str):
    """The sidecar lookup for `split` when data.text_features is set (see vkd_dist/data/text_features.py)."""
    if not getattr(cfg, "text_features", None):
        return None
    from vkd_dist.data.text_features import TextFeatureLookup

    return TextFeatureLookup(cfg.text_features, split)


def train_loader(info: DatasetInfo, split: str, cfg, tokenizer, rank: int = 0, world: int = 1,
                 seed: int = 0) -> TrainStream:
    """`cfg` is a DataConfig. Returns a stream whose every rank yields the same number of batches."""
    urls = info.shards(split)
    if not urls:
        raise ValueError(f"{info.root}: split {split!r} has no shards")
    workers = max(1, cfg.num_workers)
    samples = cfg.samples_per_epoch or info.num_samples(split)
    per_worker = max(1, math.ceil(samples / (cfg.batch_size * world * workers)))
    position = StreamPosition()
    pipeline = wds.DataPipeline(
        _TrainShards(urls, seed, rank, world, position),
        wds.tarfile_to_samples(handler=SKIPPED),
        _TrainSamples(seed, rank, cfg.batch_size, cfg.shuffle_buffer, _augment_from(cfg), position),
        wds.batched(cfg.batch_size, collation_fn=Collate(tokenizer, cfg.max_text_len, cfg.uncertain, cfg.missing,
                                                         _text_features(cfg, split)), partial=False),
        _EpochBatches(per_worker, position),
    )
    return TrainStream(_loader(pipeline, cfg.num_workers), position, per_worker * workers, workers)


class _EpochBatches:
    """This worker's share of an epoch: `per_worker` batches, less the rounds a resumed run skipped."""

    def __init__(self, per_worker: int, position: StreamPosition):
        self.per_worker, self.position = per_worker, position

    def __call__(self, src: Iterator[Batch]) -> Iterator[Batch]:
        _, nw = _worker()
        yield from itertools.islice(src, self.per_worker - self.position.skip_batches.value // nw)


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


def eval_loader(info: DatasetInfo, split: str, cfg, tokenizer, rank: int = 0, world: int = 1,
                max_batches: Optional[int] = None) -> Iterable[Batch]:
    urls = info.shards(split)
    shards = _EvalShards(urls, rank, world)
    augment = Augment(cfg.image_size, enabled=False)

    def decode(src):
        for raw in src:
            try:
                yield decode_sample(raw, augment, None)
            except Exception as exc:
                SKIPPED(exc)

    pipeline = wds.DataPipeline(
        shards, wds.tarfile_to_samples(handler=SKIPPED), shards.select, decode,
        wds.batched(cfg.eval_batch_size, collation_fn=Collate(tokenizer, cfg.max_text_len, cfg.uncertain,
                                                              cfg.missing, _text_features(cfg, split)), partial=True),
    )
    loader = _loader(pipeline, min(cfg.num_workers, max(1, len(urls))) if len(urls) > 0 else 0)
    return loader if max_batches is None else itertools.islice(loader, max_batches)
