import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic corpus with uneven train shards (32, 32, 32, 4 samples)."""
    from vkd_dist.data.synthetic import build_synthetic

    out = tmp_path_factory.mktemp("tiny-data")
    build_synthetic(out, 100, 40, 60, image_size=64, seed=1, samples_per_shard=32, workers=2, progress=False)
    return out


def tiny_overrides(data: Path, run_dir: Path, **extra) -> list[str]:
    """Overrides for a seconds-long CPU run: ViT depth 2 at 64 px, 2-layer BERT of width 64."""
    base = {
        "run_dir": str(run_dir), "data.path": str(data), "data.build_synthetic": False,
        "data.image_size": 64, "data.batch_size": 8, "data.eval_batch_size": 32, "data.num_workers": 0,
        "data.shuffle_buffer": 16, "model.image_encoder": "vit_small_patch16_224",
        "model.image_encoder_kwargs": "{depth: 2, embed_dim: 48, num_heads: 2, patch_size: 16}",
        "model.text_config": "{hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 128}",
        "model.vocab_size": 400, "model.latent_dim": 16, "model.hidden_dim": 32, "model.num_samples": 2,
        "train.max_steps": 6, "train.eval_every": 100, "train.ckpt_every": 100, "logging.log_every": 2,
        "logging.progress": False, "optim.warmup_steps": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def read_shards(out: Path, split: str) -> dict:
    """key -> {meta, text, image bytes} for every sample of a written split, read with plain tarfile."""
    import json
    import tarfile

    samples: dict = {}
    for tar_path in sorted((out / split).glob("shard-*.tar")):
        with tarfile.open(tar_path) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return {k: {"meta": json.loads(v["json"]), "text": v["txt"].decode(), "image": v.get("jpg") or v.get("png")}
            for k, v in samples.items()}
