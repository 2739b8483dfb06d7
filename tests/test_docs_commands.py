"""The commands of docs/partial-labels.md run as printed, in order, on made-up studies: a CSV manifest and a
MIMIC-CXR-JPG tree with labels for some studies, the report labeller and the recommended recipe, the image-only
baseline, the comparison, the export and predictions, then VKD's teacher and recipe and their comparison. Two
changes, both here: the MIMIC paths (`/data/...`) point at the made-up tree, and each training command gets
configs/tiny.yaml's overrides appended (a seconds-long model), so the page's own keys are overridden only where
tiny.yaml sets them. scripts/check_docs_commands.sh runs this file, and the README's Quick start as printed, in a
fresh clone."""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import shlex
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import REPO, TINY_CONFIG

PAGE = REPO / "docs" / "partial-labels.md"
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
TRAIN_MODULE = "vkd_dist.train"


def page_commands(text: str) -> list[list[str]]:
    """Every command of the page's ```bash blocks, in order, as argv lists (continuation lines joined, comments
    dropped)."""
    commands = []
    for block in BASH_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append(argv)
    return commands


def test_page_commands_are_read_as_printed():
    text = "x\n```bash\n.venv/bin/a --x 1 \\\n    --y 2   # note\n\n.venv/bin/b\n```\n```text\nnot run\n```\n"
    assert page_commands(text) == [[".venv/bin/a", "--x", "1", "--y", "2"], [".venv/bin/b"]]


def _studies(ws: Path) -> None:
    """my_studies.csv and images/: 48 patients; validation and test patients (by the converter's hash split)
    labelled, two thirds of the training patients without labels."""
    from vkd_dist.data.sources import hash_split

    (ws / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(48):
        name, patient = f"images/s{i:03d}.png", f"P{i:03d}"
        Image.fromarray(rng.integers(0, 255, (72, 72), dtype=np.uint8)).save(ws / name)
        edema, cardio = i % 2, (i // 2) % 2
        text = f"FINDINGS: {'Edema.' if edema else 'No edema.'} {'Enlarged heart.' if cardio else 'Normal heart.'}"
        unlabelled = hash_split(patient, 0.1, 0.1) == "train" and i % 3 != 0
        rows.append((name, text, patient, "" if unlabelled else edema, "" if unlabelled else cardio))
    with open(ws / "my_studies.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "text", "patient_id", "Edema", "Cardiomegaly"])
        w.writerows(rows)


def _mimic_tree(root: Path) -> None:
    """A MIMIC-CXR-JPG v2 layout: 12 subjects with one PA study each (8 train, 2 validate, 2 test); of the training
    studies 4 labelled, 2 with every label blank and 2 missing from the label table."""
    from vkd_dist.labels import LABELS

    jpg = root / "mimic-cxr-jpg"
    jpg.mkdir(parents=True)
    rng = np.random.default_rng(1)
    meta, split, labels = [], [], []
    with zipfile.ZipFile(root / "mimic-cxr-reports.zip", "w") as zf:
        for i in range(12):
            subject, study, dicom = f"1{i:07d}", f"5{i:07d}", f"d{i}"
            folder = jpg / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (80, 64), dtype=np.uint8)).save(folder / f"{dicom}.jpg")
            zf.writestr(f"files/p{subject[:2]}/p{subject}/s{study}.txt", f"FINAL REPORT\n FINDINGS: study {i}.\n")
            meta.append({"dicom_id": dicom, "subject_id": subject, "study_id": study, "ViewPosition": "PA"})
            split.append({"dicom_id": dicom, "study_id": study, "subject_id": subject,
                          "split": "train" if i < 8 else "validate" if i < 10 else "test"})
            if i in (6, 7):
                continue  # not in the label table
            row = {n: "" for n in LABELS}
            if i not in (4, 5):
                row["Edema"] = "1.0" if i % 2 else "0.0"
            labels.append({"subject_id": subject, "study_id": study, **row})
    for name, cols, rows in (("metadata", ["dicom_id", "subject_id", "study_id", "ViewPosition"], meta),
                             ("split", ["dicom_id", "study_id", "subject_id", "split"], split),
                             ("chexpert", ["subject_id", "study_id", *LABELS], labels)):
        with gzip.open(jpg / f"mimic-cxr-2.0.0-{name}.csv.gz", "wt", newline="") as fh:
            w = csv.DictWriter(fh, cols)
            w.writeheader()
            w.writerows(rows)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VKD_DOCS_COMMANDS") != "1",
                    reason="about 2 minutes (four training runs): scripts/check_docs_commands.sh runs it "
                           "(VKD_DOCS_COMMANDS=1)")
def test_every_command_of_the_partial_labels_page_runs(tmp_path):
    from vkd_dist.config import overrides_from_yaml

    if not (REPO / ".venv" / "bin").is_dir():
        pytest.skip("no .venv beside the repository (bash scripts/setup.sh makes it): the page's commands use it")
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in ("configs", ".venv"):
        (ws / name).symlink_to(REPO / name)
    _studies(ws)
    _mimic_tree(tmp_path / "mimic")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
           "OMP_NUM_THREADS": "1"}
    tiny = [*overrides_from_yaml(TINY_CONFIG), "train.bootstrap_resamples=50"]
    commands = page_commands(PAGE.read_text(encoding="utf-8"))
    assert [c[0] for c in commands] == [".venv/bin/vkd-data", ".venv/bin/vkd-data", ".venv/bin/vkd-data",
                                        ".venv/bin/accelerate", ".venv/bin/accelerate", ".venv/bin/vkd-compare",
                                        ".venv/bin/vkd-export", ".venv/bin/vkd-predict", ".venv/bin/accelerate",
                                        ".venv/bin/accelerate", ".venv/bin/vkd-compare"]
    outputs = []
    for argv in commands:
        argv = [a.replace("/data/", f"{tmp_path / 'mimic'}/") for a in argv]
        if TRAIN_MODULE in argv:
            argv = [*argv, *tiny]
        proc = subprocess.run(argv, cwd=ws, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{shlex.join(argv)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    assert re.search(r"train: \d+ samples in \d+ shards \(\d+ without labels\)", outputs[0]), outputs[0]
    mimic = json.loads((ws / "data" / "mimic" / "dataset.json").read_text())
    assert mimic["splits"]["train"]["num_unlabelled"] == 4 and mimic["rejects"] == 0
    labelled = json.loads((ws / "data" / "mine-labelled" / "dataset.json").read_text())
    assert labelled["splits"]["train"]["num_unlabelled"] == 0  # the labeller labelled every training study
    config = yaml.safe_load((ws / "runs" / "labelled" / "config.yaml").read_text())
    assert config["objective"]["name"] == "image_only" and str(config["data"]["path"]).endswith("data/mine-labelled")
    assert json.loads((ws / "compare.json").read_text())
    config = yaml.safe_load((ws / "runs" / "distil" / "config.yaml").read_text())  # VKD, to compare (section 5)
    assert str(config["objective"]["text_init"]).endswith("runs/teacher")
    assert config["objective"]["predictive_weight"] == 4.0 and config["model"]["image_head"] == "separate"
    assert json.loads((ws / "compare_vkd.json").read_text())
    with open(ws / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 48 and not any(r["error"] for r in rows)


def test_the_check_script_runs_the_readme_quick_start_as_printed():
    """scripts/check_docs_commands.sh reads the Quick start's commands from README.md itself, every one of them."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    quick_start = readme.split("## Quick start", 1)[1]
    printed = [shlex.join(c) for c in page_commands(quick_start.split("\n## ", 1)[0])]
    assert printed and printed[0].startswith("bash scripts/setup.sh")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "check_docs_commands.sh"), "--print"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("clone: git clone ")
    assert [shlex.join(shlex.split(line)) for line in lines[1:-1]] == printed
    assert lines[-1] == "VKD_DOCS_COMMANDS=1 bash scripts/test.sh tests/test_docs_commands.py"
