import hashlib
import io
import json
import re
from dataclasses import asdict

import numpy as np
import webdataset as wds
from PIL import Image

from vkd_dist.data.schema import read_dataset
from vkd_dist.data.synthetic import NEGATION, POSITIVE, SyntheticParams, build_synthetic, make_record
from vkd_dist.labels import LABELS


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.tar"))}


def test_generator_is_deterministic_byte_for_byte(tmp_path):
    small = dict(image_size=48, samples_per_shard=16, progress=False)
    a = build_synthetic(tmp_path / "a", 40, 10, 10, seed=3, workers=2, **small)
    b = build_synthetic(tmp_path / "b", 40, 10, 10, seed=3, workers=1, **small)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert a["splits"] == b["splits"]
    c = build_synthetic(tmp_path / "c", 40, 10, 10, seed=4, workers=1, **small)
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert c["params"]["seed"] == 4


def test_dataset_json_and_sample_schema(tiny_data):
    info = read_dataset(tiny_data)
    meta = info.meta
    assert meta["labels"] == list(LABELS)
    assert [s["num_samples"] for s in meta["splits"]["train"]["shards"]] == [32, 32, 32, 4]
    assert meta["splits"]["train"]["num_samples"] == 100
    assert meta["splits"]["val"]["num_samples"] == 40 and meta["splits"]["test"]["num_samples"] == 60
    assert set(meta["prevalence"]["train"]) == set(LABELS)
    assert meta["rejects"] == 0 and (tiny_data / "rejects.csv").read_text().startswith("split,item_id")
    assert meta["params"]["image_size"] == 64 and meta["params"]["num_train"] == 100
    for sample in wds.WebDataset(info.shards("val"), shardshuffle=False, empty_check=False):
        assert set(sample) >= {"__key__", "jpg", "txt", "json"}
        img = Image.open(io.BytesIO(sample["jpg"]))
        assert img.mode == "L" and img.size == (64, 64)
        m = json.loads(sample["json"])
        assert set(m["labels"]) == set(LABELS)
        assert all(v in (1, 0, -1, None) for v in m["labels"].values())
        assert {"patient_id", "study_id", "view", "source"} <= set(m) and m["source"] == "synthetic"


def test_rerun_keeps_finished_shards_and_param_change_rebuilds(tmp_path):
    build_synthetic(tmp_path, 40, 8, 8, image_size=32, samples_per_shard=16, workers=1, progress=False)
    shard = tmp_path / "train" / "shard-000000.tar"
    before = shard.stat().st_mtime_ns
    build_synthetic(tmp_path, 40, 8, 8, image_size=32, samples_per_shard=16, workers=1, progress=False)
    assert shard.stat().st_mtime_ns == before
    build_synthetic(tmp_path, 40, 8, 8, image_size=32, noise=2.0, samples_per_shard=16, workers=1, progress=False)
    assert shard.stat().st_mtime_ns != before
    assert read_dataset(tmp_path).meta["params"]["noise"] == 2.0


def _records(n, **kw):
    params = asdict(SyntheticParams(image_size=64, **kw))
    return [make_record(("train", i, params)) for i in range(n)]


def test_labels_follow_the_report_text():
    for rec in _records(300):
        text = rec.text
        assert "FINDINGS:" in text and "IMPRESSION:" in text
        sentences = set(re.split(r"(?<=\.)\s+|\n", text))
        for name in LABELS[1:]:
            value = rec.labels[name]
            negated = any(s in sentences for s in NEGATION[name])
            if value == 0:
                assert negated, (name, text)
            else:
                assert not negated, (name, value, text)  # a negated finding is never positive
            if value == 1 and name != "Support Devices":
                stems = {t.split("{")[0].strip().lower()[:12] for t in POSITIVE[name]}
                assert any(s and s in text.lower() for s in stems) or name.split()[-1].lower() in text.lower()
        pathologic = [n for n in LABELS[1:-1] if rec.labels[n] in (1, -1)]
        assert (rec.labels["No Finding"] == 1) == (not pathologic)


def test_reports_carry_deid_spans_and_hedges():
    texts = [r.text for r in _records(200)]
    assert all("___" in t for t in texts)
    hedges = sum(("cannot be excluded" in t or "Possible" in t or "Cannot exclude" in t) for t in texts)
    assert hedges > 10


def test_finding_visibility_scales_with_contrast():
    """Pleural effusion brightens the lung base; the effect grows with lesion_contrast."""
    def base_diff(contrast):
        recs = _records(250, lesion_contrast=contrast, label_noise=0.0)
        def base(r):
            return r.image[40:52, 8:56].mean()
        eff = [base(r) for r in recs if r.labels["Pleural Effusion"] == 1]
        no = [base(r) for r in recs if r.labels["Pleural Effusion"] in (0, None)]
        return np.mean(eff) - np.mean(no)
    weak, strong = base_diff(0.3), base_diff(2.0)
    assert strong > weak and strong > 3.0


def test_label_fraction_drops_labels_of_training_studies_only_nested_and_seeded(tmp_path):
    from conftest import read_shards

    small = dict(image_size=32, samples_per_shard=16, workers=1, progress=False, seed=2)
    full = build_synthetic(tmp_path / "full", 40, 8, 8, **small)
    tenth = build_synthetic(tmp_path / "f0.1", 40, 8, 8, label_fraction=0.1, **small)
    quarter = build_synthetic(tmp_path / "f0.25", 40, 8, 8, label_fraction=0.25, **small)
    train = tenth["splits"]["train"]
    assert (train["num_samples"], train["num_labelled"], train["num_unlabelled"]) == (40, 4, 36)
    assert full["splits"]["train"]["num_unlabelled"] == 0 and quarter["splits"]["train"]["num_labelled"] == 10
    assert tenth["params"]["label_fraction"] == 0.1
    # Validation and test are the fully labelled corpus's, byte for byte.
    digests = {name: _digest(tmp_path / name) for name in ("full", "f0.1")}
    for split in ("val", "test"):
        assert {k: v for k, v in digests["full"].items() if k.startswith(split)} == \
               {k: v for k, v in digests["f0.1"].items() if k.startswith(split)}
    a, b, c = (read_shards(tmp_path / n, "train") for n in ("full", "f0.1", "f0.25"))
    labelled = {n: {k for k, s in d.items() if s["meta"].get("labelled", True)} for n, d in (("f0.1", b), ("f0.25", c))}
    assert labelled["f0.1"] < labelled["f0.25"]  # nested: a smaller fraction's labelled studies are a subset
    for key, sample in b.items():
        assert sample["text"] == a[key]["text"] and sample["image"] == a[key]["image"]  # same report and image
        if key in labelled["f0.1"]:
            assert sample["meta"]["labels"] == a[key]["meta"]["labels"]
        else:  # no labels at all, marked as such
            assert sample["meta"]["labelled"] is False and set(sample["meta"]["labels"].values()) == {None}
    # Label counts describe the labelled studies only: their blanks, never the unlabelled studies'.
    counts = tenth["label_counts"]["train"]["Cardiomegaly"]
    assert sum(counts.values()) == 4
    again = build_synthetic(tmp_path / "again", 40, 8, 8, label_fraction=0.1, **small)
    assert _digest(tmp_path / "again") == digests["f0.1"] and again["splits"] == tenth["splits"]


def test_label_seed_draws_another_labelled_subset_of_the_same_studies(tmp_path):
    from conftest import read_shards

    small = dict(image_size=32, samples_per_shard=16, workers=1, progress=False, seed=2, label_fraction=0.25)
    base = build_synthetic(tmp_path / "base", 40, 8, 8, **small)
    build_synthetic(tmp_path / "same", 40, 8, 8, label_seed=2, **small)  # the corpus seed, said aloud
    other = build_synthetic(tmp_path / "other", 40, 8, 8, label_seed=5, **small)
    assert _digest(tmp_path / "same") == _digest(tmp_path / "base") and "label_seed" not in base["params"]
    assert other["params"]["label_seed"] == 5 and other["splits"]["train"]["num_labelled"] == 10
    a, b = read_shards(tmp_path / "base", "train"), read_shards(tmp_path / "other", "train")
    keep = {n: {k for k, s in d.items() if s["meta"].get("labelled", True)} for n, d in (("base", a), ("other", b))}
    assert len(keep["base"]) == len(keep["other"]) == 10 and keep["base"] != keep["other"]
    assert all(b[k]["image"] == a[k]["image"] and b[k]["text"] == a[k]["text"] for k in a)  # the same studies
    digests = {n: _digest(tmp_path / n) for n in ("base", "other")}
    assert {k: v for k, v in digests["base"].items() if not k.startswith("train")} == \
           {k: v for k, v in digests["other"].items() if not k.startswith("train")}


def test_label_fraction_is_checked(tmp_path, capsys):
    import pytest

    from vkd_dist.data_cli import main as vkd_data

    with pytest.raises(ValueError, match=r"label fraction 0.0 must be in \(0, 1\]"):
        build_synthetic(tmp_path, 10, 2, 2, label_fraction=0.0, progress=False)
    assert vkd_data(["synthetic", "--out", str(tmp_path / "x"), "--num-train", "10", "--label-fraction", "1.5"]) == 2
    assert "label fraction 1.5 must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "x" / "dataset.json").exists()
