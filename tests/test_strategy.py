"""One strategy key (vkd_dist.strategy): dist.strategy, the accelerate launch config, the DeepSpeed JSON and the
SLURM launcher's --strategy either agree or the run stops with one line naming both sources. No launches here
except the launcher's --dry-run (the 2-process runs of each strategy are tests/test_scale.py)."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, tiny_overrides
from vkd_dist.config import ConfigError
from vkd_dist.configure import load_config
from vkd_dist.strategy import DEEPSPEED_DIR, STRATEGIES, Strategy, accelerate_env, agree, fsdp2_env, launched, resolve

ACCEL = REPO / "configs" / "accelerate"
# what `accelerate launch --config_file X` exports (accelerate/utils/launch.py), reduced to the strategy's part
LAUNCH_ENV = {
    "ddp.yaml": {"ACCELERATE_MIXED_PRECISION": "no"},
    "deepspeed_zero2.yaml": {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_DEEPSPEED": "true",
                             "ACCELERATE_DEEPSPEED_CONFIG_FILE": "configs/deepspeed/zero2.json"},
    "deepspeed_zero3.yaml": {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_DEEPSPEED": "true",
                             "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(DEEPSPEED_DIR / "zero3.json")},
    "fsdp2.yaml": {"ACCELERATE_MIXED_PRECISION": "no", **fsdp2_env()},
}


@pytest.fixture
def cfg(tiny_data, tmp_path):
    return lambda **extra: load_config(overrides=tiny_overrides(tiny_data, tmp_path, **extra))


def test_auto_follows_the_launch_and_a_plain_start_is_ddp(cfg, monkeypatch):
    monkeypatch.chdir(REPO)  # accelerate configs name the DeepSpeed JSON relative to the repository
    auto = cfg()
    assert auto.dist.strategy == "auto"
    assert resolve(auto, {}).name == "ddp"  # python / torchrun: nothing names a strategy
    expected = {"ddp.yaml": "ddp", "deepspeed_zero2.yaml": "deepspeed_zero2", "deepspeed_zero3.yaml": "deepspeed_zero3",
                "fsdp2.yaml": "fsdp2"}
    for launch, name in expected.items():
        assert resolve(auto, LAUNCH_ENV[launch]).name == name, launch
        assert resolve(cfg(**{"dist.strategy": name}), LAUNCH_ENV[launch]).name == name, launch  # agreeing
    assert resolve(cfg(**{"dist.strategy": "fsdp2"}), {}).name == "fsdp2"  # the key alone decides a plain start


@pytest.mark.parametrize("launch,key", [("ddp.yaml", "deepspeed_zero3"), ("deepspeed_zero3.yaml", "ddp"),
                                        ("deepspeed_zero2.yaml", "deepspeed_zero3"), ("fsdp2.yaml", "deepspeed_zero3")])
def test_a_launch_that_disagrees_with_the_key_is_refused_naming_both(cfg, monkeypatch, launch, key):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError) as err:
        resolve(cfg(**{"dist.strategy": key}), LAUNCH_ENV[launch])
    message = str(err.value)
    assert "\n" not in message and f"dist.strategy in the training config says {key}" in message
    assert f"says {launched(LAUNCH_ENV[launch]).name}" in message


def test_the_deepspeed_json_stage_is_the_launch_stage(tmp_path):
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    found = launched({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(custom)})
    assert found.name == "deepspeed_zero1" and str(custom) in found.source
    # `accelerate launch --use_deepspeed --zero_stage 3` without a file
    stage3 = launched({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    assert stage3.name == "deepspeed_zero3"
    with pytest.raises(ConfigError, match="FSDP_VERSION=1.*only FSDP2"):
        launched({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})


def test_unknown_strategy_and_offload_elsewhere_are_config_errors(cfg):
    with pytest.raises(ConfigError, match=r"dist.strategy='zero3' is not a strategy \(allowed: ddp, deepspeed_zero1"):
        cfg(**{"dist.strategy": "zero3"})
    with pytest.raises(ConfigError, match="dist.offload_optimizer=true needs dist.strategy=deepspeed_zero3"):
        cfg(**{"dist.strategy": "fsdp2", "dist.offload_optimizer": "true"})
    with pytest.raises(ConfigError, match="unknown key dist.zero_stage"):  # replaced by dist.strategy
        cfg(**{"dist.zero_stage": 3})
    null = cfg(**{"dist.strategy": "null"})
    assert null.dist.strategy is None and resolve(null, {}).name == "ddp"  # null = auto


def test_agree_names_the_first_two_that_differ():
    a, b = Strategy("ddp", "source A"), Strategy("fsdp2", "source B")
    assert agree(None, a, Strategy("ddp", "C")) == a and agree(None, None) is None
    with pytest.raises(ConfigError, match="source A says ddp, source B says fsdp2"):
        agree(a, None, b)


def test_one_deepspeed_json_per_stage_for_every_launch_path():
    for name in STRATEGIES:
        env = accelerate_env(name)
        if name.startswith("deepspeed_"):
            path = env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
            assert path == str(DEEPSPEED_DIR / f"zero{name[-1]}.json")
            assert launched(env).name == name  # what SLURM exports reads back as the same strategy
        else:
            assert launched(env).name == name
    assert accelerate_env("deepspeed_zero3", True)["ACCELERATE_DEEPSPEED_CONFIG_FILE"].endswith("zero3_offload.json")
    for launch in ACCEL.glob("*.yaml"):  # every DeepSpeed launch file names one of those JSONs
        conf = yaml.safe_load(launch.read_text())
        if conf["distributed_type"] == "DEEPSPEED":
            assert (REPO / conf["deepspeed_config"]["deepspeed_config_file"]).parent == DEEPSPEED_DIR


def test_fsdp2_yaml_is_what_slurm_exports():
    conf = yaml.safe_load((ACCEL / "fsdp2.yaml").read_text())
    env = fsdp2_env()
    assert conf["distributed_type"] == "FSDP" and env["FSDP_VERSION"] == "2" == str(conf["fsdp_config"]["fsdp_version"])
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == conf["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"]
    assert len(env) == len(conf["fsdp_config"]) + 1  # every setting passed on, plus ACCELERATE_USE_FSDP


def _dry_run(tmp_path, data, *args):
    return subprocess.run([sys.executable, str(REPO / "launchers" / "slurm.py"), "--dry-run", *args,
                           f"run_dir={tmp_path / 'run'}", f"data.path={data}"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


RECIPE_LOCAL = ["model.text_encoder=tiny-bert", "model.image_weights=null", "model.tokenizer=null"]


def test_slurm_strategy_conflict_is_refused_before_queueing(tmp_path, tiny_data):
    recipe = str(REPO / "configs" / "recipes" / "vitl16_zero3.yaml")
    proc = _dry_run(tmp_path, tiny_data, "--strategy", "deepspeed-zero2", "--config", recipe, *RECIPE_LOCAL)
    assert proc.returncode == 2, proc.stdout
    assert ("--strategy of the SLURM launcher says deepspeed_zero2, dist.strategy in the training config says "
            "deepspeed_zero3") in proc.stderr
    # no --strategy: the recipe's key decides, and Accelerate is pointed at the shipped JSON
    proc = _dry_run(tmp_path, tiny_data, "--config", recipe, *RECIPE_LOCAL)
    assert proc.returncode == 0, proc.stderr
    assert f"ACCELERATE_DEEPSPEED_CONFIG_FILE={DEEPSPEED_DIR / 'zero3.json'}" in proc.stdout
    assert "ACCELERATE_DEEPSPEED_ZERO_STAGE" not in proc.stdout  # no ZeRO block of the launcher's own
    proc = _dry_run(tmp_path, tiny_data, "--cpu", "--strategy", "fsdp2")
    assert proc.returncode == 0, proc.stderr
    assert "ACCELERATE_USE_FSDP=true FSDP_VERSION=2" in proc.stdout
