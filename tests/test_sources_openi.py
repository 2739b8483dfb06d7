"""OpenI converter on the real 46-report XML sample (../shared), with generated images per parentImage id."""

import csv
import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import read_shards
from vkd_dist.data.sources import ConvertOptions
from vkd_dist.data.sources.openi import convert_openi, mesh_labels, parse_report, plan
from vkd_dist.labels import LABELS

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "openi-sample"
XML = SAMPLE / "ecgen-radiology"


@pytest.fixture(scope="module")
def openi(tmp_path_factory):
    if not XML.is_dir():
        pytest.skip(f"OpenI sample not found at {XML} (the repo's sibling ../shared/data/openi-sample)")
    images = tmp_path_factory.mktemp("openi-images")
    ids = []
    for f in sorted(XML.glob("*.xml")):
        ids += re.findall(r'<parentImage id="([^"]+)"', f.read_text())
    rng = np.random.default_rng(0)
    for i, image_id in enumerate(ids):
        arr = rng.integers(0, 255, (48 + i % 5, 40), dtype=np.uint8)
        Image.fromarray(arr).save(images / f"{image_id}.png")
    return images, ids


def test_mesh_table():
    labels, unmapped = mesh_labels(["normal"])
    # A coded report is negative for every label its terms do not name.
    assert labels["No Finding"] == 1 and all(labels[n] == 0 for n in LABELS[1:]) and unmapped == []
    labels, unmapped = mesh_labels(["Pulmonary Edema/bilateral/interstitial/moderate", "Cardiomegaly",
                                    "Pleural Effusion/bilateral", "Heart Failure/moderate"])
    assert (labels["Edema"], labels["Cardiomegaly"], labels["Pleural Effusion"], labels["No Finding"]) == (1, 1, 1, 0)
    assert unmapped == ["Heart Failure/moderate"]
    cases = {"Pulmonary Atelectasis/base/left": "Atelectasis", "Opacity/lung/base/left": "Lung Opacity",
             "Airspace Disease/lung/upper lobe/left": "Lung Opacity", "Infiltrate/lung/base/left/mild": "Lung Opacity",
             "Consolidation/lung/upper lobe/left": "Consolidation", "Pneumonia/lower lobe/left": "Pneumonia",
             "Pneumothorax/right": "Pneumothorax", "Nodule/lung/lingula/small": "Lung Lesion",
             "Mass/lung/base/right/large": "Lung Lesion", "Fractures, Bone/ribs/right": "Fracture",
             "Catheters, Indwelling/right": "Support Devices", "Implanted Medical Device": "Support Devices",
             "Cardiac Shadow/enlarged": "Cardiomegaly", "Costophrenic Angle/right/blunted": "Pleural Effusion"}
    for term, name in cases.items():
        labels, _ = mesh_labels([term])
        assert labels[name] == 1, term
    labels, _ = mesh_labels(["Catheters, Indwelling"])  # only `normal` makes No Finding positive
    assert labels["No Finding"] == 0 and labels["Support Devices"] == 1 and labels["Edema"] == 0
    labels, unmapped = mesh_labels(["Spine/degenerative", "Emphysema"])  # coded, none of the 14 named
    assert all(v == 0 for v in labels.values()) and len(unmapped) == 2
    labels, unmapped = mesh_labels([])  # an uncoded report is unlabelled
    assert all(v is None for v in labels.values()) and unmapped == []


def test_parse_report_sections_and_images():
    if not XML.is_dir():
        pytest.skip(f"OpenI sample not found at {XML}")
    rep = parse_report((XML / "1007.xml").read_bytes(), "1007.xml")
    assert rep["uid"] == "CXR1007" and rep["images"] == ["CXR1007_IM-0008-1001", "CXR1007_IM-0008-2001",
                                                         "CXR1007_IM-0008-3001"]
    assert list(rep["sections"]) == ["COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION"]
    assert rep["mesh"] == ["Thoracic Vertebrae/degenerative/mild"]


def test_convert_first_view(openi, tmp_path):
    images, ids = openi
    missing = "CXR3245_IM-1537-1001"  # a report's first image, deleted: must become a missing_image reject
    moved = tmp_path / "moved.png"
    (images / f"{missing}.png").rename(moved)
    try:
        meta = convert_openi(XML, images, tmp_path / "out", opts=ConvertOptions(image_size=32), workers=2,
                             samples_per_shard=8, progress=False)
    finally:
        moved.rename(images / f"{missing}.png")
    out = tmp_path / "out"
    total = sum(s["num_samples"] for s in meta["splits"].values())
    assert meta["params"]["counts"]["reports"] == 46
    assert meta["rejects_by_reason"] == {"no_image": 4, "missing_image": 1}
    assert total == 46 - 4 - 1 == 41
    assert meta["params"]["counts"]["images_not_used"] == len(ids) - 42
    with open(out / "rejects.csv") as fh:
        rows = list(csv.DictReader(fh))
    no_image = {r["item_id"] for r in rows if r["reason"].startswith("no_image")}
    assert no_image == {"CXR1185", "CXR2309", "CXR2800", "CXR873"}
    samples = {}
    for split in ("train", "val", "test"):
        samples.update(read_shards(out, split))
    assert len(samples) == 41 and "CXR3245" not in samples
    s = samples["CXR1851"]
    assert s["meta"]["labels"]["No Finding"] == 1 and s["meta"]["image_id"].endswith("-1001")
    assert samples["CXR1021"]["text"].startswith("IMPRESSION:")  # empty FINDINGS: impression only
    assert samples["CXR1007"]["text"].startswith("FINDINGS: Trachea is midline.")
    assert samples["CXR454"]["meta"]["labels"]["Cardiomegaly"] == 1
    assert np.asarray(Image.open(io.BytesIO(s["image"]))).shape == (32, 32)


def test_all_views_split_by_report_and_tgz(openi, tmp_path):
    images, ids = openi
    tgz = tmp_path / "NLMCXR_reports.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(XML, arcname="ecgen-radiology")
    items, rejects, counts = plan(tgz, images, views="all", val_frac=0.2, test_frac=0.2)
    assert sum(len(v) for v in items.values()) == len(ids)
    split_of = {}
    for split, its in items.items():
        for it in its:
            assert split_of.setdefault(it[2], split) == split  # every image of a report in one split
    assert all(len(items[s]) > 0 for s in items)
    items2, _, _ = plan(XML, images, views="all", val_frac=0.2, test_frac=0.2)
    assert items2 == items  # folder and tgz give the same plan
    assert len({it[1] for its in items.values() for it in its}) == len(ids)  # unique keys


def test_openi_missing_sample_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--images"):
        plan(tmp_path, tmp_path / "nope")


def test_sample_has_both_classes_for_every_mentioned_label(openi, tmp_path):
    """The real sample: every label some report names has positives and negatives once converted, so its AUROC
    is defined; the evaluation policy leaves only uncoded reports out."""
    images, _ = openi
    meta = convert_openi(XML, images, tmp_path / "out", opts=ConvertOptions(image_size=32), workers=1,
                         progress=False)
    assert meta["eval_policy"] == {"uncertain": "ignore", "missing": "mask"}
    totals = {n: {"1": 0, "0": 0, "null": 0} for n in LABELS}
    for split in meta["label_counts"].values():
        for name, c in split.items():
            for k in totals[name]:
                totals[name][k] += c[k]
    mentioned = [n for n in LABELS if totals[n]["1"] > 0]
    assert {"No Finding", "Cardiomegaly"} <= set(mentioned)
    for name in mentioned:
        assert totals[name]["0"] > 0, name
