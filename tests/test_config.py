import pytest
import yaml

from vkd_dist.config import ConfigError, load_config, save_config


def test_default_config_loads_and_overrides_apply():
    cfg = load_config(overrides=["data.path=/tmp/x", "train.max_steps=100", "objective=image_only", "train.seed=3",
                                 "run_dir=runs/r", "model.text_config.num_hidden_layers=4", "optim.lr=1e-3"])
    assert cfg.data.path == "/tmp/x"
    assert cfg.train.max_steps == 100
    assert cfg.objective.name == "image_only"  # the section shorthand sets objective.name
    assert cfg.train.seed == 3 and cfg.run_dir == "runs/r"
    assert cfg.model.text_config["num_hidden_layers"] == 4
    assert cfg.model.text_config["hidden_size"] == 128  # other keys of the default dict survive
    assert cfg.optim.lr == pytest.approx(1e-3)


@pytest.mark.parametrize("override, words", [
    (["objective=vkdd"], ["objective.name", "vkd", "image_only", "text_only", "kd"]),
    (["data.uncertain=maybe"], ["data.uncertain", "ignore", "ones", "zeros"]),
    (["train.max_step=3"], ["train.max_step", "max_steps"]),
    (["train.max_steps=abc"], ["train.max_steps", "integer"]),
    (["train.max_steps=0"], ["train.max_steps", "positive"]),
    (["data=3"], ["data", "section"]),
    (["bogus"], ["key=value"]),
    (["objective=kd"], ["objective.kd_teacher"]),
    (["model.text_encoder=/nonexistent/bert"], ["model.text_encoder", "local"]),
])
def test_bad_config_fails_with_the_key_and_allowed_values(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=override)
    for w in words:
        assert w in str(err.value)


def test_yaml_include_and_roundtrip(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {max_steps: 7}\nmodel: {latent_dim: 8}\n")
    (tmp_path / "exp.yaml").write_text("include: [base.yaml]\ntrain: {seed: 5}\n")
    cfg = load_config(tmp_path / "exp.yaml", ["model.latent_dim=9"])
    assert (cfg.train.max_steps, cfg.train.seed, cfg.model.latent_dim) == (7, 5, 9)
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["seed"] == 5


def test_unknown_yaml_key_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text("optim: {learning_rate: 0.1}\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config(tmp_path / "c.yaml")
