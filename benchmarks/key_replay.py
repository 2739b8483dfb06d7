"""The key replay of a resume on another layout (vkd_dist/data/rest.py): bytes read and seconds to list every
sample key of a split's shards, two ways.

    python -m benchmarks.key_replay [--data DIR] [--samples 100000] [--image-size 64] [--per-shard 1000]

- headers: `rest.samples_of`, what a resume runs: the tar headers only, each member's data seeked over;
- stream: webdataset's tar reader in stream mode with no member selected (tar_file_iterator + group_by_keys), which
  skips a member's data by reading it.
Both list the same keys (checked). Bytes read: the process's `rchar` (/proc/self/io, every byte read() returned,
page cache included); seconds: wall clock, the shards warm in the page cache (each way runs after one untimed
pass). The corpus is `vkd-data synthetic`'s format (jpg + txt + json per sample), built into --data when missing.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from webdataset.tariterators import group_by_keys, tar_file_iterator

from vkd_dist.data.rest import samples_of, shard_members
from vkd_dist.data.schema import read_dataset


def read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar line")


def headers(urls: list[str]) -> list[str]:
    shard_members.cache_clear()
    return [key for _, key in samples_of(urls)]


def stream_names(url: str) -> list[str]:
    names: list[str] = []
    with open(url, "rb") as fh:
        for _ in tar_file_iterator(fh, select_files=lambda name: names.append(name) is not None):  # select none
            pass
    return names


def stream(urls: list[str]) -> list[str]:
    members = ({"fname": n, "data": b"", "__url__": url} for url in urls for n in stream_names(url))
    return [s["__key__"] for s in group_by_keys(members)]


def measure(fn: Callable[[list[str]], list[str]], urls: list[str]) -> tuple[list[str], int, float]:
    fn(urls)  # warm the page cache: both ways are timed on the same footing
    before, start = read_bytes(), time.perf_counter()
    keys = fn(urls)
    return keys, read_bytes() - before, time.perf_counter() - start


def corpus(root: Path, samples: int, image_size: int, per_shard: int) -> list[str]:
    if not (root / "dataset.json").is_file():
        from vkd_dist.data.synthetic import build_synthetic

        build_synthetic(root, samples, 1, 1, image_size=image_size, samples_per_shard=per_shard, progress=False)
    return read_dataset(root).shards("train")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=".cache/key-replay-corpus", help="the corpus (built here when missing)")
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--per-shard", type=int, default=1000)
    args = ap.parse_args(argv)
    urls = corpus(Path(args.data), args.samples, args.image_size, args.per_shard)
    total = sum(Path(u).stat().st_size for u in urls)
    result: dict = {"shards": len(urls), "shard_bytes": total}
    keys = {}
    for name, fn in (("stream", stream), ("headers", headers)):
        keys[name], n, seconds = measure(fn, urls)
        result[name] = {"bytes_read": n, "percent_of_shards": round(100 * n / total, 3), "seconds": round(seconds, 3)}
    assert keys["headers"] == keys["stream"], "the two ways list different keys"
    result["samples"] = len(keys["headers"])
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
