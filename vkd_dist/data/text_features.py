"""Frozen-text fast path: the frozen text encoder's outputs, computed once per sample into a sidecar of the shards.

`vkd-data embed-text --config CFG [key=value ...]` runs the (frozen) text encoder of that config over every
report of the splits and writes

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

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from vkd_dist.data.schema import shard_reports

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


class TextFeatureLookup:
    """key -> feature row of one split; opened lazily (memory-mapped) in whichever process uses it, so it pickles
    cheaply into DataLoader workers."""

    def __init__(self, path: str | Path, split: str):
        self.path, self.split = Path(path), split
        self._rows: Optional[dict] = None
        self._file = None
        meta = _meta(self.path)
        if split not in meta.get("splits", {}):
            raise KeyError(f"{self.path}: no features for split {split!r} (has {sorted(meta.get('splits', {}))}); "
                           f"run vkd-data embed-text --splits {split}")

    def __getstate__(self):
        return {"path": self.path, "split": self.split, "_rows": None, "_file": None}

    def _open(self) -> None:
        from safetensors import safe_open

        keys = json.loads((self.path / f"{self.split}.keys.json").read_text())
        self._rows = {k: i for i, k in enumerate(keys)}
        self._file = safe_open(str(self.path / f"{self.split}.safetensors"), framework="pt")

    def __call__(self, keys: list[str]) -> torch.Tensor:
        if self._rows is None:
            self._open()
        sl = self._file.get_slice("features")
        rows = []
        for key in keys:
            i = self._rows.get(key)
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


def write_sidecar(encoder, tokenizer, info, splits: list[str], max_text_len: int, pooling: str,
                  out_root: Optional[str | Path] = None, batch_size: int = 64, device="cpu",
                  source: str = "") -> Path:
    """Embed every report of `splits`; returns the sidecar directory (the value for data.text_features)."""
    from safetensors.torch import save_file

    encoder = encoder.to(device).eval()
    fp = fingerprint(encoder, pooling, max_text_len, tokenizer)
    root = Path(out_root) if out_root else Path(info.root) / SUBDIR
    out = root / fp
    tmp = root / f".tmp-{fp}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    old = _meta(out) if (out / META).is_file() else {"splits": {}}
    counts = dict(old.get("splits", {}))
    dim = None
    for split in splits:
        keys, feats, pending = [], [], []

        def flush():
            feats.append(embed_texts(encoder, tokenizer, [t for _, t in pending], max_text_len, device))
            keys.extend(k for k, _ in pending)
            pending.clear()

        for key, text in shard_reports(info.shards(split)):
            pending.append((key, text))
            if len(pending) >= batch_size:
                flush()
        if pending:
            flush()
        if len(set(keys)) != len(keys):
            raise ValueError(f"split {split}: sample keys are not unique; features could not be looked up by key")
        features = torch.cat(feats) if feats else torch.zeros(0, getattr(encoder, "out_dim", 0))
        dim = features.shape[1]
        save_file({"features": features.contiguous()}, str(tmp / f"{split}.safetensors"), metadata={"format": "pt"})
        (tmp / f"{split}.keys.json").write_text(json.dumps(keys))
        counts[split] = len(keys)
    meta = {"fingerprint": fp, "dim": dim, "text_encoder": source, "pooling": pooling, "max_text_len": max_text_len,
            "splits": counts, "dtype": "float32"}
    (tmp / META).write_text(json.dumps(meta, indent=2))
    out.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():  # per-file replace: splits embedded earlier stay
        os.replace(f, out / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- `vkd-data embed-text`
def add_subcommand(sub) -> None:
    p = sub.add_parser("embed-text", help="precompute the frozen text encoder's outputs into a sidecar of the shards")
    p.add_argument("--config", help="training config (default: configs/default.yaml)")
    p.add_argument("--splits", nargs="+", default=None, help="default: the config's train, val and test splits")
    p.add_argument("--out", help="sidecar root (default: DATA/text_features)")
    p.add_argument("--batch-size", type=int, default=64, help="reports per text-encoder forward pass")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, as for vkd-train")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import sys

    from vkd_dist.config import ConfigError, load_config
    from vkd_dist.models.encoders import build_text_encoder
    from vkd_dist.prepare import ensure_dataset, resolve_tokenizer

    overrides = [o for o in args.overrides if not o.startswith("data.text_features=")] + ["data.text_features=null"]
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"vkd-data embed-text: config error: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(cfg.train.seed)  # a random tiny-bert is reproducible; real use: a local pretrained encoder
    info = ensure_dataset(cfg)
    tokenizer = resolve_tokenizer(cfg, info)
    encoder = build_text_encoder(cfg.model, len(tokenizer))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    splits = args.splits or [cfg.data.train_split, cfg.data.val_split, cfg.data.test_split]
    out = write_sidecar(encoder, tokenizer, info, splits, cfg.data.max_text_len, cfg.model.text_pooling, args.out,
                        args.batch_size, device, source=cfg.model.text_encoder)
    meta = _meta(out)
    print(f"text features ({meta['dim']}-d, " + ", ".join(f"{s} {n}" for s, n in meta["splits"].items()) +
          f") in {out}\ntrain with: data.text_features={out}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vkd-data")
    add_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
