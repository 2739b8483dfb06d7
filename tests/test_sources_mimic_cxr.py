"""MIMIC-CXR-JPG converter on a miniature tree with the official csv.gz column layout."""

import csv
import gzip
import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import read_shards
from vkd_dist.data.sources import ConvertOptions
from vkd_dist.data.sources.mimic_cxr import convert_mimic
from vkd_dist.data_cli import main as vkd_data
from vkd_dist.labels import LABELS

META_COLS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
             "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
             "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
# dicom, subject, study, view, official split (None = absent from the split csv)
DICOMS = [
    ("d1", "10000001", "50000001", "PA", "train"),
    ("d2", "10000001", "50000001", "LATERAL", "train"),
    ("d3", "10000001", "50000002", "AP", "train"),
    ("d4", "10000002", "50000003", "PA", "validate"),
    ("d5", "11000003", "50000004", "PA", "test"),
    ("d6", "11000003", "50000005", "AP", "test"),      # truncated jpg
    ("d7", "12000004", "50000006", "PA", "train"),     # no report file
    ("d8", "12000004", "50000007", "PA", "train"),     # study not in the label csv
    ("d9", "12000004", "50000006", "PA", None),        # not in the split csv
]
REPORTS = {
    "50000001": "                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n INDICATION:  "
                "___F with cough\n\n FINDINGS:\n \n The lungs are clear.  No\n effusion.\n \n IMPRESSION:  \n \n "
                "No acute process.\n",
    "50000002": "FINAL REPORT\n FINDINGS: Small left effusion seen by Dr. ___.\n",
    "50000003": "FINAL REPORT\n IMPRESSION: Cardiomegaly.\n",
    "50000004": "FINAL REPORT\n INDICATION: fever\n\n COMPARISON: none\n",
    "50000005": "FINAL REPORT\n IMPRESSION: Edema.\n",
    "50000007": "FINAL REPORT\n IMPRESSION: Clear.\n",
}


def _labels(study, negbio=False):
    row = {n: "" for n in LABELS}
    row["Pleural Effusion"] = {"50000002": "1.0", "50000001": "0.0"}.get(study, "")
    row["Cardiomegaly"] = "-1.0" if study == "50000003" else ""
    row["No Finding"] = "1.0" if study == "50000001" else ""
    if negbio and study == "50000003":
        row["Cardiomegaly"] = "1.0"
    return row


def _write_gz(path, cols, rows):
    with gzip.open(path, "wt", newline="") as fh:
        w = csv.DictWriter(fh, cols)
        w.writeheader()
        w.writerows(rows)


@pytest.fixture(scope="module")
def mimic(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic")
    jpg = root / "mimic-cxr-jpg"
    rng = np.random.default_rng(0)
    meta, split = [], []
    for dicom, subj, study, view, sp in DICOMS:
        d = jpg / "files" / f"p{subj[:2]}" / f"p{subj}" / f"s{study}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (90, 70), dtype=np.uint8)).save(d / f"{dicom}.jpg", quality=90)
        if dicom == "d6":
            data = (d / f"{dicom}.jpg").read_bytes()
            (d / f"{dicom}.jpg").write_bytes(data[: len(data) // 3])
        meta.append({"dicom_id": dicom, "subject_id": subj, "study_id": study, "ViewPosition": view, "Rows": 90,
                     "Columns": 70, "StudyDate": "21800101", "StudyTime": "120000",
                     "PerformedProcedureStepDescription": "CHEST (PA AND LAT)"})
        if sp:
            split.append({"dicom_id": dicom, "study_id": study, "subject_id": subj, "split": sp})
    _write_gz(jpg / "mimic-cxr-2.0.0-metadata.csv.gz", META_COLS, meta)
    _write_gz(jpg / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split)
    studies = sorted({(s, st) for _, s, st, _, _ in DICOMS if st != "50000007"})
    for name, negbio in (("chexpert", False), ("negbio", True)):
        _write_gz(jpg / f"mimic-cxr-2.0.0-{name}.csv.gz", ["subject_id", "study_id", *LABELS],
                  [{"subject_id": s, "study_id": st, **_labels(st, negbio)} for s, st in studies])
    tree = root / "reports"
    zpath = root / "mimic-cxr-reports.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for _, subj, study, _, _ in DICOMS:
            if study in REPORTS:
                rel = f"files/p{subj[:2]}/p{subj}/s{study}.txt"
                (tree / rel).parent.mkdir(parents=True, exist_ok=True)
                (tree / rel).write_text(REPORTS[study])
                if rel not in zf.namelist():
                    zf.writestr(rel, REPORTS[study])
    return jpg, tree, zpath


def _digest(out: Path) -> dict:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*.tar"))}


def test_convert_counts_views_labels_sections_rejects(mimic, tmp_path):
    jpg, tree, zpath = mimic
    out = tmp_path / "out"
    meta = convert_mimic(jpg, zpath, out, opts=ConvertOptions(image_size=32), workers=2, samples_per_shard=1,
                         progress=False)
    assert {s: v["num_samples"] for s, v in meta["splits"].items()} == {"train": 2, "val": 1, "test": 1}
    assert meta["rejects_by_reason"] == {"truncated_image": 1, "missing_report": 1, "no_labels": 1, "no_split": 1}
    assert meta["params"]["counts"]["filtered_by_view"] == {"LATERAL": 1}
    with open(out / "rejects.csv") as fh:
        rejects = {r["item_id"]: r for r in csv.DictReader(fh)}
    assert set(rejects) == {"d6", "d7", "d8", "d9"} and rejects["d6"]["path"].endswith("d6.jpg")
    train, val, test = (read_shards(out, s) for s in ("train", "val", "test"))
    assert set(train) == {"d1", "d3"} and set(val) == {"d4"} and set(test) == {"d5"}
    assert train["d1"]["text"] == "FINDINGS: The lungs are clear. No effusion.\nIMPRESSION: No acute process."
    assert train["d1"]["meta"]["labels"]["No Finding"] == 1 and train["d1"]["meta"]["labels"]["Pleural Effusion"] == 0
    assert train["d3"]["meta"]["labels"]["Pleural Effusion"] == 1 and train["d3"]["meta"]["view"] == "AP"
    assert val["d4"]["meta"]["labels"]["Cardiomegaly"] == -1 and val["d4"]["text"] == "IMPRESSION: Cardiomegaly."
    assert test["d5"]["text"] == "INDICATION: fever\nCOMPARISON: none"  # fallback to the whole body
    assert train["d1"]["meta"]["patient_id"] == "10000001" and train["d1"]["meta"]["study_id"] == "50000001"
    assert set(train["d1"]["meta"]["labels"]) == set(LABELS)


def test_zip_and_tree_deterministic_and_resumable(mimic, tmp_path):
    jpg, tree, zpath = mimic
    kw = dict(opts=ConvertOptions(image_size=32), samples_per_shard=1, progress=False)
    convert_mimic(jpg, zpath, tmp_path / "a", workers=2, **kw)
    convert_mimic(jpg, tree, tmp_path / "b", workers=1, **kw)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != {}
    shard = tmp_path / "a" / "train" / "shard-000000.tar"
    before = shard.stat().st_mtime_ns
    convert_mimic(jpg, zpath, tmp_path / "a", workers=2, **kw)  # rerun: finished shards are kept
    assert shard.stat().st_mtime_ns == before
    convert_mimic(jpg, zpath, tmp_path / "a", workers=2, **{**kw, "opts": ConvertOptions(image_size=40)})
    assert shard.stat().st_mtime_ns != before  # changed parameters rebuild


def test_options_views_negbio_deid_patient_split(mimic, tmp_path):
    jpg, tree, zpath = mimic
    meta = convert_mimic(jpg, tree, tmp_path / "o", opts=ConvertOptions(image_size=32, deid="token"),
                         label_source="negbio", views=["all"], split="patient", val_frac=0.3, test_frac=0.3,
                         workers=1, progress=False)
    samples = {}
    for s in ("train", "val", "test"):
        for k, v in read_shards(tmp_path / "o", s).items():
            samples[k] = (s, v)
    assert "d2" in samples and samples["d2"][1]["meta"]["view"] == "LATERAL"
    assert samples["d4"][1]["meta"]["labels"]["Cardiomegaly"] == 1  # negbio's value
    assert samples["d3"][1]["text"] == "FINDINGS: Small left effusion seen by Dr. [DEID]."
    by_patient = {}
    for s, v in samples.values():
        assert by_patient.setdefault(v["meta"]["patient_id"], s) == s
    assert "no_split" not in meta["rejects_by_reason"]


def test_cli_and_clear_errors(mimic, tmp_path, capsys):
    jpg, tree, zpath = mimic
    assert vkd_data(["mimic-cxr", "--jpg-root", str(jpg), "--reports", str(zpath), "--out", str(tmp_path / "c"),
                     "--image-size", "32", "--views", "PA", "--workers", "1", "--no-progress"]) == 0
    assert "train: 1 samples" in capsys.readouterr().out  # d3 is AP
    with pytest.raises(FileNotFoundError, match="no files/ folder"):
        convert_mimic(tmp_path, zpath, tmp_path / "x")
    bad = tmp_path / "bad.csv.gz"
    _write_gz(bad, ["dicom_id", "subject_id"], [])
    with pytest.raises(ValueError, match=r"bad.csv.gz: missing column\(s\) 'study_id'"):
        convert_mimic(jpg, zpath, tmp_path / "x", metadata=bad)


def test_allow_unlabelled_keeps_training_studies_without_labels(mimic, tmp_path, capsys):
    jpg, tree, zpath = mimic
    # A label table with labels for the val and test studies, an all-blank row for a training study (50000001),
    # and none at all for another (50000007, d8, as in the shipped fixture).
    studies = sorted({(s, st) for _, s, st, _, _ in DICOMS if st != "50000007"})
    rows = []
    for s, st in studies:
        row = {"subject_id": s, "study_id": st, **_labels(st)}
        if st == "50000001":
            row.update({n: "" for n in LABELS})
        if st in ("50000004", "50000005"):
            row["Edema"] = "1.0"
        rows.append(row)
    labels = tmp_path / "labels.csv.gz"
    _write_gz(labels, ["subject_id", "study_id", *LABELS], rows)
    common = dict(opts=ConvertOptions(image_size=32), labels_csv=labels, workers=1, progress=False)

    strict = convert_mimic(jpg, zpath, tmp_path / "strict", **common)
    assert strict["rejects_by_reason"]["no_labels"] == 1  # d8; d1's blanks read as negatives (MIMIC's convention)
    assert read_shards(tmp_path / "strict", "train")["d1"]["meta"].get("labelled", True) is True

    meta = convert_mimic(jpg, zpath, tmp_path / "o", allow_unlabelled=True, **common)
    assert "no_labels" not in meta["rejects_by_reason"]
    train = read_shards(tmp_path / "o", "train")
    assert {k: v["meta"].get("labelled", True) for k, v in train.items()} == {"d1": False, "d3": True, "d8": False}
    assert meta["splits"]["train"]["num_unlabelled"] == 2
    assert meta["params"]["counts"]["unlabelled"] == 3  # planned: d7's study is all blank too (no report: rejected)

    assert vkd_data(["mimic-cxr", "--jpg-root", str(jpg), "--reports", str(zpath), "--out", str(tmp_path / "c"),
                     "--labels-csv", str(labels), "--allow-unlabelled", "--image-size", "32", "--workers", "1",
                     "--no-progress"]) == 0
    assert "train: 3 samples in 1 shards (2 without labels)" in capsys.readouterr().out


def test_unlabelled_test_studies_leave_an_empty_split_which_is_refused(mimic, tmp_path):
    jpg, tree, zpath = mimic  # the fixture's two test studies have every label blank
    with pytest.raises(ValueError, match=r"the test split would be empty .*no image of the kept views has split "
                                         r"'test' in mimic-cxr-2.0.0-split.csv.gz.*2 of its item\(s\) were rejected"):
        convert_mimic(jpg, zpath, tmp_path / "o", opts=ConvertOptions(image_size=32), allow_unlabelled=True,
                      workers=1, progress=False)
