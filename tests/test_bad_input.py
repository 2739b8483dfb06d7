"""The bad-input table (issue 13): each input gives one line naming what is wrong and what is allowed, exit status
2, before any work (no tokenizer, model or run files). Runs are faked where only their files matter: a saved
config.yaml, an empty weights file, a checkpoint's train_state.json."""

import json
import os
import re
from pathlib import Path

import pytest

from conftest import tiny_overrides
from vkd_dist import checkpoint
from vkd_dist.config import ConfigError, save_config
from vkd_dist.configure import load_config
from vkd_dist.deploy import main as export_main
from vkd_dist.evaluate import main as eval_main
from vkd_dist.predict import main as predict_main
from vkd_dist.prepare import check_resume_config
from vkd_dist.train import main as train_main


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def data_copy(tiny_data: Path, out: Path, edit) -> Path:
    """tiny_data's shards (linked) under a dataset.json changed by `edit(meta)`."""
    out.mkdir()
    for split in ("train", "val", "test"):
        (out / split).symlink_to(tiny_data / split)
    meta = json.loads((tiny_data / "dataset.json").read_text())
    edit(meta)
    (out / "dataset.json").write_text(json.dumps(meta))
    return out


def refused(capsys, overrides: list[str], run: Path) -> str:
    """vkd-train's message for `overrides`, after checking it stopped before the tokenizer was built."""
    assert train_main(overrides) == 2
    assert not (run / "tokenizer").exists() and not (run / "config.yaml").exists()
    return one_line(capsys)


# --------------------------------------------------------------------------- vkd-train
def test_missing_data_path(tmp_path, capsys):
    missing = tmp_path / "dat" / "mimic"
    assert train_main([f"data.path={missing}", f"run_dir={tmp_path / 'run'}"]) == 2
    assert one_line(capsys) == (f"vkd-train: config error: data.path={missing}: no dataset.json there (convert data "
                                "with vkd-data first; data.build_synthetic=true builds a synthetic corpus there)")
    assert sorted(tmp_path.iterdir()) == []  # neither the data set nor the run directory was made


def test_misspelt_split(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    line = refused(capsys, tiny_overrides(tiny_data, run, **{"data.train_split": "trian"}), run)
    assert line == (f"vkd-train: config error: data.train_split='trian' is not a split of {tiny_data}/dataset.json "
                    "(has: train, val, test; did you mean train?)")


def test_split_with_no_samples(tiny_data, tmp_path, capsys):
    def add_empty(meta):
        meta["splits"]["empty"] = {"num_samples": 0, "shards": []}

    data = data_copy(tiny_data, tmp_path / "data", add_empty)
    run = tmp_path / "run"
    line = refused(capsys, tiny_overrides(data, run, **{"data.val_split": "empty"}), run)
    assert line == f"vkd-train: config error: data.val_split='empty': split 'empty' of {data} has 0 samples"


def test_shards_of_another_schema_version(tiny_data, tmp_path, capsys):
    data = data_copy(tiny_data, tmp_path / "data", lambda meta: meta.update(schema_version=0))
    run = tmp_path / "run"
    line = refused(capsys, tiny_overrides(data, run), run)
    assert line == (f"vkd-train: config error: {data}/dataset.json has schema version 0; this vkd_dist reads 1: "
                    "re-convert with vkd-data")


def test_run_dir_under_a_file(tiny_data, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("")
    run = tmp_path / "notes.txt" / "run"
    assert train_main(tiny_overrides(tiny_data, run)) == 2
    assert one_line(capsys) == (f"vkd-train: config error: run_dir={run}: not writable ({tmp_path}/notes.txt is not a "
                                "directory)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_run_dir_without_permission(tiny_data, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert train_main(tiny_overrides(tiny_data, locked / "run")) == 2
    assert one_line(capsys).endswith(f"not writable (no write permission on {locked})")


# --------------------------------------------------------------------------- resume onto another config
@pytest.fixture
def saved_run(tiny_data, tmp_path) -> Path:
    """A run as training leaves it, as far as a resume looks before loading: config.yaml and a checkpoint that
    verifies."""
    run = tmp_path / "run"
    save_config(load_config(overrides=tiny_overrides(tiny_data, run)), run / "config.yaml")
    step = run / "checkpoints" / "step-00000006"
    step.mkdir(parents=True)
    (step / "train_state.json").write_text(json.dumps({"step": 6}))
    checkpoint.write_manifest(step)  # verified before its config is compared
    return run


def test_resume_that_changes_the_model_shape(saved_run, tiny_data, capsys):
    before = (saved_run / "config.yaml").read_text()
    over = tiny_overrides(tiny_data, saved_run, resume="latest", **{"model.latent_dim": 32, "data.image_size": 48})
    assert train_main(over) == 2
    assert one_line(capsys) == (
        f"vkd-train: config error: resume=latest: the config changes the model's shape against "
        f"{saved_run}/config.yaml: model.latent_dim 16 -> 32, data.image_size 64 -> 48 (set them back, or start a "
        "new run_dir)")
    assert (saved_run / "config.yaml").read_text() == before  # refused before config.yaml is rewritten


def test_resume_may_change_the_length_logging_workers_and_cadence(saved_run, tiny_data):
    check_resume_config(load_config(overrides=tiny_overrides(tiny_data, saved_run, resume="latest", **{
        "train.max_steps": 20, "logging.log_every": 5, "data.num_workers": 1, "train.eval_every": 4,
        "train.ckpt_every": 4, "model.gradient_checkpointing": True})), checkpoint.latest(saved_run))


def test_resume_of_a_directory_that_is_not_a_checkpoint(saved_run, tiny_data):
    not_ckpt = saved_run / "checkpoints"
    with pytest.raises(ConfigError, match=re.escape(f"resume={not_ckpt}: {not_ckpt}: not a checkpoint")):
        checkpoint.resolve(saved_run, str(not_ckpt))
    with pytest.raises(ConfigError, match=re.escape(f"resume={not_ckpt}: {not_ckpt}: not a checkpoint")):
        check_resume_config(load_config(overrides=tiny_overrides(tiny_data, saved_run, resume=str(not_ckpt))),
                            not_ckpt)


# --------------------------------------------------------------------------- vkd-eval, vkd-export, vkd-predict
@pytest.fixture
def exported_run(saved_run) -> Path:
    """A run with an (empty) best/ export: the argument checks look for the file, never read it."""
    (saved_run / "best").mkdir()
    (saved_run / "best" / "model.safetensors").write_bytes(b"")
    return saved_run


def test_eval_on_a_split_that_does_not_exist(exported_run, tiny_data, capsys):
    assert eval_main(["--run", str(exported_run), "--split", "validation"]) == 2
    assert one_line(capsys) == (f"vkd-eval: error: --split 'validation' is not a split of {tiny_data}/dataset.json "
                                "(has: train, val, test; did you mean val?)")


@pytest.mark.parametrize("prog", ["vkd-eval", "vkd-export"])
def test_misspelt_checkpoint(prog, exported_run, tmp_path, capsys):
    main, run_args = {"vkd-eval": (eval_main, ["--run", str(exported_run)]),
                      "vkd-export": (export_main, [str(exported_run), "--out", str(tmp_path / "m")])}[prog]
    assert main([*run_args, "--checkpoint", "lastt"]) == 2
    assert one_line(capsys) == (f"{prog}: error: --checkpoint 'lastt' is not allowed (allowed: best, last, final or "
                                "an existing path; did you mean last?)")


def test_checkpoint_the_run_does_not_have(exported_run, capsys):
    assert eval_main(["--run", str(exported_run), "--checkpoint", "final"]) == 2
    assert one_line(capsys) == (f"vkd-eval: error: --checkpoint final: no weights at {exported_run}/final/"
                                f"model.safetensors (checkpoint='final', run {exported_run}); the run has: best")


@pytest.mark.parametrize("missing", [True, False], ids=["no-directory", "not-a-run"])
def test_wrong_run(missing, tiny_data, tmp_path, capsys):
    run = tmp_path / "nope" if missing else tiny_data
    why = "no such directory" if missing else "not a training run directory (no config.yaml)"
    assert eval_main(["--run", str(run)]) == 2
    assert one_line(capsys) == f"vkd-eval: error: --run {run}: {why}"
    assert export_main([str(run), "--out", str(tmp_path / "m")]) == 2
    assert one_line(capsys) == f"vkd-export: error: RUN {run}: {why}"


def test_predict_with_a_run_instead_of_a_model(exported_run, tmp_path, capsys):
    from vkd_dist.commands import command  # the tool as it runs from here: by name on PATH, else by its path

    image = tmp_path / "x.png"  # never looked at: the model directory is refused first
    assert predict_main(["--model", str(exported_run), str(image)]) == 2
    assert one_line(capsys) == (f"vkd-predict: error: --model {exported_run}: a training run directory, not a model; "
                                f"export it first with {command('vkd-export', exported_run, '--out', 'DIR')}")
    assert predict_main(["--model", str(tmp_path / "nope"), str(image)]) == 2
    assert one_line(capsys) == f"vkd-predict: error: --model {tmp_path / 'nope'}: no such directory"


# --------------------------------------------------------------------------- the SLURM launcher
def test_slurm_time_limit_in_another_format(capsys):
    from vkd_dist.slurm import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--nodes", "1", "--time", "1h"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("error: argument --time: '1h' is not a SLURM time limit; use MM, MM:SS, HH:MM:SS, "
                            "D-HH, D-HH:MM or D-HH:MM:SS")  # argparse's usage lines, then the one error line
