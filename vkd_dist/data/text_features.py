"""Frozen-text fast path: the frozen text encoder's outputs, computed once per sample into a sidecar of the shards.

`vkd-data embed-text --config CFG [key=value ...]` (vkd_dist/data_cli.py) runs the (frozen) text encoder of that
config over every report of the splits and writes

    DATA/text_features/<fingerprint>/meta.json             encoder, pooling, max_text_len, dim, splits
    DATA/text_features/<fingerprint>/<split>.safetensors   "features": float32 [N, D], row i = keys[i]
    DATA/text_features/<fingerprint>/<split>.keys.json     the sample keys, in row order

where <fingerprint> hashes the encoder weights, pooling, max_text_len and tokenizer vocabulary, so a sidecar
can never be read with another encoder's features. Training with `data.text_features=THAT_DIR` makes the
pipeline attach `Batch.text_features` (looked up by sample key in the loader workers) and builds the model
without a text encoder: the text forward pass (and its memory) is gone. The sidecar implies a frozen text
encoder; the posterior it gives equals the live frozen encoder's (in eval mode) within float tolerance.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch

from vkd_dist.data.schema import DatasetInfo, shard_report_batches
from vkd_dist.fileio import atomic_write_bytes, atomic_write_text

META = "meta.json"
SUBDIR = "text_features"


# --------------------------------------------------------------------------- reading
def _meta(path: str | Path) -> dict:
    path = Path(path)
    if not (path / META).is_file():
        raise FileNotFoundError(f"{path}: not a text-feature sidecar (no {META}); make one with vkd-data embed-text")
    return json.loads((path / META).read_text())


def feature_dim(path: str | Path) -> int:
    """The width D of the precomputed features (what the posterior head takes in)."""
    return int(_meta(path)["dim"])


def sidecar_summary(path: str | Path) -> str:
    """What a sidecar holds, in words: "text features (D-d, train N, val M)"."""
    meta = _meta(path)
    return f"text features ({meta['dim']}-d, " + ", ".join(f"{s} {n}" for s, n in meta["splits"].items()) + ")"


class TextFeatureLookup:
    """key -> feature row of one split; opened lazily (memory-mapped) in whichever process uses it, so it pickles
    cheaply into DataLoader workers."""

    def __init__(self, path: str | Path, split: str):
        self.path, self.split = Path(path), split
        self._rows: Optional[dict[str, int]] = None
        self._file: Any = None  # a safetensors safe_open handle, once opened
        meta = _meta(self.path)
        if split not in meta.get("splits", {}):
            raise KeyError(f"{self.path}: no features for split {split!r} (has {sorted(meta.get('splits', {}))}); "
                           f"run vkd-data embed-text --splits {split}")

    def __getstate__(self):
        return {"path": self.path, "split": self.split, "_rows": None, "_file": None}

    def _index(self) -> dict[str, int]:
        if self._rows is None:
            from safetensors import safe_open

            keys = json.loads((self.path / f"{self.split}.keys.json").read_text())
            self._file = safe_open(str(self.path / f"{self.split}.safetensors"), framework="pt")
            self._rows = {k: i for i, k in enumerate(keys)}
        return self._rows

    def __call__(self, keys: list[str]) -> torch.Tensor:
        index = self._index()
        sl = self._file.get_slice("features")
        rows = []
        for key in keys:
            i = index.get(key)
            if i is None:
                raise KeyError(f"{self.path}/{self.split}: no precomputed features for sample {key!r}; "
                               "the sidecar is stale: rerun vkd-data embed-text")
            rows.append(sl[i:i + 1])
        return torch.cat(rows)


# --------------------------------------------------------------------------- writing
def fingerprint(encoder: torch.nn.Module, pooling: str, max_text_len: int, tokenizer) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"pooling": pooling, "max_text_len": max_text_len}, sort_keys=True).encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def embed_texts(encoder, tokenizer, texts: list[str], max_text_len: int, device="cpu") -> torch.Tensor:
    """Tokenised exactly as the training pipeline does (pipeline.Collate), encoded in eval mode."""
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_text_len, pad_to_multiple_of=8,
                    return_tensors="pt")
    out = encoder(enc["input_ids"].to(device), enc["attention_mask"].to(device))
    return out.float().cpu()


def write_sidecar(encoder, tokenizer, info: DatasetInfo, splits: list[str], max_text_len: int, pooling: str,
                  out_root: Optional[str | Path] = None, batch_size: int = 64, device="cpu",
                  source: str = "") -> Path:
    """Embed every report of `splits`; returns the sidecar directory (the value for data.text_features). Splits
    embedded earlier into the same directory stay; meta.json is written last."""
    from safetensors.torch import save

    encoder = encoder.to(device).eval()
    fp = fingerprint(encoder, pooling, max_text_len, tokenizer)
    out = (Path(out_root) if out_root else Path(info.root) / SUBDIR) / fp
    counts = dict(_meta(out).get("splits", {})) if (out / META).is_file() else {}
    dim = None
    for split in splits:
        keys: list[str] = []
        feats: list[torch.Tensor] = []
        for batch_keys, texts in shard_report_batches(info.shards(split), batch_size):
            feats.append(embed_texts(encoder, tokenizer, texts, max_text_len, device))
            keys.extend(batch_keys)
        if len(set(keys)) != len(keys):
            raise ValueError(f"split {split}: sample keys are not unique; features could not be looked up by key")
        features = torch.cat(feats) if feats else torch.zeros(0, getattr(encoder, "out_dim", 0))
        dim = features.shape[1]
        atomic_write_bytes(out / f"{split}.safetensors", save({"features": features.contiguous()}, {"format": "pt"}))
        atomic_write_text(out / f"{split}.keys.json", json.dumps(keys))
        counts[split] = len(keys)
    meta = {"fingerprint": fp, "dim": dim, "text_encoder": source, "pooling": pooling, "max_text_len": max_text_len,
            "splits": counts, "dtype": "float32"}
    atomic_write_text(out / META, json.dumps(meta, indent=2))
    return out
