"""vkd_dist.stats: the hand-written weighted AUROC against sklearn's, the patient bootstrap's invariants, the CI
and paired-comparison wrappers against a by-hand pipeline and known answers, and calibration / operating
point helpers against hand computations."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from vkd_dist.stats import (
    auprc,
    auroc_ci,
    bootstrap_weights,
    expected_calibration_error,
    paired_delta,
    patient_index,
    reliability,
    seed_and_patient_interval,
    sensitivity_at_specificity,
    t_interval,
    weighted_auroc,
)


def _table(n, num_labels=3, signal=1.0, seed=0, prevalence=0.3):
    """probs/targets/mask [n, L]: scores shifted up by `signal` for positives, every entry unmasked."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, num_labels)) < prevalence).astype(np.float32)
    p = (signal * y + rng.normal(size=(n, num_labels))).astype(np.float32)
    return p, y, np.ones((n, num_labels), dtype=bool)


# ------------------------------------------------------------------------------------------ weighted AUROC

@pytest.mark.parametrize("decimals", [None, 1, 0])  # continuous, heavy ties, almost all tied
def test_weighted_auroc_matches_sklearn_sample_weight(decimals):
    rng = np.random.default_rng(0 if decimals is None else decimals + 1)
    for trial in range(25):
        n = int(rng.integers(5, 200))
        prevalence = [0.05, 0.3, 0.5, 0.8][trial % 4]  # > 0.5 takes the negatives-as-anchor branch
        y = rng.random(n) < prevalence
        y[:2] = [True, False]
        s = rng.random(n) if decimals is None else np.round(rng.random(n), decimals)
        w = rng.random((6, n)) * (rng.random((6, n)) < 0.7)  # zero weights included
        w[0] = rng.integers(0, 4, n)  # integer counts like the bootstrap's
        w[1, ~y] = 0.0  # no negative weight
        w[2, y] = 0.0  # no positive weight
        got = weighted_auroc(s, y, w)
        assert got.shape == (6,)
        for i in range(6):
            if w[i, y].sum() == 0 or w[i, ~y].sum() == 0:
                assert np.isnan(got[i])
            else:
                assert got[i] == pytest.approx(roc_auc_score(y, s, sample_weight=w[i]), abs=1e-12)


def test_weighted_auroc_with_unit_weights_is_roc_auc_score():
    rng = np.random.default_rng(3)
    y = rng.random(5000) < 0.2
    for s in (rng.normal(size=5000) + y, np.round(rng.random(5000), 2), (rng.random(5000) < 0.5) * 1.0):
        got = weighted_auroc(s, y, np.ones((2, 5000)))
        assert np.all(np.abs(got - roc_auc_score(y, s)) <= 1e-12)
    assert weighted_auroc(s, y, np.ones(5000)).shape == (1,)  # one [n] row
    assert np.isnan(weighted_auroc(s, np.zeros(5000), np.ones((1, 5000)))).all()  # no positives at all


def test_weighted_auroc_known_values():
    # positives 0.8, 0.4; negatives 0.4, 0.1: pairs (0.8 > 0.4, 0.8 > 0.1, 0.4 = 0.4 -> 1/2, 0.4 > 0.1) = 3.5 / 4
    s, y = np.array([0.8, 0.4, 0.4, 0.1]), np.array([1, 1, 0, 0])
    assert weighted_auroc(s, y, np.ones((1, 4)))[0] == 0.875
    assert weighted_auroc(s, y, np.array([[0, 1, 1, 0]]))[0] == 0.5  # only the tie left
    assert weighted_auroc(s, y, np.array([[1, 0, 3, 0]]))[0] == 1.0


# -------------------------------------------------------------------------------------------- resampling

def test_patient_index():
    idx, p = patient_index(None, 4)
    assert p == 4 and idx.tolist() == [0, 1, 2, 3]
    idx, p = patient_index(["b", "a", "b", "c"], 4)
    assert p == 3 and idx.tolist() == [1, 0, 1, 2]
    with pytest.raises(ValueError):
        patient_index(["a"], 2)


def test_bootstrap_weights_one_sample_per_patient():
    idx, p = patient_index(None, 50)
    rows = np.concatenate(list(bootstrap_weights(idx, p, 300, seed=5, chunk=64)))
    assert rows.shape == (300, 50) and rows.dtype == np.float32
    assert np.all(rows.sum(axis=1) == 50)  # 50 draws of 50 patients
    assert np.all(rows == np.round(rows)) and rows.min() >= 0
    assert abs(rows.mean() - 1.0) < 1e-6 and 0.9 < rows.var() < 1.1  # Binomial(50, 1/50): mean 1, var ~0.98


def test_bootstrap_weights_independent_of_chunk_and_deterministic():
    idx, p = patient_index([f"p{i % 37}" for i in range(101)], 101)
    ref = np.concatenate(list(bootstrap_weights(idx, p, 130, seed=7, chunk=64)))
    for chunk in (1, 7, 130, 1000):
        chunks = list(bootstrap_weights(idx, p, 130, seed=7, chunk=chunk))
        assert all(c.shape[0] <= chunk for c in chunks)
        assert np.array_equal(np.concatenate(chunks), ref)
    assert not np.array_equal(np.concatenate(list(bootstrap_weights(idx, p, 130, seed=8))), ref)


def test_bootstrap_weights_follow_patients():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 40, 300).astype(str)
    idx, p = patient_index(ids, 300)
    for w in bootstrap_weights(idx, p, 200, seed=1, chunk=50):
        for patient in range(p):  # all of a patient's samples share one weight
            cols = w[:, idx == patient]
            assert np.all(cols == cols[:, :1])
        first = np.unique(idx, return_index=True)[1]
        assert np.all(w[:, first].sum(axis=1) == p)  # per-patient counts sum to the P draws


# ---------------------------------------------------------------------------------------------- auroc_ci

def _by_hand(probs, targets, mask, label_idx, patient_ids, n_boot, seed, level):
    """The documented procedure spelled out: weight rows, per-label AUROC per row, percentile intervals."""
    idx, p = patient_index(patient_ids, probs.shape[0])
    w = np.concatenate(list(bootstrap_weights(idx, p, n_boot, seed)))
    rows = np.stack([weighted_auroc(probs[mask[:, j], j], targets[mask[:, j], j], w[:, mask[:, j]])
                     for j in range(probs.shape[1])], axis=1)
    q = [(1 - level) / 2, 1 - (1 - level) / 2]
    per = [tuple(np.quantile(r[np.isfinite(r)], q)) for r in rows.T]
    macro_rows = rows[:, label_idx][np.isfinite(rows[:, label_idx]).all(axis=1)].mean(axis=1)
    return per, tuple(np.quantile(macro_rows, q)), macro_rows.size


def test_auroc_ci_equals_the_procedure_by_hand():
    probs, targets, mask = _table(300, num_labels=4, signal=0.8, seed=1)
    mask[::3, 1] = False
    targets[:, 3] = 0.0
    targets[[10, 50], 3] = 1.0  # two positive patients: both left out of ~13 % of the resamples
    ids = [f"p{i // 3}" for i in range(300)]  # 3 samples per patient
    got = auroc_ci(probs, targets, mask, [0, 1, 3], patient_ids=ids, n_boot=200, seed=4, level=0.9)
    per, macro, valid = _by_hand(probs, targets, mask, [0, 1, 3], ids, 200, 4, 0.9)
    assert np.allclose(got["per_label"], per, atol=1e-12, rtol=0)
    assert np.allclose(got["macro"], macro, atol=1e-12, rtol=0)
    assert got["valid_macro_resamples"] == valid and 140 < valid < 195
    assert {k: got[k] for k in ("resamples", "seed", "level", "unit", "num_patients")} == \
        {"resamples": 200, "seed": 4, "level": 0.9, "unit": "patient", "num_patients": 100}


def test_auroc_ci_separable_is_one():
    probs, targets, mask = _table(200, signal=100.0)
    got = auroc_ci(probs, targets, mask, [0, 1, 2], n_boot=100)
    assert got["per_label"] == [(1.0, 1.0)] * 3 and got["macro"] == (1.0, 1.0)
    assert got["valid_macro_resamples"] == 100 and got["num_patients"] == 200


def test_auroc_ci_random_scores_contains_half_and_shrinks_like_sqrt_n():
    widths = []
    for n in (400, 3600):
        probs, targets, mask = _table(n, num_labels=2, signal=0.0, seed=n)
        got = auroc_ci(probs, targets, mask, [0, 1], n_boot=400, seed=0)
        lo, hi = got["macro"]
        assert lo < 0.5 < hi
        assert all(lo < 0.5 < hi for lo, hi in got["per_label"])
        widths.append(hi - lo)
    assert 2.0 < widths[0] / widths[1] < 4.5  # sqrt(3600 / 400) = 3


def test_auroc_ci_deterministic_for_a_seed():
    probs, targets, mask = _table(150, signal=0.5)
    a = auroc_ci(probs, targets, mask, [0, 1, 2], n_boot=100, seed=3)
    assert a == auroc_ci(probs, targets, mask, [0, 1, 2], n_boot=100, seed=3)
    assert a["macro"] != auroc_ci(probs, targets, mask, [0, 1, 2], n_boot=100, seed=4)["macro"]


def test_auroc_ci_one_class_label_is_none():
    probs, targets, mask = _table(120, signal=0.5)
    targets[:, 1] = 0.0
    got = auroc_ci(probs, targets, mask, [0, 1, 2], n_boot=50)
    assert got["per_label"][1] is None and got["per_label"][0] is not None
    assert got["macro"] is None and got["valid_macro_resamples"] == 0
    got = auroc_ci(probs, targets, mask, [0, 2], n_boot=50)  # the macro without it is defined
    assert got["macro"] is not None and got["valid_macro_resamples"] == 50
    mask[targets[:, 0] == 1, 0] = False  # only negatives left unmasked
    assert auroc_ci(probs, targets, mask, [2], n_boot=50)["per_label"][0] is None


def test_auroc_ci_ignores_masked_entries():
    probs, targets, mask = _table(150, signal=0.5)
    mask[::2, 0] = False
    a = auroc_ci(probs, targets, mask, [0, 1], n_boot=100)
    probs[::2, 0], targets[::2, 0] = 99.0, 1.0 - targets[::2, 0]
    assert auroc_ci(probs, targets, mask, [0, 1], n_boot=100) == a


def test_auroc_ci_resamples_patients_not_samples():
    probs, targets, mask = _table(200, signal=0.7, seed=2)
    ids = [f"p{i:03d}" for i in range(200)]
    base = auroc_ci(probs, targets, mask, [0, 1, 2], patient_ids=ids, n_boot=300, seed=1)
    # five copies of every sample under its patient: the same draws weight each copy alike, so AUROC per
    # resample is unchanged (numerator and denominator both scale by 25, exactly in floating point)
    rep = lambda a: np.repeat(a, 5, axis=0)  # noqa: E731
    dup = auroc_ci(rep(probs), rep(targets), rep(mask), [0, 1, 2], patient_ids=np.repeat(ids, 5), n_boot=300,
                   seed=1)
    assert dup["per_label"] == base["per_label"] and dup["macro"] == base["macro"]
    assert dup["num_patients"] == 200
    # the copies as independent patients: 5x the effective sample size, a ~sqrt(5) narrower (overconfident) CI
    naive = auroc_ci(rep(probs), rep(targets), rep(mask), [0, 1, 2], n_boot=300, seed=1)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert naive["num_patients"] == 1000
    assert 1.5 < width(base["macro"]) / width(naive["macro"]) < 3.5


# ------------------------------------------------------------------------------------------ paired_delta

def test_paired_delta_identical_arms():
    probs, targets, mask = _table(150, signal=0.5)
    other = _table(150, signal=0.5, seed=9)[0]
    got = paired_delta([probs, other], [probs, other], targets, mask, [0, 1, 2], n_boot=200)
    assert got["delta"] == 0.0 and got["ci"] == (0.0, 0.0) and got["p_value"] == 1.0
    assert got["valid_resamples"] == 200 and got["resamples"] == 200
    assert got["per_seed_delta"] == [0.0, 0.0] and got["macro_a"] == got["macro_b"]


def test_paired_delta_better_arm():
    rng = np.random.default_rng(0)
    _, targets, mask = _table(300, seed=5)
    good = [targets + 0.5 * rng.normal(size=targets.shape) for _ in range(2)]
    noise = [rng.normal(size=targets.shape) for _ in range(2)]
    got = paired_delta(good, noise, targets, mask, [0, 1, 2], n_boot=300, seed=2)
    macro = lambda p: np.mean([roc_auc_score(targets[:, j], p[:, j]) for j in range(3)])  # noqa: E731
    assert got["macro_a"] == pytest.approx([macro(p) for p in good], abs=1e-12)
    assert got["macro_b"] == pytest.approx([macro(p) for p in noise], abs=1e-12)
    assert got["delta"] == pytest.approx(np.mean(got["macro_a"]) - np.mean(got["macro_b"]), abs=1e-12)
    assert got["per_seed_delta"] == pytest.approx([a - b for a, b in zip(got["macro_a"], got["macro_b"])])
    lo, hi = got["ci"]
    assert 0 < lo < got["delta"] < hi and got["interval"] == "seeds and test patients"
    fixed = got["test_noise_only"]
    assert fixed["p_value"] == pytest.approx(2 / 301)  # no resample at or below 0: the +1 floor, a bound
    assert fixed["p_value_is_bound"] and not got["p_value_is_bound"]
    assert 0 < fixed["ci"][0] < got["delta"] < fixed["ci"][1]
    reverse = paired_delta(noise, good, targets, mask, [0, 1, 2], n_boot=300, seed=2)
    assert reverse["ci"] == pytest.approx((-hi, -lo), abs=1e-12)


def test_paired_delta_is_paired_by_hand():
    """One seed per arm: d per resample is the difference of the two macros on the same weight row."""
    probs_a, targets, mask = _table(120, signal=0.6, seed=1)
    probs_b = probs_a + np.random.default_rng(1).normal(size=probs_a.shape).astype(np.float32)
    ids = [f"p{i // 2}" for i in range(120)]
    got = paired_delta([probs_a], [probs_b], targets, mask, [0, 2], patient_ids=ids, n_boot=150, seed=3)
    idx, p = patient_index(ids, 120)
    w = np.concatenate(list(bootstrap_weights(idx, p, 150, seed=3)))
    macro = lambda pr: np.mean([weighted_auroc(pr[:, j], targets[:, j], w) for j in (0, 2)], axis=0)  # noqa
    d = macro(probs_a) - macro(probs_b)
    assert got["ci"] == pytest.approx(tuple(np.quantile(d, [0.025, 0.975])), abs=1e-12)
    below, above = (d <= 0).sum(), (d >= 0).sum()
    assert got["p_value"] == pytest.approx(min(1.0, 2 * min(below + 1, above + 1) / 151))
    assert min(below, above) > 0 and not got["p_value_is_bound"]  # resamples on both sides: an estimate
    assert got["interval"] == "test-set noise only" and got["test_noise_only"]["ci"] == got["ci"]  # one seed


def test_paired_delta_unequal_seeds_and_undefined():
    probs, targets, mask = _table(100, signal=0.5)
    got = paired_delta([probs, probs * 2], [probs], targets, mask, [0, 1], n_boot=50)
    assert got["per_seed_delta"] is None and len(got["macro_a"]) == 2 and len(got["macro_b"]) == 1
    assert not got["seeds_paired"] and got["interval"] == "test-set noise only"  # b's one seed: no seed spread
    with pytest.raises(ValueError, match="seeds_paired with 2 seeds in a and 1 in b"):
        paired_delta([probs, probs * 2], [probs], targets, mask, [0, 1], n_boot=50, seeds_paired=True)
    targets[:, 1] = 1.0
    got = paired_delta([probs], [probs], targets, mask, [0, 1], n_boot=50)
    assert got["delta"] is None and got["ci"] is None and got["valid_resamples"] == 0


# ------------------------------------------------------------------------------- seeds and patients together

def _arms(signal_a, signal_b, n=400, num_labels=2, seed=0, ids=None):
    """Per seed of each arm a [n, L] score table: scores = signal x y + N(0, 1), so seed s of an arm scores an
    AUROC near Phi(signal[s] / sqrt(2)); targets and mask shared."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, num_labels)) < 0.3).astype(np.float32)
    arm = lambda signals: [s * y + rng.normal(size=y.shape) for s in signals]  # noqa: E731
    return arm(signal_a), arm(signal_b), y, np.ones_like(y, dtype=bool)


def _hand_macro(p, targets, labels, w=None):
    return np.mean([roc_auc_score(targets[:, j], p[:, j], sample_weight=w) for j in labels])


def test_seed_and_patient_headline_by_hand_with_sklearn():
    """The headline, spelled out: per-seed macros from roc_auc_score, the patient bootstrap's variance of the
    seed-averaged delta from bootstrap_weights and roc_auc_score's sample weights, then
    delta +- t(S - 1) sqrt(var(per-seed deltas) / S + patient variance)."""
    from scipy.stats import t

    a, b, y, mask = _arms([1.2, 0.7, 1.0], [0.9, 0.8, 0.6], n=120, seed=3)
    ids = [f"p{i // 2}" for i in range(120)]
    got = paired_delta(a, b, y, mask, [0, 1], patient_ids=ids, n_boot=60, seed=5)
    per_seed = np.array([_hand_macro(pa, y, [0, 1]) - _hand_macro(pb, y, [0, 1]) for pa, pb in zip(a, b)])
    assert got["per_seed_delta"] == pytest.approx(per_seed.tolist(), abs=1e-12) and got["seeds_paired"]
    idx, num = patient_index(ids, 120)
    rows = np.concatenate(list(bootstrap_weights(idx, num, 60, seed=5)))
    d = np.array([np.mean([_hand_macro(p, y, [0, 1], w) for p in a]) - np.mean([_hand_macro(p, y, [0, 1], w)
                                                                                 for p in b]) for w in rows])
    seed_var, patient_var = per_seed.var(ddof=1) / 3, d.var(ddof=1)
    df = 2  # the seeds' df: S - 1
    half = t.ppf(0.975, df) * np.sqrt(seed_var + patient_var)
    assert got["delta"] == pytest.approx(per_seed.mean(), abs=1e-12)
    assert got["ci"] == pytest.approx((per_seed.mean() - half, per_seed.mean() + half), abs=1e-10)
    assert got["df"] == pytest.approx(df) and got["interval"] == "seeds and test patients"
    assert got["p_value"] == pytest.approx(2 * t.sf(abs(per_seed.mean()) / np.sqrt(seed_var + patient_var), df))
    assert got["test_noise_only"]["ci"] == pytest.approx(tuple(np.quantile(d, [0.025, 0.975])), abs=1e-12)
    seeds_only = got["seed_t_interval"]  # the paired t over seeds, against scipy's one-sample t-test
    from scipy.stats import ttest_1samp

    ref = ttest_1samp(per_seed, 0.0)
    assert seeds_only["p_value"] == pytest.approx(ref.pvalue) and seeds_only["df"] == 2
    assert seeds_only["ci"] == pytest.approx(tuple(ref.confidence_interval(0.95)))

    # seeds that differ between the arms: each arm's spread, Welch
    un = paired_delta(a, b[:2], y, mask, [0, 1], patient_ids=ids, n_boot=60, seed=5, seeds_paired=False)
    ma, mb = np.array(un["macro_a"]), np.array(un["macro_b"])
    va, vb = ma.var(ddof=1) / 3, mb.var(ddof=1) / 2
    pv = un["test_noise_only"]["se"] ** 2
    assert un["per_seed_delta"] is None and un["seed_t_interval"] is None and not un["seeds_paired"]
    assert un["df"] == pytest.approx((va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 1))  # Welch's
    assert un["ci"][1] - un["ci"][0] == pytest.approx(2 * t.ppf(0.975, un["df"]) * np.sqrt(va + vb + pv))


def test_seeds_that_disagree_in_sign_leave_zero_in_the_headline():
    """Two arms whose per-seed deltas disagree in sign: the test set is large enough that the patient bootstrap
    alone (the models fixed) calls a winner, while the interval over seeds and patients holds 0."""
    a, b, y, mask = _arms([1.6, 0.8, 1.5, 0.85, 1.4], [1.0] * 5, n=2000, seed=1)
    got = paired_delta(a, b, y, mask, [0, 1], n_boot=200, seed=0)
    per_seed = np.array(got["per_seed_delta"])
    assert (per_seed > 0).sum() >= 2 and (per_seed < 0).sum() >= 2
    noise_lo, noise_hi = got["test_noise_only"]["ci"]
    assert 0 < noise_lo < got["delta"] < noise_hi  # test-set noise only: "a wins"
    assert got["test_noise_only"]["p_value_is_bound"]
    lo, hi = got["ci"]
    assert lo < 0 < hi and got["p_value"] > 0.05  # seeds and patients: undecided
    assert got["seed_t_interval"]["ci"][0] < 0 < got["seed_t_interval"]["ci"][1]


@pytest.mark.parametrize("seed_sd", [0.5, 0.0])
def test_coverage_of_the_headline_interval(seed_sd):
    """Simulated studies with a known truth: per seed a signal drawn around the arm's (seed_sd), per arm a test
    -set difficulty its seeds share, so both noises move the delta. Each model's expected AUROC is
    Phi(signal / sqrt(2 sigma^2)), and over seeds E Phi = Phi(mu / sqrt(2 sigma^2 + seed_sd^2)). The headline
    interval covers the true delta at its nominal 95 %; the test-set-noise-only one misses it when seeds vary,
    and the seeds-only t-interval when they do not (it misses the test set the seeds share)."""
    from scipy.stats import norm

    trials, n, seeds = 120, 200, 5
    rng = np.random.default_rng(11)
    scale = np.sqrt(2 * (0.6 ** 2 + 0.8 ** 2) + seed_sd ** 2)
    truth = norm.cdf(1.0 / scale) - norm.cdf(0.8 / scale)
    hits = {"headline": 0, "test noise only": 0, "seeds only": 0}
    for trial in range(trials):
        y = (rng.random((n, 1)) < 0.4).astype(np.float32)
        arms = []
        for mu in (1.0, 0.8):
            shared = 0.6 * rng.normal(size=(n, 1))
            arms.append([(mu + seed_sd * rng.normal()) * y + shared + 0.8 * rng.normal(size=(n, 1))
                         for _ in range(seeds)])
        got = paired_delta(*arms, y, np.ones_like(y, dtype=bool), [0], n_boot=50, seed=trial)
        for name, ci in (("headline", got["ci"]), ("test noise only", got["test_noise_only"]["ci"]),
                         ("seeds only", got["seed_t_interval"]["ci"])):
            hits[name] += ci[0] <= truth <= ci[1]
    rate = {k: v / trials for k, v in hits.items()}
    assert rate["headline"] >= 0.9
    if seed_sd:
        assert rate["test noise only"] <= 0.7  # 0.57 at this seed
    else:
        assert rate["seeds only"] < rate["headline"] - 0.05


def test_t_interval_and_its_limits():
    from scipy.stats import t, ttest_1samp

    got = t_interval([1.0, 2.0, 3.0])
    assert got["mean"] == 2.0 and got["sd"] == 1.0 and got["df"] == 2 and got["n"] == 3
    assert got["ci"][1] - 2.0 == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-6)  # t(0.975, df 2)
    assert got["p_value"] == pytest.approx(ttest_1samp([1.0, 2.0, 3.0], 0.0).pvalue)
    one = t_interval([0.7])
    assert one["mean"] == 0.7 and one["ci"] is None and one["p_value"] is None
    assert t_interval([])["mean"] is None
    deltas = [0.010, -0.009, 0.004, 0.047, 0.030]
    seeds_only = t_interval(deltas)
    # no test-set noise: the paired t over seeds exactly
    both = seed_and_patient_interval(np.mean(deltas), [(np.var(deltas, ddof=1) / 5, 4)], 0.0)
    assert both["ci"] == pytest.approx(seeds_only["ci"]) and both["p_value"] == pytest.approx(seeds_only["p_value"])
    assert both["df"] == pytest.approx(4)
    # no seed spread: the normal interval of the patient variance
    flat = seed_and_patient_interval(0.02, [(0.0, 4)], 0.01 ** 2)
    assert flat["df"] == float("inf") and flat["ci"] == pytest.approx((0.02 - 0.0196, 0.02 + 0.0196), abs=1e-5)
    assert flat["p_value"] == pytest.approx(2 * t.sf(2.0, np.inf))
    # both: the variances add, on the seeds' df, so never narrower than the seeds-only interval
    v = np.var(deltas, ddof=1) / 5
    mixed = seed_and_patient_interval(np.mean(deltas), [(v, 4)], 0.004 ** 2)
    assert mixed["se"] == pytest.approx(np.sqrt(v + 0.004 ** 2)) and mixed["df"] == 4
    lo, hi = mixed["ci"]
    assert hi - lo == pytest.approx(2 * t.ppf(0.975, 4) * mixed["se"]) and lo < 0 < hi
    assert hi - lo > seeds_only["ci"][1] - seeds_only["ci"][0] and mixed["p_value"] > seeds_only["p_value"]
    # unpaired: Welch's df over the two arms' terms
    welch = seed_and_patient_interval(0.05, [(1e-4, 4), (4e-4, 2)], 1e-4)
    assert welch["df"] == pytest.approx(5e-4 ** 2 / (1e-4 ** 2 / 4 + 4e-4 ** 2 / 2))


# ------------------------------------------------------------------------------------------- calibration

def test_expected_calibration_error_by_hand():
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.05, 0.15, 0.12, 0.95, 1.0])  # p == 1 joins the last bin
    # bin 0: |0 - 0.05| * 1/5; bin 1: |1 - 0.135| * 2/5; bin 9: |0.5 - 0.975| * 2/5
    expected = 0.05 / 5 + 0.865 * 2 / 5 + 0.475 * 2 / 5
    assert expected_calibration_error(y, p) == pytest.approx(expected, abs=1e-12)
    assert expected_calibration_error(y, p, n_bins=1) == pytest.approx(abs(3 / 5 - p.mean()), abs=1e-12)
    assert expected_calibration_error([], []) is None


def test_expected_calibration_error_zero_when_calibrated():
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    p = np.array([0.25] * 4 + [0.75] * 4)
    assert expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-15)


def test_reliability_bins():
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.05, 0.15, 0.12, 0.95, 1.0])
    r = reliability(y, p, n_bins=10)
    assert r["bin_edges"] == pytest.approx(np.linspace(0, 1, 11).tolist())
    assert r["count"] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert r["mean_pred"][1] == pytest.approx(0.135) and r["frac_pos"][9] == 0.5
    assert np.isnan(r["mean_pred"][4]) and np.isnan(r["frac_pos"][4])


# -------------------------------------------------------------------------------------- operating points

def test_sensitivity_at_specificity_by_hand():
    neg = np.arange(10) / 10  # 0.0 .. 0.9
    pos = np.array([0.95, 0.85, 0.5, 0.3, 0.05])
    y, p = np.r_[np.zeros(10), np.ones(5)], np.r_[neg, pos]
    assert sensitivity_at_specificity(y, p, 1.0) == pytest.approx(0.2)  # above every negative: 0.95 only
    assert sensitivity_at_specificity(y, p, 0.9) == pytest.approx(0.4)  # threshold 0.85: 1 negative of 10
    assert sensitivity_at_specificity(y, p, 0.5) == pytest.approx(0.6)  # threshold 0.5: 5 negatives
    assert sensitivity_at_specificity(y, p, 0.0) == 1.0
    assert sensitivity_at_specificity(np.ones(4), np.arange(4), 0.9) is None


def test_sensitivity_at_specificity_keeps_collinear_points():
    # three tied (positive, negative) pairs: the ROC points (1/3, 1/3), (2/3, 2/3) are collinear, and
    # roc_curve's default drop_intermediate would lose the one that answers FPR <= 0.4
    y, p = np.array([1, 0, 1, 0, 1, 0]), np.array([0.9, 0.9, 0.5, 0.5, 0.1, 0.1])
    assert sensitivity_at_specificity(y, p, 0.6) == pytest.approx(1 / 3)


def test_auprc_is_sklearn():
    rng = np.random.default_rng(0)
    y = rng.random(500) < 0.2
    p = np.round(rng.random(500) + 0.3 * y, 1)
    assert auprc(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-15)
    assert auprc(np.zeros(5), np.arange(5)) is None
