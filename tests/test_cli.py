"""Console scripts: `--help` shows defaults, and bad input fails in one line (no traceback). Fast: no training."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vkd_dist import DefaultsHelpFormatter
from vkd_dist.data_cli import build_parser as data_parser
from vkd_dist.data_cli import main as vkd_data

REPO = Path(__file__).resolve().parent.parent
SYNTHETIC_OPTIONS = ("--out", "--num-train", "--num-val", "--num-test", "--image-size", "--seed", "--lesion-contrast",
                     "--noise", "--label-noise", "--prevalence-scale", "--samples-per-shard", "--image-format",
                     "--workers")


def _help(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def _option_help(text: str) -> dict[str, str]:
    """`--opt METAVAR  help...` blocks of an argparse help text -> {--opt: its help, whitespace collapsed}."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^  (-[-\w]+)(?:[ ,][^ ]+)*(?: {2,}(.*))?$", line)
        if m and line.startswith("  -"):
            current = m.group(1)
            blocks[current] = (m.group(2) or "").strip()
        elif current and line.startswith("    "):
            blocks[current] = f"{blocks[current]} {line.strip()}".strip()
        else:
            current = None
    return blocks


# ------------------------------------------------------------------------------------------------ vkd-data
def test_vkd_data_synthetic_help_documents_every_option_with_its_default(capsys):
    text = _help(vkd_data, ["synthetic", "--help"], capsys)
    helps = _option_help(text)
    for opt in SYNTHETIC_OPTIONS:
        assert helps.get(opt), f"{opt} has no help line"
        if opt != "--out":  # required: nothing to default to
            assert "(default: " in helps[opt], f"{opt}: {helps[opt]!r}"
    assert "(default: 2000)" in helps["--num-train"]
    assert "(default: 500)" in helps["--num-val"] and "(default: 500)" in helps["--num-test"]
    assert "(default: 0.05)" in helps["--label-noise"] and "(default: jpg)" in helps["--image-format"]
    assert "default" not in helps["--out"]


def test_vkd_data_every_subparser_shows_defaults(capsys):
    parser = data_parser()
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"synthetic", "embed-text", "manifest", "mimic-cxr", "openi"} <= set(sub.choices)
    for name, p in sub.choices.items():
        assert p.formatter_class is DefaultsHelpFormatter, name
    helps = _option_help(_help(vkd_data, ["manifest", "--help"], capsys))
    assert "(default: 256)" in helps["--image-size"] and helps["--image-size"].count("default") == 1
    assert helps["--resize"].count("default") == 1  # no "(default)" fragment besides the shown one
    assert "(default: None)" not in helps["--image-root"]  # None is not shown; the help says what happens


@pytest.fixture
def tiny_csv(tmp_path) -> Path:
    path = tmp_path / "m.csv"
    path.write_text("image,text,patient_id,Cardiomegaly\nimg/a.png,Normal.,P1,0\n")
    return path


def test_vkd_data_user_error_is_one_line(tiny_csv, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VKD_DEBUG", raising=False)
    argv = ["manifest", "--csv", str(tiny_csv), "--out", str(tmp_path / "out"), "--label-cols", "Edema",
            "--workers", "1", "--no-progress"]
    assert vkd_data(argv) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vkd-data: error: ") and "missing column(s) 'Edema'" in lines[0]
    assert "Traceback" not in err

    monkeypatch.setenv("VKD_DEBUG", "1")
    with pytest.raises(ValueError, match="missing column"):
        vkd_data(argv)


def test_vkd_data_missing_file_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VKD_DEBUG", raising=False)
    assert vkd_data(["openi", "--reports", str(tmp_path), "--images", str(tmp_path / "nope"),
                     "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("vkd-data: error: --images")


def test_vkd_data_bugs_still_raise(tiny_csv, tmp_path, monkeypatch):
    from vkd_dist.data.sources import manifest

    def boom(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.delenv("VKD_DEBUG", raising=False)
    monkeypatch.setattr(manifest, "convert_manifest", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        vkd_data(["manifest", "--csv", str(tiny_csv), "--out", str(tmp_path / "o"), "--label-cols", "Cardiomegaly"])


# ------------------------------------------------------------------------------------------------ vkd-slurm
def test_vkd_slurm_help_shows_defaults(capsys):
    from vkd_dist.slurm import main

    helps = _option_help(_help(main, ["--help"], capsys))
    assert "(default: 1)" in helps["--nodes"] and "(default: 24:00:00)" in helps["--time"]
    assert "(default: the config's dist.strategy, else ddp)" in helps["--strategy"]
    assert "(default: 5)" in helps["--max-requeues"]
    assert "(default: None)" not in " ".join(helps.values()) and "(default: False)" not in " ".join(helps.values())


def test_vkd_slurm_console_script_and_launcher():
    script = Path(sys.executable).parent / "vkd-slurm"
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable} (package not installed in this interpreter)")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: vkd-slurm ") and "(default: 24:00:00)" in proc.stdout
    proc = subprocess.run([sys.executable, str(REPO / "launchers" / "slurm.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: slurm.py ") and "(default: 24:00:00)" in proc.stdout


def test_vkd_slurm_time_is_checked_by_argparse(capsys):
    from vkd_dist.slurm import _parse_time, build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--time", "1h"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(error_lines) == 1 and "Traceback" not in err
    assert "argument --time" in error_lines[0] and "'1h'" in error_lines[0]
    assert "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS" in error_lines[0]
    for bad in ("1h", "", "1:2:3:4", "1-2-3", "-5", "0", "1.5", "2-"):
        with pytest.raises(ValueError):
            _parse_time(bad)

    minutes = {"30": 30, "30:15": 31, "2:00:00": 120, "1-02": 1560, "1-02:30": 1590, "1-02:30:01": 1591,
               "24:00:00": 1440}
    for text, want in minutes.items():
        args = build_parser().parse_args(["--time", text])
        assert args.time == text and _parse_time(args.time) == want, text
    assert build_parser().parse_args([]).time == "24:00:00"


# ------------------------------------------------------------------------------------------------ vkd-train
def test_vkd_train_help_keeps_its_preformatted_description(capsys, monkeypatch):
    import vkd_dist.train as train  # heavy import (torch, accelerate), but no training

    seen = []
    real = argparse.ArgumentParser.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("formatter_class"))
        real(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "__init__", spy)
    text = _help(train.parse_args, ["--help"], capsys)
    assert text.startswith("usage: vkd-train ")
    assert seen and issubclass(seen[0], argparse.ArgumentDefaultsHelpFormatter)
    assert issubclass(seen[0], argparse.RawDescriptionHelpFormatter)
    for line in train.__doc__.strip().splitlines()[:2]:
        assert line in text  # RawDescription: the docstring's lines are kept as written


# ------------------------------------------------------------------------------------------------ every tool
def test_every_help_answers_before_the_heavy_libraries_load():
    """`--help` of each console script imports none of torch, accelerate, transformers, timm, scikit-learn or
    webdataset (seconds each on a loaded machine): the tools parse their arguments first."""
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    heavy = ("torch", "accelerate", "transformers", "timm", "sklearn", "webdataset", "deepspeed")
    for name, target in scripts.items():
        module, func = target.split(":")
        code = (f"import sys\nfrom {module} import {func}\ntry:\n    {func}(['--help'])\nexcept SystemExit as e:\n"
                f"    assert e.code == 0, e.code\nprint(sorted(m for m in {heavy!r} if m in sys.modules))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
        assert proc.stdout.strip().splitlines()[-1] == "[]", f"{name} --help imports {proc.stdout.splitlines()[-1]}"
