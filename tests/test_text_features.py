"""Frozen-text fast path: `vkd-data embed-text` sidecar -> Batch.text_features -> a model without a text encoder."""

import json

import pytest
import torch

from conftest import tiny_overrides
from vkd_dist.build import build_model
from vkd_dist.configure import load_config
from vkd_dist.data.pipeline import eval_loader, train_loader
from vkd_dist.data.schema import read_dataset
from vkd_dist.data.text_features import TextFeatureLookup, feature_dim, write_sidecar
from vkd_dist.data_cli import main as data_main
from vkd_dist.prepare import resolve_tokenizer


def _cfg(data, run, **extra):
    return load_config(overrides=tiny_overrides(data, run, **{"model.freeze_text": True, **extra}))


@pytest.fixture(scope="module")
def sidecar(tiny_data, tmp_path_factory):
    """(cfg, tokenizer, live model, sidecar dir) with the sidecar made from the live model's frozen encoder."""
    run = tmp_path_factory.mktemp("tf-run")
    cfg = _cfg(tiny_data, run)
    info = read_dataset(tiny_data)
    tokenizer = resolve_tokenizer(cfg, info)
    torch.manual_seed(0)
    live = build_model(cfg, len(tokenizer)).eval()
    out = write_sidecar(live.text_encoder, tokenizer, info, ["train", "val"], cfg.data.max_text_len,
                        cfg.model.text_pooling, tmp_path_factory.mktemp("tf-out"), batch_size=16)
    return cfg, tokenizer, live, out


def test_sidecar_layout_and_lookup(sidecar, tiny_data):
    cfg, _, live, out = sidecar
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"] == {"train": 100, "val": 40} and out.name == meta["fingerprint"]
    assert feature_dim(out) == live.text_encoder.out_dim == 64
    keys = json.loads((out / "train.keys.json").read_text())
    lookup = TextFeatureLookup(out, "train")
    assert lookup(keys[3:5]).shape == (2, 64)
    with pytest.raises(KeyError, match="stale"):
        lookup(["no-such-key"])
    with pytest.raises(KeyError, match="test"):
        TextFeatureLookup(out, "test")


@pytest.mark.parametrize("posterior", ["text", "image_text"])
def test_precomputed_posterior_equals_live_frozen_encoder(sidecar, tiny_data, tmp_path, posterior):
    cfg, tokenizer, _, out = sidecar
    fast_cfg = _cfg(tiny_data, tmp_path, **{"data.text_features": str(out), "model.posterior": posterior})
    live_cfg = _cfg(tiny_data, tmp_path, **{"model.posterior": posterior})
    torch.manual_seed(0)
    live = build_model(live_cfg, len(tokenizer)).eval()
    made_it = sidecar[2].text_encoder.state_dict()  # the encoder the sidecar was made with
    assert all(torch.equal(v, made_it[k]) for k, v in live.text_encoder.state_dict().items())
    fast = build_model(fast_cfg, len(tokenizer)).eval()
    assert fast.text_encoder is None  # the text forward pass is gone
    missing, unexpected = fast.load_state_dict(
        {k: v for k, v in live.state_dict().items() if not k.startswith("text_encoder.")}, strict=False)
    assert not missing and not unexpected
    info = read_dataset(tiny_data)
    stream = train_loader(info, "train", fast_cfg.data, tokenizer, seed=0)
    batch = next(iter(stream.epoch(0)))
    assert batch.text_features is not None and batch.text_features.shape == (len(batch), 64)
    with torch.no_grad():
        img = live.image_encoder(batch.image) if posterior == "image_text" else None
        q_live = live.posterior(batch.input_ids, batch.attention_mask, img)
        q_fast = fast.posterior(image_features=img, text_features=batch.text_features)
    torch.testing.assert_close(q_fast.mu, q_live.mu, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(q_fast.logvar, q_live.logvar, atol=1e-5, rtol=1e-4)
    val = next(iter(eval_loader(info, "val", fast_cfg.data, tokenizer)))
    assert val.text_features.shape == (len(val), 64)


def test_embed_text_cli_then_train_with_the_sidecar(tiny_data, tmp_path, capsys):
    from vkd_dist.train import train

    over = tiny_overrides(tiny_data, tmp_path / "run", **{"model.freeze_text": True})
    assert data_main(["embed-text", "--out", str(tmp_path / "tf"), *over]) == 0
    printed = capsys.readouterr().out
    path = printed.strip().splitlines()[-1].split("data.text_features=", 1)[1]
    assert json.loads((tmp_path / "tf").joinpath(path.rsplit("/", 1)[1], "meta.json").read_text())["splits"] == \
        {"train": 100, "val": 40, "test": 60}
    cfg = load_config(overrides=over + [f"data.text_features={path}", "train.max_steps=3"])
    result = train(cfg)
    assert result.step == 3 and result.test is not None
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_kd_from_a_teacher_trained_on_text_features_takes_them_by_itself(tiny_data, tmp_path, capsys):
    """The student names no data.text_features: it adopts its teacher's (a teacher without a text encoder
    needs them in every batch) and says so, instead of failing at step 0."""
    from vkd_dist.run_dir import RunDir
    from vkd_dist.train import train

    over = tiny_overrides(tiny_data, tmp_path / "teacher", **{"model.freeze_text": True})
    assert data_main(["embed-text", "--out", str(tmp_path / "tf"), *over]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1].split("data.text_features=", 1)[1]
    train(load_config(overrides=over + [f"data.text_features={path}", "objective.name=text_only",
                                        "train.max_steps=2", "train.test_at_end=false"]))
    student = tiny_overrides(tiny_data, tmp_path / "student", **{"objective.name": "kd",
                                                                 "objective.kd_teacher": tmp_path / "teacher",
                                                                 "train.max_steps": 2, "train.test_at_end": False})
    result = train(load_config(overrides=student))
    assert result.step == 2
    assert RunDir(tmp_path / "student").config().data.text_features == path  # recorded in its config.yaml
    assert f"data.text_features={path}: the kd teacher's precomputed report features" in capsys.readouterr().out
