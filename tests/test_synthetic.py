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
