"""Token ids of every training report, tokenised once per run so that loader workers look them up by sample
key instead of tokenising each report every epoch.

Why: tokenising a report costs ~0.14 ms on one core, more than decoding its 128-px JPEG, and a per-worker
cache rarely hits when many workers are dealt fresh shards every epoch. Built on rank 0 at the start of a
run with the fast tokenizer's Rust `encode_batch` on every core:

    RUN/tokens/<split>.ids.npy        int32 [total]: every report's ids, concatenated (memory-mapped by workers)
    RUN/tokens/<split>.offsets.npy    int64 [N + 1]: row i is ids[offsets[i]:offsets[i + 1]]
    RUN/tokens/<split>.keys.json      the sample keys, in row order
    RUN/tokens/<split>.json           the fingerprint: tokenizer, max_text_len, shard names and sizes

A resumed run reuses the table while the fingerprint matches. The ids are exactly those of the tokenizer's
own call with truncation (special tokens included); padding happens in the collate.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np


def fast_backend(tokenizer, max_len: int):
    """A copy of a fast tokenizer's Rust backend that truncates and does not pad (the collate pads), or None
    for tokenizers without one or padding on the left. A copy: the wrapper resets its own on every call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.pad_token_id is None or tokenizer.padding_side != "right":
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_padding()
    copy.enable_truncation(max_len, direction=tokenizer.truncation_side)
    return copy


class TokenTable:
    """key -> int32 token ids of one split; memory-mapped lazily in whichever process reads it, so it pickles
    cheaply into DataLoader workers and its pages are shared between them."""

    def __init__(self, root: str | Path, split: str):
        self.root, self.split = Path(root), split
        self._rows: Optional[dict] = None

    def _path(self, suffix: str) -> Path:
        return self.root / f"{self.split}.{suffix}"

    def __getstate__(self) -> dict:
        return {"root": self.root, "split": self.split, "_rows": None}

    def _open(self) -> None:
        # Still the mapped pages, as a plain read-only ndarray: a np.memmap slice costs 10x a plain one, and
        # python ints index faster than numpy scalars (a lookup per sample).
        self._ids = np.asarray(np.load(self._path("ids.npy"), mmap_mode="r"))
        self._offsets = np.load(self._path("offsets.npy")).tolist()
        self._rows = {k: i for i, k in enumerate(json.loads(self._path("keys.json").read_text()))}

    def get(self, key: str) -> Optional[np.ndarray]:
        if self._rows is None:
            self._open()
        i = self._rows.get(key)
        return None if i is None else self._ids[self._offsets[i]:self._offsets[i + 1]]

    def __len__(self) -> int:
        if self._rows is None:
            self._open()
        return len(self._rows)


def _fingerprint(tokenizer, max_len: int, shards: list[str]) -> str:
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps({"max_len": max_len, "shards": [(Path(s).name, os.path.getsize(s)) for s in shards]}).encode())
    return h.hexdigest()[:16]


def build_token_table(root: str | Path, split: str, shards: list[str], tokenizer, max_len: int,
                      chunk: int = 8192) -> Optional[TokenTable]:
    """Tokenise every report of `shards` into ROOT/<split>.*, unless a table with the same fingerprint is there.
    None for tokenizers without a fast backend (the collate then tokenises)."""
    from vkd_dist.data.schema import shard_reports

    backend = fast_backend(tokenizer, max_len)
    if backend is None:
        return None
    table = TokenTable(root, split)
    fingerprint = _fingerprint(tokenizer, max_len, shards)
    stamp = table._path("json")
    if stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
        return table
    keys, rows, pending = [], [], []

    def flush():
        rows.extend(np.asarray(e.ids, dtype=np.int32) for e in backend.encode_batch([t for _, t in pending]))
        keys.extend(k for k, _ in pending)
        pending.clear()

    for item in shard_reports(shards):
        pending.append(item)
        if len(pending) >= chunk:
            flush()
    flush()
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    tmp = TokenTable(Path(root) / f".tmp-{split}-{os.getpid()}", split)
    tmp.root.mkdir(parents=True, exist_ok=True)
    np.save(tmp._path("ids.npy"), np.concatenate(rows) if rows else np.zeros(0, np.int32))
    np.save(tmp._path("offsets.npy"), offsets)
    tmp._path("keys.json").write_text(json.dumps(keys))
    stamp.unlink(missing_ok=True)  # the stamp goes last: a half-replaced table is never taken for a whole one
    for name in ("ids.npy", "offsets.npy", "keys.json"):
        os.replace(tmp._path(name), table._path(name))
    tmp.root.rmdir()
    stamp.write_text(json.dumps({"fingerprint": fingerprint, "reports": len(keys), "tokens": int(offsets[-1])}))
    # Forked loader workers inherit a tokenizer that used its thread pool; said explicitly, they quietly run
    # single-threaded instead of printing a warning each.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return table
