"""The shipped launch files, run exactly as users run them: `accelerate launch --config_file
configs/accelerate/X.yaml --num_processes 2 -m vkd_dist.train ...`, here on the CPU (gloo, fp32, tiny encoders).

Checks per strategy (DDP, ZeRO-2, ZeRO-3, FSDP2): every rank ends with identical parameters (the trainer gathers a
per-rank digest into final/meta.json), the loss matches a 1-process run with the same global batch, the
final export is one consolidated image-only safetensors file; for ZeRO-3 and FSDP2 a checkpoint saved and
resumed continues. The DeepSpeed JSON config is checked for one source of truth without launching anything.

Why the loss check is statistical: a 2-rank run deals shards to ranks, so its global batch holds other samples
than the 1-process run's (and dropout/latent draws differ), so the per-step losses cannot be bit-equal. Both
runs start from the same weights (same seed) and see batches of the same global size from the same corpus, so
the mean training loss over the first steps must agree within a few percent; a wrong world size, batch or
accumulation (e.g. the DeepSpeed batch not being what the trainer thinks) shows up as a much larger gap or
as DeepSpeed refusing the config. Exact 2-rank vs 1-rank equivalence on identical data is tests/test_ddp.py.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, tiny_overrides
from vkd_dist.config import ConfigError
from vkd_dist.configure import load_config
from vkd_dist.fileio import free_port

ACCEL = REPO / "configs" / "accelerate"
DSDIR = REPO / "configs" / "deepspeed"
STEPS, MICRO = 4, 8


# --------------------------------------------------------------------------- config (no launch)
def _ds_files():
    return sorted(DSDIR.glob("*.json"))


def test_every_deepspeed_launch_file_names_a_shipped_json():
    names = {p.name for p in ACCEL.glob("*.yaml")}
    assert {"ddp.yaml", "fsdp2.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "deepspeed_zero3_offload.yaml",
            "multi_node_ddp.yaml", "multi_node_deepspeed_zero3.yaml"} <= names
    for path in ACCEL.glob("*.yaml"):
        conf = yaml.safe_load(path.read_text())
        if conf["distributed_type"] != "DEEPSPEED":
            continue
        ds = conf["deepspeed_config"]
        # With deepspeed_config_file, the ZeRO layout must live in the JSON only (Accelerate refuses duplicates).
        assert set(ds) <= {"deepspeed_config_file", "zero3_init_flag", "deepspeed_multinode_launcher"}, path
        assert (REPO / ds["deepspeed_config_file"]).is_file(), path
        # precision is train.mixed_precision's
        assert "mixed_precision" not in conf or conf["mixed_precision"] == "no", path


@pytest.mark.parametrize("path", _ds_files(), ids=lambda p: p.name)
def test_shipped_deepspeed_json_leaves_trainer_keys_auto(path):
    from vkd_dist.distributed import TRAINER_OWNED, _get

    ds = json.loads(path.read_text())
    for key in TRAINER_OWNED:
        assert _get(ds, key) == "auto", f"{path.name}: {key} must be \"auto\" (the trainer config owns it)"


@pytest.mark.parametrize("path", _ds_files(), ids=lambda p: p.name)
@pytest.mark.parametrize("world,accum", [(1, 1), (2, 3), (16, 2)])
def test_deepspeed_config_is_filled_from_the_trainer(tiny_data, tmp_path, path, world, accum):
    from vkd_dist.distributed import deepspeed_config

    cfg = load_config(overrides=tiny_overrides(tiny_data, tmp_path,
                                               **{"optim.grad_accum": accum, "optim.grad_clip": 0.5}))
    ds = deepspeed_config(cfg, world, path)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.data.batch_size
    assert ds["gradient_accumulation_steps"] == accum and ds["gradient_clipping"] == 0.5
    assert ds["train_batch_size"] == cfg.data.batch_size * accum * world
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False  # fp32 on this CPU machine
    assert ds["zero_optimization"]["stage"] == json.loads(path.read_text())["zero_optimization"]["stage"]
    assert "auto" not in json.dumps(ds)


def test_deepspeed_config_refuses_values_that_disagree(tiny_data, tmp_path):
    from vkd_dist.distributed import deepspeed_config

    cfg = load_config(overrides=tiny_overrides(tiny_data, tmp_path))
    base = json.loads((DSDIR / "zero2.json").read_text())
    base["train_batch_size"] = 999
    with pytest.raises(ConfigError, match="train_batch_size"):
        deepspeed_config(cfg, 2, base)
    base["train_batch_size"] = cfg.data.batch_size * 2  # hard-coded but consistent: accepted
    assert deepspeed_config(cfg, 2, base)["train_batch_size"] == 16
    cfg.dist.strategy = "deepspeed_zero3"  # the config key and the JSON's stage disagree: both named
    with pytest.raises(ConfigError, match=r"dist.strategy .* deepspeed_zero3.*zero2.json .*stage=2"):
        deepspeed_config(cfg, 2, DSDIR / "zero2.json")


def test_cpu_fallback_avoids_jit_compiled_ops(tiny_data, tmp_path):
    from vkd_dist.distributed import deepspeed_config

    cfg = load_config(overrides=tiny_overrides(tiny_data, tmp_path))
    ds = deepspeed_config(cfg, 2, DSDIR / "zero3_offload.json")
    if not torch.cuda.is_available():
        assert ds["zero_force_ds_cpu_optimizer"] is False  # torch AdamW, not the g++-built DeepSpeedCPUAdam
        assert ds["zero_optimization"]["offload_optimizer"]["pin_memory"] is False


# --------------------------------------------------------------------------- launches
def _overrides(data, run, **extra):
    return tiny_overrides(data, run, **{"train.max_steps": STEPS, "logging.log_every": 1, "train.eval_every": STEPS,
                                        "train.ckpt_every": 100, "data.batch_size": MICRO, **extra})


def accelerate_launch(config: str, overrides: list[str], nproc: int = 2) -> float:
    """What users type, with --num_processes for this CPU machine. Fresh processes (never fork pytest)."""
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(ACCEL / config),
           "--num_processes", str(nproc), "--main_process_port", str(free_port()), "-m", "vkd_dist.train", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:  # pytest.fail prints the message whole, where an assert's repr is cut short
        pytest.fail(f"{' '.join(cmd)}\nexit {proc.returncode}\n--- stdout (tail)\n{proc.stdout[-3000:]}\n"
                    f"--- stderr (tail)\n{proc.stderr[-6000:]}", pytrace=False)
    assert "Building extension" not in proc.stdout + proc.stderr  # no g++ JIT compile on the CPU path
    return time.perf_counter() - t0


def _losses(run: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [e.value for e in acc.Scalars("train/loss")]


def _check_final(run: Path, world: int) -> dict:
    meta = json.loads((run / "final" / "meta.json").read_text())
    assert meta["step"] == STEPS
    digests = meta["param_digests"]
    assert len(digests) == world and len(set(digests)) == 1  # every rank holds identical parameters
    files = list((run / "final").iterdir())
    assert sorted(p.name for p in files) == ["meta.json", "model.safetensors"]  # one consolidated file
    state = load_file(run / "final" / "model.safetensors")
    assert state and not any(k.startswith(("text_encoder.", "posterior_head.")) for k in state)  # image-only
    assert any(k.startswith("image_encoder.") for k in state) and any(k.startswith("prior_head.") for k in state)
    assert all(v.numel() > 0 for v in state.values())  # ZeRO-3 shards gathered, not empty placeholders
    return state


@pytest.fixture(scope="module")
def single_run(tiny_data, tmp_path_factory):
    """1 process, global batch 2 x MICRO: the reference for the 2-process losses."""
    from vkd_dist.train import train

    run = tmp_path_factory.mktemp("single")
    train(load_config(overrides=_overrides(tiny_data, run, **{"data.batch_size": 2 * MICRO})))
    return run


def _compare_loss(run: Path, single: Path) -> None:
    two, one = _losses(run), _losses(single)
    assert len(two) == len(one) == STEPS
    mean2, mean1 = sum(two) / STEPS, sum(one) / STEPS
    assert mean2 == pytest.approx(mean1, rel=0.05), (two, one)


@pytest.mark.distributed
def test_ddp_yaml_two_processes(tiny_data, tmp_path, single_run):
    run = tmp_path / "ddp"
    accelerate_launch("ddp.yaml", _overrides(tiny_data, run))
    state = _check_final(run, 2)
    _compare_loss(run, single_run)
    assert set(state) == set(load_file(single_run / "final" / "model.safetensors"))


@pytest.mark.distributed
def test_deepspeed_zero2_yaml_two_processes(tiny_data, tmp_path, single_run):
    run = tmp_path / "zero2"
    accelerate_launch("deepspeed_zero2.yaml", _overrides(tiny_data, run))
    state = _check_final(run, 2)
    _compare_loss(run, single_run)
    assert (run / "checkpoints" / f"step-{STEPS:08d}" / "pytorch_model").is_dir()  # a DeepSpeed checkpoint
    _check_last_without_final(run, state, STEPS)


def _save_resume_export(launch_file: str, run: Path, data: Path, single_run: Path, shard_files: str, **extra) -> None:
    """Train with checkpoints, check the export and the per-rank shards, resume for 2 more steps."""
    accelerate_launch(launch_file, _overrides(data, run, **{"train.ckpt_every": 2, **extra}))
    state = _check_final(run, 2)
    _compare_loss(run, single_run)
    single = load_file(single_run / "final" / "model.safetensors")
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in single.items()}  # consolidated
    ckpt = run / "checkpoints" / f"step-{STEPS:08d}"
    shards = sorted(p.name for p in ckpt.glob(shard_files))
    assert len(shards) == 2, shards  # one shard per rank

    accelerate_launch(launch_file, _overrides(data, run, **{
        "resume": "latest", "train.max_steps": STEPS + 2, "train.ckpt_every": 2, "train.test_at_end": False, **extra}))
    meta = json.loads((run / "final" / "meta.json").read_text())
    assert meta["step"] == STEPS + 2 and len(set(meta["param_digests"])) == 1
    saved = json.loads((run / "checkpoints" / f"step-{STEPS + 2:08d}" / "train_state.json").read_text())
    assert saved["step"] == STEPS + 2
    resumed = load_file(run / "final" / "model.safetensors")
    assert any(not torch.equal(resumed[k], state[k]) for k in state)  # it trained on from the saved weights
    losses = _losses(run)
    assert len(losses) == STEPS + 2, losses  # steps 1-4, then 5-6 after the resume (a fresh start would log 1-6)
    assert all(torch.isfinite(torch.tensor(losses)))
    _check_last_without_final(run, resumed, STEPS + 2)


def _check_last_without_final(run: Path, exported: dict, step: int) -> None:
    """--checkpoint last of a run without final/ whose newest checkpoint holds DeepSpeed's or DCP's shards: they are
    consolidated into one safetensors file holding the exported (deployable) tensors, equal (issue 20)."""
    from vkd_dist import checkpoint, weights

    (run / "final").unlink()  # a symlink to the exported version
    path = weights.find_weights(run, "last")
    assert path == run / "checkpoints" / f".consolidated-step-{step:08d}" / "model.safetensors"
    last = load_file(path)
    assert set(exported) <= set(last), sorted(set(exported) - set(last))[:5]
    assert all(torch.equal(last[k], exported[k]) for k in exported)
    assert json.loads((path.parent / "meta.json").read_text())["step"] == step
    written = path.stat().st_mtime_ns
    assert weights.find_weights(run, "last") == path and path.stat().st_mtime_ns == written  # reused
    assert checkpoint.verify(run / "checkpoints" / f"step-{step:08d}") is None  # the cache is beside, not inside


@pytest.mark.distributed
def test_deepspeed_zero3_yaml_two_processes_save_resume_export(tiny_data, tmp_path, single_run):
    _save_resume_export("deepspeed_zero3.yaml", tmp_path / "zero3", tiny_data, single_run,
                        "pytorch_model/**/*optim_states.pt")


@pytest.mark.distributed
def test_fsdp2_yaml_two_processes_save_resume_export(tiny_data, tmp_path, single_run):
    """FSDP2 over gloo (Accelerate would run DDP on the CPU; vkd_dist.distributed switches it to FSDP), with the
    config key naming the same strategy as the launch file. Checkpoints are torch.distributed.checkpoint shards."""
    _save_resume_export("fsdp2.yaml", tmp_path / "fsdp2", tiny_data, single_run, "pytorch_model_fsdp_0/*.distcp",
                        **{"dist.strategy": "fsdp2"})


@pytest.mark.distributed
def test_deepspeed_zero3_trains_the_image_only_baseline(tiny_data, tmp_path):
    """The baselines use the prior (or posterior) mean alone; ZeRO-3 failed in backward while logvar still ran."""
    from vkd_dist.train import train

    run, single = tmp_path / "zero3-image", tmp_path / "single-image"
    accelerate_launch("deepspeed_zero3.yaml", _overrides(tiny_data, run, objective="image_only"))
    _check_final(run, 2)
    single_batch = {"data.batch_size": 2 * MICRO}
    train(load_config(overrides=_overrides(tiny_data, single, objective="image_only", **single_batch)))
    _compare_loss(run, single)


# --------------------------------------------------------------------------- recipes
# the cluster recipes; the CPU-sized ones run here as shipped: tests/test_pretrained.py trains paper_vkd_cpu.yaml,
# tests/test_docs_commands.py the label-scarce ones, labeller.yaml and the pair vkd_distil_teacher.yaml and
# vkd_distil.yaml (docs/partial-labels.md)
CPU_RECIPES = ("paper_vkd_cpu", "labeller", "vkd_distil", "vkd_distil_teacher")
RECIPES = sorted(p for p in (REPO / "configs" / "recipes").glob("*.yaml") if p.stem not in CPU_RECIPES)
LOCAL_PATH_KEYS = ("data.path", "model.text_encoder", "model.image_weights", "model.tokenizer")


def test_the_three_recipes_ship():
    shipped = {"mimic_vitb16_clinicalbert.yaml", "vitl16_zero3.yaml", "densenet121_paper.yaml"}
    assert {p.name for p in RECIPES} >= shipped


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_is_valid_once_local_paths_are_filled(path, tiny_data, tmp_path):
    """Recipes name local directories that exist only on the user's cluster: override exactly those keys with
    tiny stand-ins and the rest of the recipe must validate as shipped."""
    import re

    import timm

    raw = yaml.safe_load(path.read_text())
    def value(key: str) -> str:
        section, name = key.split(".")
        return str((raw.get(section) or {}).get(name, ""))

    placeholders = [k for k in LOCAL_PATH_KEYS if value(k).startswith("/path/to/")]
    from vkd_dist.models.pretrained import TEXT_ENCODERS

    packaged = value("model.text_encoder") in TEXT_ENCODERS  # installed by the pretrained extra
    assert "data.path" in placeholders and ("model.text_encoder" in placeholders or packaged), placeholders
    cfg = load_config(path, [f"run_dir={tmp_path}", f"data.path={tiny_data}", "model.text_encoder=tiny-bert",
                             "model.image_weights=null", "model.tokenizer=null"])
    assert timm.is_model(cfg.model.image_encoder), cfg.model.image_encoder
    assert cfg.data.image_size == 224 and not cfg.model.image_encoder_kwargs  # the real encoder, not the tiny demo
    text = path.read_text()
    m = re.search(r"# global batch (\d+) = data\.batch_size (\d+) x optim\.grad_accum (\d+) x (\d+) GPUs", text)
    assert m, f"{path.name}: states no global batch"
    total, micro, accum, gpus = map(int, m.groups())
    assert (micro, accum) == (cfg.data.batch_size, cfg.optim.grad_accum) and total == micro * accum * gpus
    lr = re.search(r"# lr ([0-9.e+-]+) ", text)
    assert lr and float(lr.group(1)) == cfg.optim.lr, f"{path.name}: states no lr or another lr than optim.lr"
    assert re.search(r"# expected memory: ~\d+ GB per GPU", text), f"{path.name}: states no expected memory"
