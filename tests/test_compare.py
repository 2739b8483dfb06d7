"""vkd-compare with several seeds per arm, on synthetic predictions (no training): the headline interval and p
count the seeds as well as the test patients and are printed first; the patient bootstrap alone is kept and
named as test-set noise only; runs pair by their train.seed; a bootstrap p below its resolution is a bound."""

import json

import numpy as np
import pytest

import vkd_dist.compare as compare_module
from vkd_dist.compare import main as compare_main
from vkd_dist.data.schema import SCHEMA_VERSION
from vkd_dist.metrics import Predictions

LABELS = ["L0", "L1"]


@pytest.fixture
def arms(tmp_path, monkeypatch):
    """Runs a0..a4 (seeds 0-4) and b0..b4 whose per-seed deltas disagree in sign: seed s of a scores
    signal_a[s] x y + N(0, 1), b always 1.0 x y + N(0, 1), on 2,000 test patients. The data set's dataset.json
    is real; _predictions and _seeds are stand-ins for loading the runs."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "labels": LABELS,
                                                   "splits": {"test": {}}}))
    rng = np.random.default_rng(1)
    n = 2000
    y = (rng.random((n, 2)) < 0.3).astype(np.float32)
    keys, patients = [f"k{i:04d}" for i in range(n)], [f"p{i:04d}" for i in range(n)]
    preds, seeds = {}, {}
    for s, signal in enumerate([1.6, 0.8, 1.5, 0.85, 1.4]):
        for arm, sig in (("a", signal), ("b", 1.0)):
            preds[f"{arm}{s}"] = Predictions((sig * y + rng.normal(size=y.shape)).astype(np.float32), y,
                                             np.ones_like(y, dtype=bool), keys, patients)
            seeds[f"{arm}{s}"] = s
    monkeypatch.setattr(compare_module, "_predictions", lambda run, *_: preds[run])
    monkeypatch.setattr(compare_module, "_seeds", lambda runs: [seeds[r] for r in runs])
    return data


def _compare(data, out, a, b, capsys, boot="999"):
    assert compare_main(["--a", *a, "--b", *b, "--data", str(data), "--bootstrap", boot, "--out", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def test_seeds_that_disagree_in_sign_leave_zero_in_the_headline(arms, tmp_path, capsys):
    a, b = [f"a{s}" for s in range(5)], [f"b{s}" for s in range(5)]
    r, printed = _compare(arms, tmp_path / "c.json", a, b, capsys)
    deltas = np.array(r["per_seed_delta"])
    assert (deltas > 0).sum() >= 2 and (deltas < 0).sum() >= 2  # the seeds disagree
    assert r["interval"] == "seeds and test patients" and r["seeds_paired"] and r["seeds_a"] == [0, 1, 2, 3, 4]
    lo, hi = r["ci"]
    assert lo < 0 < hi and r["p_value"] > 0.05 and not r["p_value_is_bound"]  # headline: undecided
    noise = r["test_noise_only"]
    assert 0 < noise["ci"][0] < r["delta_macro_auroc"] < noise["ci"][1]  # the models fixed: "a wins"
    assert noise["p_value"] == pytest.approx(2 / 1000) and noise["p_value_is_bound"]
    lines = printed.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("delta (a - b)"))
    assert f"95% CI [{lo:+.4f}, {hi:+.4f}]" in lines[head] and "over seeds and test patients (5 seeds paired" in \
        lines[head]  # the headline comes first, on the delta's line
    assert lines[head + 1].startswith("  test-set noise only (the trained models fixed): 95% CI [+")
    assert "p < 0.002" in lines[head + 1] and "none on the far side of 0" in lines[head + 1]
    assert any(line.startswith("  seeds only, paired t over the per-seed deltas") for line in lines)


def test_runs_pair_by_their_seed(arms, tmp_path, capsys):
    a, b = [f"a{s}" for s in range(5)], [f"b{s}" for s in range(5)]
    ref, _ = _compare(arms, tmp_path / "ref.json", a, b, capsys)
    shuffled, _ = _compare(arms, tmp_path / "shuffled.json", a, b[::-1], capsys)
    assert shuffled["b"] == b and shuffled["per_seed_delta"] == ref["per_seed_delta"] and shuffled["ci"] == ref["ci"]
    other, printed = _compare(arms, tmp_path / "other.json", a[:3], b[2:], capsys)  # seeds 0-2 against 2-4
    assert not other["seeds_paired"] and other["per_seed_delta"] is None and other["seed_t_interval"] is None
    assert other["seeds_b"] == [2, 3, 4] and other["interval"] == "seeds and test patients"
    assert "the arms' seeds differ ([0, 1, 2] / [2, 3, 4]): each arm's seed spread counted (Welch)" in printed


def test_one_seed_in_an_arm_gives_test_set_noise_only_and_says_so(arms, tmp_path, capsys):
    r, printed = _compare(arms, tmp_path / "c.json", ["a0", "a2"], ["b0"], capsys)
    assert r["interval"] == "test-set noise only" and r["ci"] == r["test_noise_only"]["ci"]
    assert r["seeds_a"] is None and r["p_value_is_bound"]  # a0, a2 beat b0 in every resample
    assert "p < 0.002  test-set noise only (one seed in b: training randomness not measured)" in printed


def test_identical_runs_in_both_arms_write_strict_json(arms, tmp_path, capsys):
    """No seed spread and no patient spread: the headline is the point, on a normal (infinite df) that the JSON
    writes as null rather than the non-standard Infinity."""
    out = tmp_path / "same.json"
    assert compare_main(["--a", "a0", "a1", "--b", "a0", "a1", "--data", str(arms), "--bootstrap", "50",
                         "--out", str(out)]) == 0
    assert "Infinity" not in out.read_text()
    r = json.loads(out.read_text())
    assert r["ci"] == [0, 0] and r["p_value"] == 1 and r["df"] is None and r["per_seed_delta"] == [0, 0]
    assert "normal: the seeds do not differ" in capsys.readouterr().out
