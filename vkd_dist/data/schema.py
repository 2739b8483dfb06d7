"""The shard sample schema and dataset.json, shared by every writer (synthetic, converters) and reader.

A sample in a shard tar is three members with one key:
  <key>.jpg   8-bit grayscale image, pre-resized at shard time. JPEG (quality 95) by default: measured here it
              decodes ~3x faster than PNG at 256 px (0.23 ms vs 0.62-0.73 ms) and is ~25% smaller; sources such
              as MIMIC-CXR-JPG are JPEG already. `.png` (lossless) is accepted everywhere as an alternative.
  <key>.txt   the report text (normalised, UTF-8)
  <key>.json  {"labels": {<label name>: 1|0|-1|null, ...}, "patient_id", "study_id", "view", "source", ...};
              "labelled": false marks a study that has a report but no labels at all (a training-split study
              outside the curated subset): every policy masks it whole, and it is counted apart
Shards live at DIR/<split>/shard-000000.tar; DIR/dataset.json describes them; DIR/rejects.csv lists
every item a writer skipped, with the reason.

dataset.json declares the label names in order ("labels": the 14 CheXpert labels unless a manifest was
converted with its own columns), the evaluation policy ("eval_policy": how blank and uncertain entries are
scored; see vkd_dist/labels.py) and the training policy ("train_policy": how training reads them; the evaluation
policy unless a writer says otherwise). Files written before either existed get their source's convention, and
their evaluation policy for training. Each split records its labelled and unlabelled study counts.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from vkd_dist.fileio import atomic_write_text
from vkd_dist.labels import (
    LABELS,
    SOURCE_EVAL_POLICY,
    EvalPolicy,
    LabelPolicy,
    check_label_dict,
    check_label_names,
    scorable_labels,
)

SCHEMA_VERSION = 1
IMAGE_KEYS = ("jpg", "png")
SPLITS = ("train", "val", "test")
JPEG_QUALITY = 95


@dataclass
class Record:
    """One paired image-report sample, before encoding into a shard."""

    key: str
    image: np.ndarray  # uint8 [H, W]
    text: str
    labels: dict  # CheXpert name -> 1 | 0 | -1 | None
    patient_id: str
    study_id: str
    view: str = ""
    source: str = ""
    extra: dict = field(default_factory=dict)
    labelled: bool = True  # False: a report but no labels at all (every label must be null)

    def meta(self, names: Sequence[str] = LABELS) -> dict:
        labels = check_label_dict(self.labels, where=self.key, names=names)
        if not self.labelled and any(v is not None for v in labels.values()):
            raise ValueError(f"{self.key}: an unlabelled study has label values {labels}")
        # Written only when false: shards of fully labelled data stay byte-identical to earlier ones.
        unlabelled = {} if self.labelled else {"labelled": False}
        return {"labels": labels, "patient_id": str(self.patient_id), "study_id": str(self.study_id),
                "view": self.view, "source": self.source, **self.extra, **unlabelled}


@dataclass
class Reject:
    """An item a writer could not turn into a sample; it goes into rejects.csv, never silently away."""

    split: str
    item_id: str
    reason: str
    path: str = ""


def encode_image(image: np.ndarray, fmt: str = "jpg") -> bytes:
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected a uint8 [H, W] grayscale image, got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    pil = Image.fromarray(image)
    if fmt == "jpg":
        pil.save(buf, "JPEG", quality=JPEG_QUALITY)
    elif fmt == "png":
        pil.save(buf, "PNG", compress_level=6)
    else:
        raise ValueError(f"unknown image format {fmt!r} (jpg, png)")
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Shard image bytes -> uint8 [H, W]. Raises on undecodable data (the reader counts and skips).

    JPEG goes through TorchCodec's libjpeg-turbo decoder straight into a tensor when the `fast` extra is
    installed (the same pixels as PIL in 0.064 vs 0.09 ms at 128 px: the reader's biggest cost); anything it
    cannot take, and every JPEG without it, through PIL."""
    if data[:2] == b"\xff\xd8" and _jpeg_decoder() is not None:
        try:
            return _jpeg_decoder()(data, mode="GRAY")[0].numpy()
        except RuntimeError:
            pass  # e.g. 12-bit or arithmetic-coded: PIL decodes it or raises a clear error
    with Image.open(io.BytesIO(data)) as img:
        if img.mode != "L":
            img = img.convert("L")
        return np.asarray(img)


@functools.cache
def _jpeg_decoder():
    try:
        from torchcodec.decoders import decode_jpeg
    except (ImportError, OSError, RuntimeError):  # not installed, or built for another torch
        return None
    return decode_jpeg


def to_sample(record: Record, fmt: str = "jpg", names: Sequence[str] = LABELS) -> dict:
    return {"__key__": record.key, fmt: encode_image(record.image, fmt), "txt": record.text.encode("utf-8"),
            "json": json.dumps(record.meta(names), sort_keys=True).encode("utf-8")}


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def empty_label_counts(names: Sequence[str] = LABELS) -> dict:
    return {name: {"1": 0, "0": 0, "-1": 0, "null": 0} for name in names}


def add_label_counts(counts: dict, labels: dict) -> None:
    """Counts of one labelled study's values (an unlabelled study is counted apart, never as blanks)."""
    for name in counts:
        value = labels.get(name)
        counts[name]["null" if value is None else str(int(value))] += 1


def prevalence(counts: dict, num_samples: int) -> dict:
    """Fraction of samples labelled positive, per label (uncertain and missing are not positive)."""
    return {name: (c["1"] / num_samples if num_samples else 0.0) for name, c in counts.items()}


def write_dataset_json(out_dir: Path, splits: dict, rejects: int, params: dict, source: str,
                       label_counts: dict, rejects_by_reason: Optional[dict] = None,
                       labels: Sequence[str] = LABELS, eval_policy: Optional[EvalPolicy] = None,
                       train_policy: Optional[LabelPolicy] = None) -> dict:
    """`splits[name]` holds num_samples, shards and num_unlabelled (0 when absent); num_labelled is derived."""
    eval_policy = eval_policy or SOURCE_EVAL_POLICY.get(source, EvalPolicy())
    for split in splits.values():
        split.setdefault("num_unlabelled", 0)
        split["num_labelled"] = split["num_samples"] - split["num_unlabelled"]
    meta = {
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "labels": list(labels),
        "eval_policy": eval_policy.to_dict(),
        "train_policy": (train_policy or eval_policy).to_dict(),
        "splits": splits,
        "prevalence": {s: prevalence(label_counts[s], splits[s]["num_labelled"]) for s in splits},
        "label_counts": label_counts,
        "rejects": rejects,
        "rejects_by_reason": rejects_by_reason or {},
        "params": params,
    }
    atomic_write_text(Path(out_dir) / "dataset.json", json.dumps(meta, indent=2))
    return meta


@dataclass
class DatasetInfo:
    root: Path
    meta: dict

    def shards(self, split: str) -> list[str]:
        return [str(self.root / split / s["name"]) for s in self.split(split)["shards"]]

    def num_samples(self, split: str) -> int:
        return int(self.split(split)["num_samples"])

    def split(self, split: str) -> dict:
        if split not in self.meta["splits"]:
            raise KeyError(f"{self.root / 'dataset.json'}: no split {split!r} "
                           f"(has: {', '.join(self.meta['splits'])})")
        return self.meta["splits"][split]

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.meta["labels"])

    @property
    def eval_policy(self) -> EvalPolicy:
        raw = self.meta.get("eval_policy")
        return EvalPolicy(**raw) if raw else SOURCE_EVAL_POLICY.get(self.meta.get("source", ""), EvalPolicy())

    @property
    def train_policy(self) -> LabelPolicy:
        """How training reads the labels unless data.uncertain / data.missing say otherwise: the data set's
        declared training policy, else its evaluation policy (a model trained on the targets it is scored on)."""
        raw = self.meta.get("train_policy")
        return LabelPolicy(**raw) if raw else self.eval_policy

    def num_unlabelled(self, split: str) -> int:
        return int(self.split(split).get("num_unlabelled", 0))

    def scorable_labels(self, split: str) -> list[str]:
        """The labels with both classes on `split` under the evaluation policy: what its macro AUROC averages."""
        counts = self.meta.get("label_counts", {}).get(split)
        if counts is None:
            return list(self.labels)  # no counts recorded: every label, and the metrics say which were defined
        return scorable_labels(counts, self.labels, self.eval_policy)


def read_dataset(root: str | Path) -> DatasetInfo:
    root = Path(root)
    path = root / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; make shards with `vkd-data synthetic|mimic-cxr|openi|manifest`")
    try:
        meta: Any = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    version = meta.get("schema_version")  # written by every writer since the first; a file without it is foreign
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path} has schema version {version}; this vkd_dist reads {SCHEMA_VERSION}: "
                         "re-convert with vkd-data")
    for key in ("labels", "splits"):
        if key not in meta:
            raise ValueError(f"{path}: missing key {key!r}")
    check_label_names(meta["labels"], f"{path}: 'labels'")
    for key in ("eval_policy", "train_policy"):
        if meta.get(key) is not None:
            try:
                LabelPolicy(**meta[key])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}: {key!r} {meta[key]}: {exc}") from exc
    return DatasetInfo(root, meta)


def shard_reports(shards: list[str]) -> Iterator[tuple[str, str]]:
    """(key, report text) of every sample with a report, in shard order, without decoding images; one process
    reads every shard whatever the world size."""
    import webdataset as wds

    everything = lambda src: src  # noqa: E731
    dataset = wds.WebDataset(shards, shardshuffle=False, empty_check=False, nodesplitter=everything,
                             workersplitter=everything)
    for sample in dataset:
        if "txt" in sample:
            yield sample["__key__"], sample["txt"].decode("utf-8")


def shard_report_batches(shards: list[str], size: int) -> Iterator[tuple[list[str], list[str]]]:
    """`shard_reports` in batches of `size` (the last one shorter): (keys, texts)."""
    reports = shard_reports(shards)
    while batch := list(itertools.islice(reports, size)):
        yield [key for key, _ in batch], [text for _, text in batch]
