import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test gets the environment the session started with. Launch code exports RANK/WORLD_SIZE/MASTER_ADDR
    and Accelerate's strategy variables into the process it runs in; leaked into later tests, a plain
    single-process run would wait for a rendezvous with ranks that never come."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic corpus with uneven train shards (32, 32, 32, 4 samples)."""
    from vkd_dist.data.synthetic import build_synthetic

    out = tmp_path_factory.mktemp("tiny-data")
    build_synthetic(out, 100, 40, 60, image_size=64, seed=1, samples_per_shard=32, workers=2, progress=False)
    return out


def tiny_overrides(data: Path, run_dir: Path, **extra) -> list[str]:
    """Overrides for a seconds-long CPU run on `data` (configs/tiny.yaml, shared with the benchmark's --quick);
    `extra` (dotted keys) comes last, so it wins."""
    from vkd_dist.config import overrides_from_yaml

    return [f"run_dir={run_dir}", f"data.path={data}", *overrides_from_yaml(TINY_CONFIG),
            *(f"{k}={v}" for k, v in extra.items())]


def two_step_run(data: Path, run_dir: Path, objective: str) -> Path:
    """A 2-step tiny run of `objective` on `data`, checkpointed at step 2 (and final/): a source of weights."""
    from vkd_dist.configure import load_config
    from vkd_dist.train import train

    train(load_config(overrides=tiny_overrides(data, run_dir, objective=objective, **{
        "train.max_steps": 2, "train.ckpt_every": 2, "train.test_at_end": False})))
    return run_dir


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
