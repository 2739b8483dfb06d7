"""What a training batch holds where some training studies have a report but no labels: it follows what the
objective learns from (`Objective.learns_from`, vkd_dist/objectives/base.py).

  labelled  (image_only, text_only) labelled studies only: at the same step budget the objective sees as many
            labelled examples as the batches hold, not the corpus's share of them
  mixed     (kd, vkd) data.labelled_share of each batch is labelled studies, the rest unlabelled ones
  pairs     (contrastive: labels unused) every study as drawn, the ordinary stream

Where every study is labelled, or data.labelled_share is null, every objective reads the ordinary stream: the same
batches as a run that never composed them.

The mechanism: two streams at a ratio. Each is an ordinary shard stream (vkd_dist/data/pipeline.py) restricted to
one subset of the studies (their keys, read once from the shards' json members), with its own batch size: round(
share x batch) labelled, the rest unlabelled. A composed batch is one batch of each, concatenated. Why two streams
and not one that re-sorts what it reads into batches: a stream restricted to a subset is still an ordinary stream,
so its position is still its workers' raw sample counts and a resume stays exact, each stream by its own counts
(a re-sorting buffer would hold read but unconsumed samples that a checkpoint cannot name). The share is exact in
every batch, not on average. An epoch is one pass over the labelled studies; the unlabelled stream runs through
its own epochs alongside, and a checkpoint records where it is.

A composed run resumes on the layout it was saved with (processes, workers, batch size); a resume on another
layout is refused (the rest-of-epoch replay of vkd_dist/data/rest.py reads every study of the shards, not a
subset).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import IO, TYPE_CHECKING, Any, Optional

import torch
from webdataset.tariterators import base_plus_ext

from vkd_dist.config import ConfigError
from vkd_dist.data.pipeline import Batch, Shared, TrainStream, computed_here, train_loader
from vkd_dist.data.rest import Layout

if TYPE_CHECKING:
    from vkd_dist.config import DataConfig
    from vkd_dist.data.schema import DatasetInfo
    from vkd_dist.data.tokens import TokenTable

LABELLED, MIXED, PAIRED = "labelled", "mixed", "pairs"  # what an objective learns from (see the docstring)
PARTS = ("labelled", "unlabelled")


def labelled_per_batch(learns_from: str, cfg: DataConfig, num_unlabelled: int) -> Optional[int]:
    """The labelled studies in each batch of `cfg.batch_size`; None for the ordinary stream."""
    if cfg.labelled_share is None or num_unlabelled == 0 or learns_from == PAIRED:
        return None
    if learns_from == LABELLED:
        return cfg.batch_size
    n = round(cfg.labelled_share * cfg.batch_size)
    if n == 0:
        raise ConfigError(f"data.labelled_share={cfg.labelled_share} of data.batch_size={cfg.batch_size} rounds to "
                          "no labelled study per batch; expected a share of at least one study")
    return n


def keys_by_label(shards: list[str]) -> dict[str, frozenset]:
    """{"labelled": keys, "unlabelled": keys} of the samples in `shards`, from their json members alone (a sample
    whose json does not parse counts as labelled: the stream skips it as corrupt either way)."""
    found: dict[str, set] = {part: set() for part in PARTS}
    for url in shards:
        try:
            with tarfile.open(url) as tar:
                for member in tar:
                    key, ext = base_plus_ext(member.name)
                    if ext == "json" and member.isfile():
                        found["unlabelled" if _unlabelled(tar.extractfile(member)) else "labelled"].add(key)
        except (OSError, tarfile.TarError):  # a damaged shard: the samples before the damage, as the reader sees
            pass
    return {part: frozenset(keys) for part, keys in found.items()}


def _unlabelled(member: Optional[IO[bytes]]) -> bool:
    try:
        meta = json.loads(member.read()) if member is not None else None
    except ValueError:
        return False
    return isinstance(meta, dict) and meta.get("labelled", True) is False


def train_stream(info: DatasetInfo, split: str, cfg: DataConfig, tokenizer, rank: int, world: int, seed: int,
                 tokens: Optional[TokenTable], learns_from: str) -> TrainStream | ComposedStream:
    """The training stream for an objective that learns from `learns_from` (see the module docstring)."""
    n_labelled = labelled_per_batch(learns_from, cfg, info.num_unlabelled(split))
    if n_labelled is None:
        return train_loader(info, split, cfg, tokenizer, rank, world, seed, tokens)
    keys = keys_by_label(info.shards(split))
    sizes = {"labelled": n_labelled, "unlabelled": cfg.batch_size - n_labelled}
    if not keys["labelled"]:
        raise ConfigError(f"data.path={info.root}: split {split!r} has no labelled study; an objective that learns "
                          "from labels needs some")
    streams = {}
    for part, size in sizes.items():
        if size == 0:
            continue
        # data.samples_per_epoch counts composed samples: the labelled stream's epoch holds its share of them
        epoch = round(cfg.samples_per_epoch * size / cfg.batch_size) if cfg.samples_per_epoch else None
        part_cfg = replace(cfg, batch_size=size, samples_per_epoch=max(1, epoch) if epoch is not None and
                           part == "labelled" else None)
        streams[part] = train_loader(info, split, part_cfg, tokenizer, rank, world, seed, tokens, keys=keys[part])
    return ComposedStream(streams, tokenizer.pad_token_id or 0)


def concat(first: Batch, second: Batch, pad_id: int) -> Batch:
    """One batch of both, `first`'s studies first; token ids padded to the longer of the two."""
    length = max(first.input_ids.shape[1], second.input_ids.shape[1])

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)

    def cat(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if a is None or b is None else torch.cat([a, b])

    return Batch(torch.cat([first.image, second.image]), torch.cat([pad(first.input_ids, pad_id),
                                                                    pad(second.input_ids, pad_id)]),
                 torch.cat([pad(first.attention_mask, 0), pad(second.attention_mask, 0)]),
                 torch.cat([first.targets, second.targets]), torch.cat([first.target_mask, second.target_mask]),
                 keys=[*first.keys, *second.keys], patient_ids=[*first.patient_ids, *second.patient_ids],
                 skipped=first.skipped + second.skipped, worker=first.worker, read=first.read,
                 text_features=cat(first.text_features, second.text_features),
                 labelled=cat(first.labelled, second.labelled))


@dataclass
class _Saved:
    """What a checkpoint records of a composed stream's layout (TrainState.data_layout)."""

    layouts: dict
    unlabelled_at: list  # [epoch, batches taken in it] of the unlabelled stream

    def to_dict(self) -> dict:
        return {"composed": {**self.layouts, "unlabelled_at": self.unlabelled_at}}


class ComposedStream:
    """The labelled stream's batches, each joined by the next batch of the unlabelled one (when there is one).
    Has the TrainStream interface the trainer and its checkpoints use: epoch, resume, offsets, reads, layout."""

    def __init__(self, streams: dict[str, TrainStream], pad_id: int):
        self.streams, self.pad_id = streams, pad_id
        self.batches_per_epoch = streams["labelled"].batches_per_epoch
        self.unlabelled_at = [0, 0]
        self._unlabelled: Optional[Iterator[Batch]] = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def offsets(self) -> dict:
        return {part: s.offsets for part, s in self.streams.items()}

    @property
    def reads(self) -> dict:
        return {part: s.reads for part, s in self.streams.items()}

    def layout(self, epoch: int) -> _Saved:
        at = self.unlabelled_at
        return _Saved({part: s.layout(epoch if part == "labelled" else at[0]).to_dict()
                       for part, s in self.streams.items()}, list(at))

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        labelled = self.streams["labelled"].epoch(epoch, skip)
        return labelled if "unlabelled" not in self.streams else self._joined(labelled)

    def _joined(self, labelled: Iterator[Batch]) -> Iterator[Batch]:
        for batch in labelled:
            yield concat(batch, self._next_unlabelled(), self.pad_id)

    def _next_unlabelled(self) -> Batch:
        while True:
            if self._unlabelled is None:
                self._unlabelled = self.streams["unlabelled"].epoch(*self.unlabelled_at)
            batch = next(self._unlabelled, None)
            if batch is not None:
                self.unlabelled_at[1] += 1
                return batch
            self.unlabelled_at, self._unlabelled = [self.unlabelled_at[0] + 1, 0], None

    def resume(self, epoch: int, skip: int, offsets_by_rank: Optional[list] = None,
               reads_by_rank: Optional[list] = None, saved_layout: Optional[dict] = None,
               shared: Shared = computed_here) -> tuple[int, int, Optional[str]]:
        """Each stream where the checkpoint left it, on the layout it was saved with (see the module docstring);
        `shared` as TrainStream.resume takes it."""
        saved = (saved_layout or {}).get("composed")
        if saved is None or set(saved) - {"unlabelled_at"} != set(self.streams):
            raise ConfigError(f"resume: the checkpoint's data position is not that of a stream composed of "
                              f"{' and '.join(self.streams)} studies (the objective or data.labelled_share changed "
                              "since it was written); set them back, or start a new run_dir")
        self.unlabelled_at = list(saved["unlabelled_at"])
        at = {"labelled": (epoch, skip), "unlabelled": (self.unlabelled_at[0], self.unlabelled_at[1])}
        for part, stream in self.streams.items():
            was = Layout.from_dict(saved[part])
            if not was.same_slots(stream.layout_):
                raise ConfigError(f"resume: a run whose batches are composed of labelled and unlabelled studies "
                                  f"resumes on the layout it was saved with ({_slots(was)}); this one is "
                                  f"{_slots(stream.layout_)}: set them back, or start a new run_dir")
            row = _part(offsets_by_rank, part)
            stream.resume(*at[part], row, _part(reads_by_rank, part), saved[part], shared=shared)
        return epoch, skip, None


def _part(by_rank: Optional[list], part: str) -> Optional[list]:
    return None if by_rank is None else [row.get(part) if isinstance(row, dict) else None for row in by_rank]


def _slots(layout: Layout) -> str:
    return f"{layout.world} process(es) x {layout.workers} worker(s), batch {layout.batch_size}"


def describe(stream: Any) -> Optional[str]:
    """A line for the run's log on what its batches hold (None for the ordinary stream)."""
    if not isinstance(stream, ComposedStream):
        return None
    sizes = {part: s.layout_.batch_size for part, s in stream.streams.items()}
    if "unlabelled" not in sizes:
        return f"batches: labelled studies only ({sizes['labelled']} a batch)"
    return (f"batches: {sizes['labelled']} labelled + {sizes['unlabelled']} unlabelled studies each "
            "(data.labelled_share)")
