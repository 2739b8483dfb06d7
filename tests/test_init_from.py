"""model.init_from: a run starts exactly the modules model.init_modules names from another run's weights (here a
contrastive pre-training run's image encoder), validated before any work; model.freeze_image keeps them as loaded
(a linear probe)."""

import pytest
import torch

from conftest import tiny_overrides, two_step_run
from vkd_dist.config import ConfigError
from vkd_dist.configure import load_config
from vkd_dist.train import train
from vkd_dist.weights import load_weights


@pytest.fixture(scope="module")
def contrastive_run(tiny_data, tmp_path_factory):
    """A 2-step contrastive pre-training run, checkpointed at its last step."""
    return two_step_run(tiny_data, tmp_path_factory.mktemp("contrastive") / "run", "contrastive")


def _state(cfg):
    from vkd_dist.run import build_run

    return {k: v.clone() for k, v in build_run(cfg).model.state_dict().items()}


def test_init_from_loads_exactly_the_named_encoder_and_leaves_the_rest_at_their_init(tiny_data, contrastive_run,
                                                                                   tmp_path):
    source = load_weights(contrastive_run / "checkpoints" / "step-00000002" / "model.safetensors")
    fresh = _state(load_config(overrides=tiny_overrides(tiny_data, tmp_path / "fresh", objective="image_only")))
    started = _state(load_config(overrides=tiny_overrides(tiny_data, tmp_path / "probe", objective="image_only", **{
        "model.init_from": str(contrastive_run)})))
    assert set(started) == set(fresh)
    encoder = [k for k in started if k.startswith("image_encoder.")]
    assert encoder and all(torch.equal(started[k], source[k]) for k in encoder)
    assert any(not torch.equal(fresh[k], source[k]) for k in encoder)  # pre-training moved them: a real copy
    others = [k for k in started if not k.startswith("image_encoder.")]
    assert others and all(torch.equal(started[k], fresh[k]) for k in others)  # the heads keep their init


def test_a_linear_probe_trains_the_heads_on_a_frozen_pretrained_encoder(tiny_data, contrastive_run, tmp_path):
    source = load_weights(contrastive_run / "checkpoints" / "step-00000002" / "model.safetensors")
    run = tmp_path / "probe"
    train(load_config(overrides=tiny_overrides(tiny_data, run, objective="image_only", **{
        "model.init_from": str(contrastive_run), "model.freeze_image": True, "train.max_steps": 2,
        "train.ckpt_every": 2, "train.test_at_end": False})))
    after = load_weights(run / "checkpoints" / "step-00000002" / "model.safetensors")
    assert all(torch.equal(after[k], source[k]) for k in after if k.startswith("image_encoder."))
    assert not torch.equal(after["prior_head.mu.weight"], source["prior_head.mu.weight"])


def test_init_from_is_validated_before_any_work(tiny_data, contrastive_run, tmp_path):
    from vkd_dist.config import save_config

    image_only = tmp_path / "image_only_run"
    save_config(load_config(overrides=tiny_overrides(tiny_data, image_only, objective="image_only")),
                image_only / "config.yaml")
    cases = [({"model.init_from": str(tmp_path / "nowhere")}, "no such file or directory"),
             ({"model.init_from": str(tmp_path)}, "no config.yaml there"),
             ({"model.init_from": str(contrastive_run), "model.image_encoder_kwargs": "{depth: 1, embed_dim: 48, "
               "num_heads: 2, patch_size: 16}"}, r"its image_encoder is another architecture \(model.image_encoder_"
                                                 "kwargs"),
             ({"model.init_from": str(contrastive_run), "model.init_modules": "[text_encoder]"},
              "objective image_only builds no text_encoder"),
             ({"model.init_from": str(image_only), "model.init_modules": "[text_encoder]", "objective": "vkd"},
              "its objective image_only built no text_encoder")]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            load_config(overrides=tiny_overrides(tiny_data, tmp_path / "student", **{"objective": "image_only",
                                                                                     **overrides}))
        assert "\n" not in str(err.value) and str(err.value).startswith("model.init_from=")
    with pytest.raises(ConfigError, match="model.init_modules='encoder' is not allowed"):
        load_config(overrides=tiny_overrides(tiny_data, tmp_path / "student", objective="image_only", **{
            "model.init_from": str(contrastive_run), "model.init_modules": "[encoder]"}))
