"""The observation testbed (vkd_dist/data/testbed.py): the labeller's error rates against the truth match the
configured ones, reports of one true state differ, labels per split and role; and the default synthetic corpus is
the one it was before the testbed existed."""

import hashlib
import json
import re
from dataclasses import asdict

import numpy as np
import pytest

from conftest import read_shards
from vkd_dist.data.synthetic import Finding, SyntheticParams, build_synthetic, make_record

pytest.importorskip("medspacy", reason="the testbed's labels are the report labeller's (the `labeller` extra)")

from vkd_dist.data.testbed import ObservationParams, build_testbed, radiologist  # noqa: E402


def test_the_default_corpus_is_unchanged():
    """Images, reports and labels of the default generator, digested (codec-independent): the README's default-run
    figures were measured on this corpus."""
    h = hashlib.sha256()
    params = asdict(SyntheticParams(image_size=64))
    for split in ("train", "val", "test"):
        for i in range(12):
            r = make_record((split, i, params))
            h.update(r.image.tobytes())
            h.update(r.text.encode())
            h.update(json.dumps(r.meta(), sort_keys=True).encode())
    assert h.hexdigest() == "a297a65351a527100349724305ee40f3380115b80f0e3782ccffcfc01bec2113"


def test_the_default_corpus_json_has_no_testbed_keys(tmp_path):
    meta = build_synthetic(tmp_path, 6, 2, 2, image_size=16, workers=1, progress=False)
    assert not {"testbed", "labeller_vs_truth"} & set(meta["params"])


def test_rates_printed_at_conversion_match_the_configured_ones(tmp_path, capsys):
    from vkd_dist.data_cli import main as vkd_data

    rates = {"miss": 0.2, "false": 0.05, "hedge": 0.3}
    assert vkd_data(["synthetic", "--out", str(tmp_path), "--num-train", "4", "--num-val", "2", "--num-test", "300",
                     "--image-size", "16", "--testbed", "--miss-rate", "0.2", "--false-rate", "0.05",
                     "--hedge-rate", "0.3", "--workers", "2", "--samples-per-shard", "100"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("labeller vs truth on test"))
    measured = {k: float(re.search(rf"{name} ([0-9.]+)", line).group(1))
                for k, name in (("miss", "missed"), ("false", "false"), ("hedge", "hedged"))}
    # 300 studies: ~500 present findings (sd of the missed rate ~0.018), ~3,400 absent (~0.004), ~900 mentions
    # (~0.015); the labeller's own errors come on top
    assert measured["miss"] == pytest.approx(rates["miss"], abs=0.05)
    assert measured["false"] == pytest.approx(rates["false"], abs=0.015)
    assert measured["hedge"] == pytest.approx(rates["hedge"], abs=0.05)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["params"]["testbed"]["miss_rate"] == 0.2 and meta["params"]["labeller_vs_truth"]["present"] > 300


def test_reports_of_the_same_true_state_differ():
    present = {"Pleural Effusion": Finding("Pleural Effusion", True, 0.9, "left", "lower"),
               "Cardiomegaly": Finding("Cardiomegaly", True, 0.8, "right", "mid")}
    reports = {" ".join(radiologist(np.random.default_rng(i), present, ObservationParams())[0]) for i in range(20)}
    assert len(reports) >= 15  # phrasing, synonyms, negations, order of mention, errors
    written = [radiologist(np.random.default_rng(i), present, ObservationParams(miss_rate=0.5, hedge_rate=0.5))[2]
               for i in range(40)]
    assert {w["Pleural Effusion"] for w in written} >= {1, -1, None}  # stated, hedged, missed


def test_labels_are_the_truth_in_val_and_test_and_the_labellers_reading_in_train(tmp_path):
    small = dict(image_size=16, samples_per_shard=20, workers=1, progress=False, seed=3)
    meta = build_testbed(tmp_path, 40, 10, 10, testbed=ObservationParams(gold_fraction=0.25), label_fraction=0.5,
                         **small)
    assert meta["splits"]["train"]["num_unlabelled"] == 20 and meta["source"] == "synthetic"
    for split in ("val", "test"):
        for sample in read_shards(tmp_path, split).values():
            m = sample["meta"]
            assert m["labels"] == m["true_labels"] and set(m["labels"].values()) <= {0, 1}
    roles = {"truth": 0, "read": 0, "none": 0}
    for sample in read_shards(tmp_path, "train").values():
        m = sample["meta"]
        if m.get("labelled", True) is False:
            roles["none"] += 1
            assert set(m["labels"].values()) == {None}
        elif m["labels"] == m["true_labels"] and m["labels"] != m["report_labels"]:
            roles["truth"] += 1
        else:
            roles["read"] += 1
            assert m["labels"] == m["report_labels"]
    # gold: 5 of the 20 labelled studies; a gold study whose reading equals the truth counts as read here
    assert roles["none"] == 20 and 1 <= roles["truth"] <= 5 and roles["truth"] + roles["read"] == 20


def test_testbed_rates_are_checked():
    with pytest.raises(ValueError, match=r"testbed miss_rate 0.6 must be in \[0, 0.5\]"):
        ObservationParams(miss_rate=0.6)


def test_a_run_builds_the_testbed_its_config_asks_for(tmp_path, capsys):
    from vkd_dist.configure import load_config
    from vkd_dist.prepare import ensure_dataset

    cfg = load_config(None, [f"data.path={tmp_path / 'tb'}", "data.build_synthetic=true", "data.synthetic.testbed=true",
                             "data.synthetic.num_train=6", "data.synthetic.num_val=3", "data.synthetic.num_test=3",
                             "data.synthetic.image_size=16", "data.synthetic.miss_rate=0.3",
                             f"run_dir={tmp_path / 'run'}"])
    info = ensure_dataset(cfg)
    assert info.meta["params"]["testbed"]["miss_rate"] == 0.3 and "labeller_vs_truth" in info.meta["params"]
    out = capsys.readouterr().out
    assert "building the testbed at" in out and "labeller vs truth on test" in out
