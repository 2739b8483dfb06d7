"""Generic CSV manifest converter with awkward images: 16-bit, RGBA, palette, EXIF-rotated, truncated,
missing, huge, tiny; label columns and a categorical label column; empty-report policy."""

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vkd_dist.data.sources import ConvertOptions
from vkd_dist.data.sources.manifest import convert_manifest, parse_label_cols
from vkd_dist.data_cli import main as vkd_data


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    img = root / "img"
    img.mkdir()
    grad = np.linspace(0, 255, 120 * 100).reshape(120, 100).astype(np.uint8)
    Image.fromarray(grad.astype(np.uint16) * 16).save(img / "b16.png")
    Image.fromarray(np.dstack([grad] * 3 + [np.full_like(grad, 255)]), "RGBA").save(img / "rgba.png")
    Image.fromarray(np.dstack([grad] * 3)).convert("P", palette=Image.ADAPTIVE).save(img / "pal.png")
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(grad).save(img / "exif.jpg", exif=exif)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8)).save(buf, "JPEG")
    (img / "trunc.jpg").write_bytes(buf.getvalue()[:600])
    Image.new("L", (4300, 3500), 128).save(img / "huge.jpg", quality=50)
    Image.new("L", (16, 16), 128).save(img / "tiny.png")
    rows = [  # image, text, patient, labels Cardiomegaly / effusion(=Pleural Effusion), finding
        ("img/b16.png", "Heart  is\n enlarged.", "P1", "1.0", "", "Cardiomegaly"),
        ("img/rgba.png", "Small effusion. XXXX XXXX", "P1", "", "1", "Pleural Effusion"),
        ("img/pal.png", "Normal.", "P2", "0", "0", "No Finding"),
        ("img/exif.jpg", "Normal.", "P3", "0", "-1", "no finding"),
        ("img/trunc.jpg", "x", "P4", "0", "0", "No Finding"),
        ("img/missing.png", "x", "P5", "0", "0", "No Finding"),
        (str(img / "huge.jpg"), "Big image.", "P6", "", "0", "Edema|Cardiomegaly"),
        ("img/tiny.png", "x", "P7", "", "0", ""),
        ("img/pal.png", "   ", "P8", "", "0", "No Finding"),  # empty report
        ("img/pal.png", "bad label", "P9", "yes", "", "Flu"),
        ("", "no image", "P10", "", "", ""),
    ]
    with open(root / "m.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "report", "pid", "Cardiomegaly", "effusion", "finding"])
        w.writerows(rows)
    return root / "m.csv"


# These fixtures test images and labels on a handful of patients, too few for a 10 % hash split to fill val and
# test (which the converter refuses): everything goes to train, on purpose.
TRAIN_ONLY = {"val_frac": 0.0, "test_frac": 0.0}


def read_all(out: Path) -> dict:
    samples = {}
    for tar_path in sorted(out.glob("*/shard-*.tar")):
        with tarfile.open(tar_path) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {"split": tar_path.parent.name})[ext] = tf.extractfile(m).read()
    return samples


def test_label_columns_awkward_images(manifest, tmp_path):
    meta = convert_manifest(manifest, tmp_path / "o", opts=ConvertOptions(image_size=32, deid="token"),
                            image_col="path", text_col="report", patient_col="pid",
                            label_cols="Cardiomegaly,effusion=Pleural Effusion", label_set="chexpert", workers=2,
                            samples_per_shard=2, progress=False, **TRAIN_ONLY)
    assert meta["rejects_by_reason"] == {"truncated_image": 1, "missing_image": 1, "too_small": 1,
                                         "empty_report": 1, "bad_label": 1, "bad_row": 1}
    samples = read_all(tmp_path / "o")
    assert sum(s["num_samples"] for s in meta["splits"].values()) == len(samples) == 5
    keys = {"row-0000001", "row-0000002", "row-0000003", "row-0000004", "row-0000007"}
    assert set(samples) == keys
    for s in samples.values():
        arr = np.asarray(Image.open(io.BytesIO(s["jpg"])))
        assert arr.shape == (32, 32) and arr.dtype == np.uint8
    labels = {k: json.loads(v["json"])["labels"] for k, v in samples.items()}
    assert labels["row-0000001"]["Cardiomegaly"] == 1 and labels["row-0000001"]["Pleural Effusion"] is None
    assert labels["row-0000004"]["Pleural Effusion"] == -1 and labels["row-0000004"]["Edema"] is None
    assert samples["row-0000001"]["txt"].decode() == "Heart is enlarged."
    assert samples["row-0000002"]["txt"].decode() == "Small effusion. [DEID]"
    assert samples["row-0000001"]["split"] == samples["row-0000002"]["split"]  # same patient, same split
    b16 = np.asarray(Image.open(io.BytesIO(samples["row-0000001"]["jpg"])))
    assert b16.max() > 200  # windowed, not shifted to near-black
    with open(tmp_path / "o" / "rejects.csv") as fh:
        reasons = {r["item_id"]: r["reason"] for r in csv.DictReader(fh)}
    assert "column 'Cardiomegaly'" in reasons["row-0000010"] and "'yes'" in reasons["row-0000010"]


def test_categorical_keep_empty_and_split_col(manifest, tmp_path):
    meta = convert_manifest(manifest, tmp_path / "o", opts=ConvertOptions(image_size=32, empty_report="keep",
                                                                          resize="pad"),
                            image_col="path", text_col="report", patient_col="pid", label_col="finding",
                            workers=1, progress=False, **TRAIN_ONLY)
    samples = read_all(tmp_path / "o")
    assert "row-0000009" in samples and samples["row-0000009"]["txt"] == b""  # kept, empty text
    labels = {k: json.loads(v["json"])["labels"] for k, v in samples.items()}
    assert labels["row-0000003"]["No Finding"] == 1 and labels["row-0000003"]["Cardiomegaly"] == 0
    assert labels["row-0000004"]["No Finding"] == 1  # case-insensitive
    assert labels["row-0000007"]["Edema"] == 1 and labels["row-0000007"]["Cardiomegaly"] == 1
    assert labels["row-0000009"]["No Finding"] == 1
    rejects = open(tmp_path / "o" / "rejects.csv").read()
    assert "'Flu' is not a CheXpert label" in rejects
    # A blank categorical cell gives no labels at all: rejected, not read as 14 negatives.
    assert "row-0000008" not in samples and "no_labels: m.csv line 9: every label cell is blank" in rejects
    assert meta["rejects"] == 5


def test_cli_and_errors(manifest, tmp_path, capsys):
    assert vkd_data(["manifest", "--csv", str(manifest), "--out", str(tmp_path / "c"), "--image-col", "path",
                     "--text-col", "report", "--patient-col", "pid", "--label-col", "finding", "--image-size", "32",
                     "--workers", "1", "--no-progress", "--val-frac", "0", "--test-frac", "0"]) == 0
    out = capsys.readouterr().out
    assert "rejected" in out and "rejects by reason" in out and "Heart" not in out  # no report text in logs
    with pytest.raises(ValueError, match="missing column"):
        convert_manifest(manifest, tmp_path / "x", label_col="finding")  # default columns image/text absent
    with pytest.raises(ValueError, match="'Effusion' is not a CheXpert label"):
        parse_label_cols("Effusion")
    with pytest.raises(ValueError, match="exactly one of"):
        convert_manifest(manifest, tmp_path / "x", image_col="path", text_col="report", patient_col="pid")


def test_unlabelled_rows_kept_only_with_allow_unlabelled_and_only_for_training(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    Image.new("L", (64, 64), 100).save(img / "a.png")
    rows = [("img/a.png", f"report {i}", f"P{i}", split, "1" if i % 3 == 0 else "") for i, split in
            enumerate(["train"] * 6 + ["val", "test"])]  # rows 0 and 3 labelled in train; val/test unlabelled
    rows[6] = (*rows[6][:4], "0")  # a labelled val row
    rows.append(("img/a.png", "report 8", "P8", "test", "0"))  # and a labelled test row (an empty split is refused)
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "report", "pid", "split", "Cardiomegaly"])
        w.writerows(rows)
    common = dict(image_col="path", text_col="report", patient_col="pid", split_col="split",
                  label_cols="Cardiomegaly", opts=ConvertOptions(image_size=32), workers=1, progress=False)
    strict = convert_manifest(tmp_path / "m.csv", tmp_path / "strict", **common)
    assert strict["rejects_by_reason"] == {"no_labels": 5}  # 4 train rows + the test row
    assert strict["splits"]["train"]["num_unlabelled"] == 0

    meta = convert_manifest(tmp_path / "m.csv", tmp_path / "o", allow_unlabelled=True, **common)
    assert meta["rejects_by_reason"] == {"no_labels": 1}  # the test row: a scored study needs labels
    assert "a validation or test study is scored" in (tmp_path / "o" / "rejects.csv").read_text()
    train = meta["splits"]["train"]
    assert (train["num_samples"], train["num_labelled"], train["num_unlabelled"]) == (6, 2, 4)
    # Label counts and prevalence are over the labelled studies: unlabelled blanks are not counted as blanks.
    assert meta["label_counts"]["train"]["Cardiomegaly"] == {"1": 2, "0": 0, "-1": 0, "null": 0}
    assert meta["prevalence"]["train"]["Cardiomegaly"] == 1.0
    samples = read_all(tmp_path / "o")
    flags = {k: json.loads(v["json"]).get("labelled", True) for k, v in samples.items() if v["split"] == "train"}
    assert flags == {"row-0000001": True, "row-0000002": False, "row-0000003": False, "row-0000004": True,
                     "row-0000005": False, "row-0000006": False}


def test_allow_unlabelled_cli_counts_them(tmp_path, capsys):
    img = tmp_path / "img"
    img.mkdir()
    Image.new("L", (64, 64), 100).save(img / "a.png")
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "text", "split", "Edema"])
        w.writerows([("img/a.png", "one", "train", "1"), ("img/a.png", "two", "train", ""),
                     ("img/a.png", "three", "val", "0"), ("img/a.png", "four", "test", "1")])
    assert vkd_data(["manifest", "--csv", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"), "--split-col",
                     "split", "--patient-col", "", "--label-cols", "Edema", "--allow-unlabelled", "--image-size",
                     "32", "--workers", "1", "--no-progress"]) == 0
    assert "train: 2 samples in 1 shards (1 without labels)" in capsys.readouterr().out


def _one_image_csv(tmp_path: Path, header: list, rows: list) -> Path:
    img = tmp_path / "img"
    img.mkdir(exist_ok=True)
    Image.new("L", (64, 64), 100).save(img / "a.png")
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return tmp_path / "m.csv"


def test_an_empty_test_split_is_refused_naming_the_flag(tmp_path, capsys):
    from vkd_dist.data.sources import hash_split

    # Patients that the default 10 % / 10 % hash split sends to train and val only: the test split comes out empty.
    patients = [p for p in (f"P{i}" for i in range(200)) if hash_split(p, 0.1, 0.1) != "test"][:12]
    assert {hash_split(p, 0.1, 0.1) for p in patients} == {"train", "val"}
    csv_path = _one_image_csv(tmp_path, ["image", "text", "patient_id", "Edema"],
                              [("img/a.png", f"report {p}", p, "1") for p in patients])
    argv = ["manifest", "--csv", str(csv_path), "--out", str(tmp_path / "o"), "--label-cols", "Edema",
            "--image-size", "32", "--workers", "1", "--no-progress"]
    assert vkd_data(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "the test split would be empty" in err
    assert "none of the 12 patient(s) in it (--test-frac 0.1, --seed 0): raise --test-frac" in err
    assert not (tmp_path / "o" / "dataset.json").exists()  # refused before anything is written
    # Asked for: --test-frac 0 converts without a test split (val keeps its patients: val is [0, 0.2) then).
    assert vkd_data([*argv, "--test-frac", "0", "--val-frac", "0.2"]) == 0
    meta = json.loads((tmp_path / "o" / "dataset.json").read_text())
    assert meta["splits"]["test"]["num_samples"] == 0 and meta["splits"]["val"]["num_samples"] > 0


def test_an_empty_split_column_value_is_refused_naming_the_column(tmp_path):
    csv_path = _one_image_csv(tmp_path, ["image", "text", "split", "Edema"],
                              [("img/a.png", "one", "train", "1"), ("img/a.png", "two", "test", "0"),
                               ("img/a.png", "three", "val", "")])  # the only val row has no labels
    with pytest.raises(ValueError, match=r"the val split would be empty .*no usable row of m.csv has 'val' in "
                                         r"--split-col 'split'.*1 of its item\(s\) were rejected"):
        convert_manifest(csv_path, tmp_path / "o", split_col="split", patient_col="", label_cols="Edema",
                         opts=ConvertOptions(image_size=32), workers=1, progress=False)


def _rows_in_every_split() -> list:
    return [("img/a.png", f"report {i}", split, "1" if i % 2 else "0", "")
            for i, split in enumerate(["train", "train", "val", "val", "test", "test"])]


def test_label_cols_alone_make_the_label_set_and_say_so(tmp_path, capsys):
    csv_path = _one_image_csv(tmp_path, ["image", "text", "split", "Edema", "Cardiomegaly"], _rows_in_every_split())
    assert vkd_data(["manifest", "--csv", str(csv_path), "--out", str(tmp_path / "o"), "--split-col", "split",
                     "--patient-col", "", "--label-cols", "Edema,Cardiomegaly", "--image-size", "32", "--workers",
                     "1", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "labels: Edema, Cardiomegaly (the --label-cols, in order" in captured.out
    meta = json.loads((tmp_path / "o" / "dataset.json").read_text())
    assert meta["labels"] == ["Edema", "Cardiomegaly"]
    # Cardiomegaly is blank on every row: named, with what the policy does with it and the way out.
    assert "warning: 1 of 2 labels have no data (blank on every sample): Cardiomegaly" in captured.err
    assert "trained and scored as negatives" in captured.err and "drop those columns" in captured.err


def test_chexpert_label_set_warns_about_the_labels_it_has_no_data_for(tmp_path, capsys):
    from vkd_dist.labels import LABELS

    csv_path = _one_image_csv(tmp_path, ["image", "text", "split", "Edema", "Cardiomegaly"],
                              [(*r[:4], "1") for r in _rows_in_every_split()])
    assert vkd_data(["manifest", "--csv", str(csv_path), "--out", str(tmp_path / "o"), "--split-col", "split",
                     "--patient-col", "", "--label-cols", "Edema,Cardiomegaly", "--label-set", "chexpert",
                     "--image-size", "32", "--workers", "1", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "labels: " not in captured.out  # the label set was given: nothing to explain
    meta = json.loads((tmp_path / "o" / "dataset.json").read_text())
    assert meta["labels"] == list(LABELS)
    blank = [n for n in LABELS if n not in ("Edema", "Cardiomegaly")]
    assert f"warning: 12 of 14 labels have no data (blank on every sample): {', '.join(blank)}" in captured.err
    assert "--label-cols with --label-set columns" in captured.err
