"""A newcomer's first hour, on the tiny config: the console written to a file reads as a log and ends with what
was written where and the next commands; those commands work as printed; the export's card carries the metrics
measured for its weights; a run is read from any directory; a missing data set is said with the way out."""

import contextlib
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import TINY_CONFIG
from vkd_dist.data.schema import read_dataset
from vkd_dist.deploy import main as export_main
from vkd_dist.evaluate import main as eval_main
from vkd_dist.ood import split_images
from vkd_dist.predict import main as predict_main
from vkd_dist.tracking import LossWindow

TOOLS = {"vkd-export": export_main, "vkd-eval": eval_main, "vkd-predict": predict_main}


@contextlib.contextmanager
def cwd(path: Path):
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_data):
    """`vkd-train` on the tiny config with the default's progress setting, its console written to a file (as a
    SLURM log is), from a directory where data.path is relative (as the default config's is)."""
    home = tmp_path_factory.mktemp("home")
    log = home / "train.log"
    with open(log, "w") as fh:  # a separate process: its stderr is the file itself, as under sbatch or nohup
        proc = subprocess.run([sys.executable, "-m", "vkd_dist.train", "--config", str(TINY_CONFIG),
                               f"data.path={os.path.relpath(tiny_data, home)}", "run_dir=runs/first",
                               "logging.progress=true"], stdout=fh, stderr=subprocess.STDOUT, cwd=home, timeout=600)
    assert proc.returncode == 0, log.read_text()[-2000:]
    return home, home / "runs" / "first", log.read_bytes().decode()  # as written: read_text would turn \r into \n


def printed(text: str, tool: str, having: str = "") -> list[str]:
    """The arguments of the one line of `text` (with `having` in it) that runs `tool`, checking that its first
    word calls it from here."""
    found = []
    for line in text.splitlines():
        try:
            words = shlex.split(line) if having in line else []
        except ValueError:  # prose with an apostrophe
            continue
        if words and Path(words[0]).name == tool:
            found.append(words)
    assert len(found) == 1, f"{tool}: {found}"
    head, *args = found[0]
    assert shutil.which(head) or Path(head).is_file(), head
    return args


def run_printed(text: str, tool: str, having: str = "", **replace: str) -> int:
    return TOOLS[tool]([replace.get(a, a) for a in printed(text, tool, having)])


def test_the_console_in_a_file_reads_as_a_log(first_run):
    home, run, log = first_run
    assert log.count("\r") == 0, log.count("\r")  # a log: no redraws at all (the issue asks < 20 for 600 steps)
    lines = log.splitlines()
    assert any(line.startswith("run runs/first | objective vkd |") for line in lines)  # the header on its own line
    assert "bce and prior_bce are summed over a study's 14 labels" in log
    train_lines = [line for line in lines if line.startswith("step ") and "loss" in line]
    assert [line.split()[1] for line in train_lines] == ["2/6", "4/6", "6/6"]
    summary = log[log.index("finished: step 6 of 6"):]
    for name in ("best/", "final/", "test_metrics.json", "vkd-export", "vkd-predict", "vkd-eval"):
        assert name in summary, name
    assert log.rstrip().endswith(summary.rstrip())  # the summary closes the log


def test_logged_losses_are_window_means_and_tensorboard_has_the_same(first_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run, log = first_run
    line = next(line for line in log.splitlines() if line.startswith("step      4/6"))
    logged = dict(zip(line.split()[2::2], map(float, line.split()[3::2])))
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    board = {e.step: e.value for e in events.Scalars("train/loss")}
    assert set(board) == {2, 4, 6} and f"{board[4]:.4g}" == f"{logged['loss']:.4g}"

    window = LossWindow()
    window.add({"loss": 1.0, "bce": 4.0}, grad_norm=2.0)
    window.add({"loss": 3.0, "bce": 6.0}, grad_norm=4.0)
    assert window.means() == {"loss": 2.0, "bce": 5.0, "grad_norm": 3.0}
    assert window.means() == {}  # the next window starts empty


def test_the_printed_export_has_the_metrics_of_its_weights(first_run, tmp_path, tiny_data, capsys):
    home, run, log = first_run
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["step"] == 6 and metrics["weights_digest"].startswith("sha256:")
    with cwd(home):
        assert run_printed(log, "vkd-export") == 0
        model = home / printed(log, "vkd-export")[-1]
        card = (model / "README.md").read_text()
        assert f"macro AUROC {metrics['macro_auroc']:.4f}" in card and "Not evaluated" not in card
        assert json.loads((model / "config.json").read_text())["provenance"]["weights_digest"] == \
            metrics["weights_digest"]
        noise = tmp_path / "noise.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(noise)
        scan = tmp_path / "scan.png"  # a test-split image, never seen at export (the reference is val)
        Image.fromarray(next(split_images(read_dataset(tiny_data).shards("test"), 64))).save(scan)
        assert run_printed(log, "vkd-predict", YOUR_IMAGES_OR_FOLDERS=str(tmp_path)) == 0
        rows = {Path(r["path"]).name: r for r in csv.DictReader(open(home / "predictions.csv"))}
        assert rows["scan.png"]["unlike_training"] == "" and rows["scan.png"]["error"] == ""
        assert "edge" in rows["noise.png"]["unlike_training"]
        assert "1 of 2 image(s) are unlike the training data" in capsys.readouterr().err
        assert run_printed(log, "vkd-eval") == 0
        assert (run / "plots" / "reliability.png").is_file()


def test_an_export_of_other_weights_says_which_were_scored(first_run, tmp_path, capsys):
    """best/ made different from final/: the default export is the scored final/; best/ exported by name gets no
    metrics, and the card's two commands, run as printed, give it its own."""
    _, first, _ = first_run
    run = tmp_path / "run"
    shutil.copytree(first, run, symlinks=True)
    best = run / "best" / "model.safetensors"
    state = load_file(best)
    name = next(iter(state))
    state[name] = state[name] + 1
    best.unlink()
    save_file(state, best)
    with cwd(tmp_path):
        assert export_main(["run", "--out", "default"]) == 0
        assert "from final (final/: the weights RUN/test_metrics.json scored)" in capsys.readouterr().out
        assert "Not evaluated" not in (tmp_path / "default" / "README.md").read_text()
        assert export_main(["run", "--checkpoint", "best", "--out", "best-model"]) == 0
        card = (tmp_path / "best-model" / "README.md").read_text()
        assert "Not evaluated for these weights" in card and "scored final/" in card
        commands = "\n".join(card.split("`")[1::2])  # the card's commands, one a line
        assert run_printed(commands, "vkd-eval") == 0
        assert run_printed(commands, "vkd-export", "--metrics", DIR="scored-best") == 0
    scored = json.loads((run / "best-test-metrics.json").read_text())
    card = (tmp_path / "scored-best" / "README.md").read_text()
    assert f"macro AUROC {scored['macro_auroc']:.4f}" in card and scored["weights_digest"] in card
    with pytest.raises(ValueError, match="scored other weights"):  # final's metrics are refused for best/
        from vkd_dist.deploy import export_run

        export_run(run, tmp_path / "x", "best", run / "test_metrics.json")


def test_a_run_is_read_from_any_directory(first_run, tmp_path, capsys):
    _, run, _ = first_run
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert Path(saved["data"]["path"]).is_absolute()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with cwd(elsewhere):
        assert eval_main(["--run", str(run), "--checkpoint", "final", "--out", "m.json", "--bootstrap", "50"]) == 0
        assert json.loads(Path("m.json").read_text())["weights_digest"] == \
            json.loads((run / "test_metrics.json").read_text())["weights_digest"]
        assert eval_main(["--run", str(run), "--data", "missing"]) == 2
    err = capsys.readouterr().err
    assert f"no data set at {elsewhere / 'missing' / 'dataset.json'} (--data missing" in err
    assert "pass --data DIR" in err

    old = tmp_path / "old-run"  # a run recorded before paths were made absolute
    shutil.copytree(run, old, symlinks=True)
    saved["data"]["path"] = "data_cache/somewhere"
    (old / "config.yaml").write_text(yaml.safe_dump(saved))
    with cwd(elsewhere):
        assert eval_main(["--run", str(old)]) == 2
    err = capsys.readouterr().err
    assert f"data.path=data_cache/somewhere from {old / 'config.yaml'}, relative to the current directory " \
           f"{elsewhere}" in err and "pass --data DIR" in err


def test_the_out_of_distribution_rule():
    from vkd_dist.ood import reference, unlike

    rng = np.random.default_rng(0)
    smooth = [np.clip(np.add.outer(np.arange(64), np.arange(64)) + rng.normal(100, 3, (64, 64)), 0, 255)
              .astype(np.uint8) for _ in range(50)]
    ref = reference(smooth, "val")
    assert ref["num_images"] == 50 and set(ref["ranges"]) == {"mean", "std", "edge"}
    assert unlike(smooth[0], ref) == "" and unlike(smooth[0], None) == ""
    assert unlike(np.zeros((64, 64), np.uint8), ref).startswith("mean 0.0 < ")  # blank: dark and flat
    assert "edge" in unlike(rng.integers(0, 255, (64, 64), dtype=np.uint8), ref)
    assert reference([], "val") is None
