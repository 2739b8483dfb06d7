"""`vkd-data label`: a converted corpus with the report labeller's reading as the labels of chosen splits.

Every sample of a chosen split (default: train) gets `labels` = what vkd_dist/data/labeller.py reads off its report,
studies without labels included (they become labelled: labels for every report); the other splits keep their
labels (the reference the models are scored on). Images, reports and every other json key are copied byte for
byte, shard by shard, under the same names; dataset.json keeps the source's label set and policies (uncertain
readings follow its training policy) with the splits' new counts, and records `params.relabelled`.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path

import webdataset as wds

from vkd_dist.data.labeller import ReportLabeller
from vkd_dist.data.schema import add_label_counts, empty_label_counts, read_dataset, write_dataset_json


def _samples(path: Path) -> list[dict]:
    """A shard's samples in order: {"__key__", ext: bytes}."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tf:
        for member in tf.getmembers():
            fh = tf.extractfile(member) if member.isfile() else None
            if fh is not None:
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {"__key__": key})[ext] = fh.read()
    return list(samples.values())


def label_corpus(src: str | Path, out: str | Path, splits: Sequence[str] = ("train",)) -> dict:
    """Write the relabelled corpus into `out` (not `src`); returns its dataset.json contents."""
    info = read_dataset(src)
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is the source corpus; write the labelled copy elsewhere")
    unknown = [s for s in splits if s not in info.meta["splits"]]
    if unknown:
        raise ValueError(f"--splits: {src / 'dataset.json'} has no split {unknown[0]!r} "
                         f"(has: {', '.join(info.meta['splits'])})")
    labeller = ReportLabeller(info.labels)
    label_counts, split_meta = {}, {}
    for split, entry in info.meta["splits"].items():
        counts, unlabelled = empty_label_counts(info.labels), 0
        (out / split).mkdir(parents=True, exist_ok=True)
        for shard in entry["shards"]:
            samples = _samples(src / split / shard["name"])
            metas = [json.loads(s["json"]) for s in samples]
            if split in splits:
                readings = labeller.read_many(s["txt"].decode("utf-8") for s in samples)
                metas = [{**{k: v for k, v in m.items() if k != "labelled"}, "labels": r}
                         for m, r in zip(metas, readings)]
            tmp = out / split / f".tmp-{shard['name']}"
            with wds.TarWriter(str(tmp), mtime=0) as sink:
                for sample, meta in zip(samples, metas):
                    sink.write({**sample, "json": json.dumps(meta, sort_keys=True).encode("utf-8")})
                    if meta.get("labelled", True):
                        add_label_counts(counts, meta["labels"])
                    else:
                        unlabelled += 1
            os.replace(tmp, out / split / shard["name"])
        label_counts[split] = counts
        split_meta[split] = {"num_samples": entry["num_samples"], "shards": entry["shards"],
                             "num_unlabelled": unlabelled}
    if (src / "rejects.csv").is_file():
        shutil.copyfile(src / "rejects.csv", out / "rejects.csv")
    params = {**info.meta.get("params", {}),
              "relabelled": {"from": str(src.resolve()), "splits": list(splits), "by": "vkd_dist.data.labeller"}}
    return write_dataset_json(out, split_meta, info.meta.get("rejects", 0), params, info.meta.get("source", ""),
                              label_counts, info.meta.get("rejects_by_reason"), info.labels, info.eval_policy,
                              info.train_policy)
