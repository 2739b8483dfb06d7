"""Token ids of every training report, tokenised once per run so that loader workers look them up by sample
key instead of tokenising each report every epoch.

Why: tokenising a report costs ~0.14 ms on one core, more than decoding its 128-px JPEG, and a per-worker
cache rarely hits when many workers are dealt fresh shards every epoch. Built on rank 0 at the start of a
run with the fast tokenizer's Rust `encode_batch` on every core:

    RUN/tokens/<split>.ids.npy        int32 [total]: every report's ids, concatenated (memory-mapped by workers)
    RUN/tokens/<split>.offsets.npy    int64 [N + 1]: row i is ids[offsets[i]:offsets[i + 1]]
    RUN/tokens/<split>.keys.json      the sample keys, in row order
    RUN/tokens/<split>.json           the fingerprint: tokenizer, max_text_len, shard names and sizes

A resumed run reuses the table while the fingerprint matches; data.keep_token_table=false deletes it when the run
finishes (`remove_token_tables`), since it holds every training report. The ids are exactly those of the tokenizer's
own call with truncation (special tokens included); padding happens in the collate.

Also here: the run's own WordPiece tokenizer (RUN/tokenizer), built from the training reports when the config
names no pretrained one, and loading a tokenizer directory.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Optional

import numpy as np

from vkd_dist.data.schema import shard_reports
from vkd_dist.fileio import atomic_write_bytes, atomic_write_text, replace_dir

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


# ----------------------------------------------------------------------------------------- the tokenizer
def report_texts(shards: list[str], limit: int = 20000) -> list[str]:
    """Report texts from shards (no image decoding), in shard order, for building the tokenizer."""
    return [text for _, text in itertools.islice(shard_reports(shards), limit)]


def build_wordpiece_vocabulary(texts: Iterable[str], vocab_size: int) -> list[str]:
    """A BERT WordPiece vocabulary of at most `vocab_size` tokens (more only if the characters alone exceed it):
    the special tokens, every character (alone and as a ##continuation), then the most frequent words.

    Ties are broken alphabetically, so the same reports always give the same token ids. The `tokenizers`
    WordPieceTrainer does not: it numbers continuation tokens in hash-map order, which changes from run to run
    and with it the merges and every token id (huggingface/tokenizers#1794)."""
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    vocab = list(SPECIAL_TOKENS) + chars + [f"##{c}" for c in chars]
    seen = set(vocab)
    for word, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        if word not in seen:
            vocab.append(word)
            seen.add(word)
    return vocab


def build_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path):
    """A BERT-style fast tokenizer over `build_wordpiece_vocabulary(texts, vocab_size)`, saved to `out_dir`
    (replacing what was there) and loaded back from it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = build_wordpiece_vocabulary(texts, vocab_size)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    fast.save_pretrained(tmp)
    replace_dir(tmp, out_dir)
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# ----------------------------------------------------------------------------------------- the token table
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
        self._rows: Optional[dict[str, int]] = None

    def _path(self, suffix: str) -> Path:
        return self.root / f"{self.split}.{suffix}"

    def __getstate__(self) -> dict:
        return {"root": self.root, "split": self.split, "_rows": None}

    def _index(self) -> dict[str, int]:
        if self._rows is None:
            # Still the mapped pages, as a plain read-only ndarray: a np.memmap slice costs 10x a plain one, and
            # python ints index faster than numpy scalars (a lookup per sample).
            self._ids = np.asarray(np.load(self._path("ids.npy"), mmap_mode="r"))
            self._offsets = np.load(self._path("offsets.npy")).tolist()
            self._rows = {k: i for i, k in enumerate(json.loads(self._path("keys.json").read_text()))}
        return self._rows

    def get(self, key: str) -> Optional[np.ndarray]:
        i = self._index().get(key)
        return None if i is None else self._ids[self._offsets[i]:self._offsets[i + 1]]

    def __len__(self) -> int:
        return len(self._index())


def _fingerprint(tokenizer, max_len: int, shards: list[str]) -> str:
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps({"max_len": max_len, "shards": [(Path(s).name, os.path.getsize(s)) for s in shards]}).encode())
    return h.hexdigest()[:16]


def build_token_table(root: str | Path, split: str, shards: list[str], tokenizer, max_len: int,
                      chunk: int = 8192) -> Optional[TokenTable]:
    """Tokenise every report of `shards` into ROOT/<split>.*, unless a table with the same fingerprint is there.
    None for tokenizers without a fast backend (the collate then tokenises)."""
    backend = fast_backend(tokenizer, max_len)
    if backend is None:
        return None
    table = TokenTable(root, split)
    fingerprint = _fingerprint(tokenizer, max_len, shards)
    stamp = table._path("json")
    if stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
        return table
    keys: list[str] = []
    rows: list[np.ndarray] = []
    pending: list[tuple[str, str]] = []

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
    stamp.unlink(missing_ok=True)  # the stamp goes last: a half-replaced table is never taken for a whole one
    _save_npy(table._path("ids.npy"), np.concatenate(rows) if rows else np.zeros(0, np.int32))
    _save_npy(table._path("offsets.npy"), offsets)
    atomic_write_text(table._path("keys.json"), json.dumps(keys))
    atomic_write_text(stamp, json.dumps({"fingerprint": fingerprint, "reports": len(keys), "tokens": int(offsets[-1])}))
    # Forked loader workers inherit a tokenizer that used its thread pool; said explicitly, they quietly run
    # single-threaded instead of printing a warning each.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return table


def remove_token_tables(root: str | Path, log: Callable[[str], None]) -> None:
    """Delete a run's token tables (data.keep_token_table=false, at the end of a finished run): they hold every
    training report as token ids, which the run's tokenizer decodes back into text. A failure is logged, not
    raised: the run's results are complete by then, and the other ranks are not waiting for this one."""
    root = Path(root)
    if not root.exists():
        return
    try:
        shutil.rmtree(root)
    except OSError as exc:
        log(f"warning: could not delete {root} (data.keep_token_table=false): {exc}; delete it by hand")
    else:
        log(f"deleted {root} (data.keep_token_table=false)")


def _save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())
