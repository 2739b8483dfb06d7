"""The `frozen_text` part: the model step with a live BERT-base-sized text encoder (trainable, and frozen) against
the frozen-text fast path, where the encoder's features arrive precomputed with the batch."""

from __future__ import annotations

import json

from benchmarks.bench import Bench, best, timed_rate
from benchmarks.model import in_memory_batches, model_and_step

BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
BERT_BASE_VOCAB = 30522  # its embedding is part of the cost


def measure_frozen_text(b: Bench) -> dict:
    import torch

    from vkd_dist.data.pipeline import Batch

    # --quick: the configured (tiny) text encoder instead of BERT-base
    text_config = dict(b.cfg.model.text_config) if b.quick else dict(BERT_BASE)
    vocab = b.cfg.model.vocab_size if b.quick else BERT_BASE_VOCAB
    seq = b.cfg.data.max_text_len
    bs = b.batch if b.cuda else 4  # BERT-base steps on a CPU core take seconds: a small batch there
    cfg = b.trainer_cfg(f"model.text_config={json.dumps(text_config)}")
    g = torch.Generator().manual_seed(0)
    base = in_memory_batches(b)[0]

    def batch(with_features: int = 0):
        return Batch(image=base.image[:bs], input_ids=torch.randint(5, vocab, (bs, seq), generator=g),
                     attention_mask=torch.ones(bs, seq, dtype=torch.long), targets=base.targets[:bs],
                     target_mask=base.target_mask[:bs],
                     text_features=torch.randn(bs, with_features, generator=g) if with_features else None)

    n = 10 if b.cuda else (3 if b.quick else 2)
    rates = {}
    for kind in ("live_trainable", "live_frozen"):
        cfg.model.freeze_text = kind == "live_frozen"
        _, _, step = model_and_step(b, cfg, vocab)
        batches = [batch() for _ in range(2)]
        rates[kind] = timed_rate(b, step, batches, n, warmup=1)
        del step
    # The fast path as the trainer builds it for data.text_features: no text encoder, a posterior head as wide
    # as the sidecar's features. The features themselves come with these batches, so the sidecar is its
    # meta.json alone.
    dim = text_config["hidden_size"]
    sidecar = b.workdir / "text-features"
    sidecar.mkdir(exist_ok=True)
    (sidecar / "meta.json").write_text(json.dumps({"dim": dim, "splits": {}}))
    cfg.model.freeze_text, cfg.data.text_features = False, str(sidecar)
    _, _, step = model_and_step(b, cfg)
    batches = [batch(dim) for _ in range(2)]
    rates["fast_path"] = best(lambda: timed_rate(b, step, batches, max(n, 10), warmup=2), b.repeat)
    return {"frozen_text_encoder": f"BERT {text_config} vocab {vocab}, seq {seq}, batch {bs}, random init",
            "frozen_text_how": "model step, text_features= precomputed tensor (not via vkd-data embed-text)",
            "live_trainable_samples_s": rates["live_trainable"], "live_frozen_samples_s": rates["live_frozen"],
            "fast_path_samples_s": rates["fast_path"]}
