from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_CONFIG
from vkd_dist.config import (
    DEFAULT_CONFIG,
    Config,
    ConfigError,
    close_match,
    overrides_from_yaml,
    save_config,
    to_dict,
)
from vkd_dist.configure import load_config

RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))
# Recipes name directories that exist only on a cluster: stand-ins that validate here.
# objective.text_init names the run a recipe starts from (vkd_distil.yaml: its teacher's), made by an earlier run.
LOCAL = ["model.text_encoder=tiny-bert", "model.image_weights=null", "model.tokenizer=null", "objective.text_init=null"]


def test_default_config_loads_and_overrides_apply(tmp_path):
    cfg = load_config(overrides=[f"data.path={tmp_path}", "data.build_synthetic=true", "train.max_steps=100",
                                 "objective=image_only", "train.seed=3", "run_dir=runs/r",
                                 "model.text_config.num_hidden_layers=4", "optim.lr=1e-3"])
    assert cfg.data.path == str(tmp_path)
    assert cfg.train.max_steps == 100
    assert cfg.objective.name == "image_only"  # the section shorthand sets objective.name
    assert cfg.train.seed == 3 and cfg.run_dir == "runs/r"
    assert cfg.model.text_config["num_hidden_layers"] == 4
    assert cfg.model.text_config["hidden_size"] == 128  # other keys of the default dict survive
    assert cfg.optim.lr == pytest.approx(1e-3)


@pytest.mark.parametrize("override, message", [
    (["objective=vkdd"], "objective.name='vkdd' is not allowed (allowed: vkd, image_only, text_only, kd, contrastive; "
                         "did you mean vkd?)"),
    (["data.uncertain=one"],
     "data.uncertain='one' is not allowed (allowed: null, ignore, ones, zeros; did you mean ones?)"),
    (["model.in_chans=2"], "model.in_chans=2 is not allowed (allowed: 1, 3)"),
    (["train.max_step=3"], "unknown key train.max_step (train allows: bootstrap_resamples, "),
    (["train.max_step=3"], "; did you mean max_steps?)"),
    (["train.max_steps=abc"], "train.max_steps: expected an integer, got 'abc'"),
    (["train.max_steps=0"], "train.max_steps=0 must be positive"),
    (["data=3"], "data is a section; set one of its keys"),
    (["bogus"], "override 'bogus' is not of the form key=value"),
    (["objective=kd"], "objective.kd_teacher must name a text_only run directory"),
    (["objective=vkd_distil"], "objective.name='vkd_distil' is not an objective but a setting of vkd: select it with "
                               "--config configs/recipes/vkd_distil.yaml, after the text_only run of "
                               "configs/recipes/vkd_distil_teacher.yaml"),
    (["model.text_encoder=/nonexistent/bert"], "model.text_encoder='/nonexistent/bert': expected 'tiny-bert'"),
    # issue 13: accepted without a word before
    (["optim.min_lr_ratio=5"], "optim.min_lr_ratio=5.0 must be in [0, 1]"),
    (["model.dropout=1.5"], "model.dropout=1.5 must be in [0, 1)"),
    (["model.dropout=1"], "model.dropout=1.0 must be in [0, 1)"),
    (["optim.grad_clip=-1"], "optim.grad_clip=-1.0 must be >= 0"),
    (["train.eval_max_batches=-3"], "train.eval_max_batches=-3 must be positive"),
    (["objective.beta_cycle_steps=0"], "objective.beta_cycle_steps=0 must be positive"),  # issue 20: 1/0
    (["train.max_steps=10"], "optim.warmup_steps=50 is more than train.max_steps=10: the learning rate would never "
                             "reach optim.lr (allowed: 0 to 10)"),
    (["model.text_config.hidden_sise=64"], "unknown key model.text_config.hidden_sise (model.text_config (BertConfig) "
                                           "allows: "),
    (["model.text_config.hidden_sise=64"], "; did you mean hidden_size?)"),
    (["model.image_encoder=resnet5O"], "model.image_encoder='resnet5O' is not a timm model (allowed: "
                                       "timm.list_models(); did you mean resnet50?)"),
    (["model.image_encoder=vit_small_patch16_224", "model.image_encoder_kwargs={dpeth: 2}"],
     "unknown key model.image_encoder_kwargs.dpeth (vit_small_patch16_224 (VisionTransformer) allows: "),
    (["model.image_encoder=vit_small_patch16_224", "model.image_encoder_kwargs={dpeth: 2}"],
     "; did you mean depth?)"),
    (["model.image_encoder=vit_small_patch16_224", "model.image_encoder_kwargs={embed_dim: 50, num_heads: 3}"],
     "model.image_encoder_kwargs={'embed_dim': 50, 'num_heads': 3}: vit_small_patch16_224 cannot be built with them"),
])
def test_bad_config_is_one_line_naming_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=override)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("train.lr=0.01", "unknown key train.lr (train allows: bootstrap_resamples, "),
    ("train.lr=0.01", "; lr is a key of optim (optim.lr))"),
    ("lr=0.01", "unknown key lr (top level allows: data, dist, logging, model, objective, optim, overwrite, resume, "
                "run_dir, train; lr is a key of optim (optim.lr))"),
    ("data.seed=1", "; seed is a key of data.synthetic (data.synthetic.seed) and train (train.seed))"),
    ("train.run_dir=x", "; run_dir is a key of the top level (run_dir))"),
    ("model.synthetic.num_train=8", "; synthetic is a key of data (data.synthetic))"),
])
def test_a_key_of_another_section_says_where_it_belongs(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_key_of_another_section_in_a_file_says_where_it_belongs(tmp_path):
    (tmp_path / "c.yaml").write_text("train: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"unknown key train\.lr \(train allows: .*; lr is a key of optim "
                                          r"\(optim\.lr\)\)$"):
        load_config(tmp_path / "c.yaml")


def test_the_config_package_imports_nothing_above_it():
    """vkd_dist/config is the bottom floor: reading a config imports no other module of the package, nor torch,
    timm or transformers; the checks that need them are the components' (vkd_dist/configure.py)."""
    import subprocess
    import sys

    code = ("import sys; from vkd_dist.config import read_config; read_config(); "
            "print(' '.join(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'transformers') "
            "or (m.startswith('vkd_dist.') and not m.startswith('vkd_dist.config'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == []


def test_load_config_runs_the_structural_and_the_component_checks_in_one_order():
    from vkd_dist.config import STRUCTURAL
    from vkd_dist.configure import CHECKS

    assert [c for c in CHECKS if c in STRUCTURAL] == list(STRUCTURAL)  # the structural ones keep their order
    assert len(CHECKS) == len(set(CHECKS))


@pytest.mark.parametrize("overrides, message", [
    (["objective=vkdd", "optim.lr=-1"], "objective.name='vkdd' is not allowed"),  # a component's, then a range
    (["optim.lr=-1", "dist.strategy=zero9"], "optim.lr=-1.0 must be positive"),  # a range, then a component's
    (["objective=kd", "model.image_encoder=resnet5O"], "model.image_encoder='resnet5O' is not a timm model"),
])
def test_with_two_errors_the_first_reported_is_the_one_reported_before(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert message in str(err.value)


def test_validate_checks_a_config_built_otherwise():
    from vkd_dist.configure import validate

    cfg = load_config()
    validate(cfg)
    cfg.model.image_encoder = "resnet5O"
    with pytest.raises(ConfigError, match="model.image_encoder='resnet5O' is not a timm model"):
        validate(cfg)


def test_close_match_takes_typos_and_prefixes():
    assert close_match("resnet5O", ["resnet50", "resnet18"]) == "resnet50"
    assert close_match("validation", ["train", "val", "test"]) == "val"  # too short for difflib, a prefix
    assert close_match("xyz", ["train", "val", "test"]) is None


def test_yaml_include_and_roundtrip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default's relative data.path: not this checkout's data_cache/
    (tmp_path / "base.yaml").write_text(f"include: [{DEFAULT_CONFIG}]\n"  # an include replaces the default layer
                                        "train: {max_steps: 7}\nmodel: {latent_dim: 8}\noptim: {warmup_steps: 2}\n")
    (tmp_path / "exp.yaml").write_text("include: [base.yaml]\ntrain: {seed: 5}\n")
    cfg = load_config(tmp_path / "exp.yaml", ["model.latent_dim=9"])
    assert (cfg.train.max_steps, cfg.train.seed, cfg.model.latent_dim) == (7, 5, 9)
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["seed"] == 5


def test_unknown_yaml_key_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text("optim: {learning_rate: 0.1}\n")
    with pytest.raises(ConfigError, match="unknown key optim.learning_rate"):
        load_config(tmp_path / "c.yaml")


# --------------------------------------------------------------------------- layering
def test_a_users_file_without_include_layers_on_the_default(tmp_path):
    (tmp_path / "my.yaml").write_text("train: {max_steps: 60}\n")
    cfg = load_config(tmp_path / "my.yaml")
    assert cfg == load_config(overrides=["train.max_steps=60"])
    assert cfg.model.image_encoder == "test_resnet" and cfg.optim.lr == pytest.approx(1e-3)  # the default's tiny model
    assert cfg.data.build_synthetic  # the default's corpus at the default's path


def test_include_nothing_starts_from_the_dataclass_defaults(tmp_path):
    (tmp_path / "bare.yaml").write_text(f"include: []\ndata: {{path: {tmp_path}, build_synthetic: true}}\n")
    cfg = load_config(tmp_path / "bare.yaml")
    assert cfg.model.image_encoder == Config().model.image_encoder == "vit_small_patch16_224"
    assert cfg.optim.lr == pytest.approx(Config().optim.lr)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_a_recipe_resolves_as_before_the_layering_rule(recipe, tiny_data, tmp_path):
    """Before, a recipe built on the dataclass defaults (what `include: [recipe]` gives now); on
    configs/default.yaml it differs only in model.text_config, which a recipe's local text encoder never reads."""
    (tmp_path / "old.yaml").write_text(f"include: [{recipe}]\n")
    local = [f"run_dir={tmp_path}", f"data.path={tiny_data}", *LOCAL]
    new, old = to_dict(load_config(recipe, local)), to_dict(load_config(tmp_path / "old.yaml", local))
    assert (new["model"]["image_encoder"], new["optim"]["lr"]) == (old["model"]["image_encoder"], old["optim"]["lr"])
    new["model"].pop("text_config"), old["model"].pop("text_config")
    assert new == old


def test_tiny_yaml_as_a_config_file_is_tiny_yaml_as_the_tests_overlay(tiny_data, tmp_path):
    local = [f"run_dir={tmp_path}", f"data.path={tiny_data}"]
    assert load_config(TINY_CONFIG, local) == load_config(overrides=overrides_from_yaml(TINY_CONFIG) + local)


# --------------------------------------------------------------------------- where synthetic data is built
def test_the_default_config_builds_the_synthetic_corpus_at_its_own_path():
    cfg = load_config()
    assert cfg.data.build_synthetic and cfg.data.path == yaml.safe_load(DEFAULT_CONFIG.read_text())["data"]["path"]


def test_another_data_path_does_not_build_there(tmp_path):
    typo = tmp_path / "dat" / "mimic"
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"data.path={typo}"])
    assert str(err.value) == (f"data.path={typo}: no dataset.json there (convert data with vkd-data first; "
                              "data.build_synthetic=true builds a synthetic corpus there)")
    assert not typo.parent.exists()  # nothing was created


def test_a_config_file_that_moves_data_path_does_not_build_there(tmp_path):
    (tmp_path / "my.yaml").write_text(f"data: {{path: {tmp_path / 'typo'}}}\n")
    with pytest.raises(ConfigError, match="no dataset.json there"):
        load_config(tmp_path / "my.yaml")


def test_data_path_with_build_synthetic_builds_there(tmp_path):
    from vkd_dist.prepare import ensure_dataset

    out = tmp_path / "syn"
    cfg = load_config(overrides=[f"data.path={out}", "data.build_synthetic=true", "data.synthetic.num_train=8",
                                 "data.synthetic.num_val=4", "data.synthetic.num_test=4",
                                 "data.synthetic.image_size=32"])
    assert ensure_dataset(cfg).num_samples("train") == 8 and (out / "dataset.json").is_file()


def test_the_default_path_written_absolute_still_builds():
    """The SLURM launcher pins data.path as an absolute override: that is no move."""
    default = yaml.safe_load(DEFAULT_CONFIG.read_text())["data"]["path"]
    assert load_config(overrides=[f"data.path={Path(default).resolve()}"]).data.build_synthetic
