"""Evaluation statistics: patient-level bootstrap CIs for AUROC, paired model comparison over seeds and
patients, calibration.

Why a patient bootstrap: a chest X-ray test set holds several studies per patient, and those are correlated.
Resampling images as if they were independent understates the variance; resampling *patients* (and carrying
all of a patient's samples along) gives intervals that match the unit the test set was drawn by.

A bootstrap row is a vector of per-sample weights (how many times the sample's patient was drawn), so every
statistic is a weighted statistic on the fixed arrays: nothing is copied per resample, every label and every
model sees the same rows (which is what makes comparisons paired), and AUROC for a whole chunk of rows is one
sparse product against the per-patient draw counts plus a cumulative sum (see _RankedLabel).

Why seeds too: a comparison of two training recipes is a question about the recipes, not about one trained
model each. With several seeds per arm, paired_delta's headline interval adds the spread between seeds to the
patient bootstrap's (seed_and_patient_interval): a t-interval on the seeds' degrees of freedom. It stands in
for a two-level bootstrap (resample seeds, then patients), which with 5 seeds estimates the seed variance low
by (S - 1) / S and uses normal rather than t_4 tails: its nominal 95 % interval covers about 85 % of the time
under a normal model. The sum counts the seed x patient interaction twice (in the per-seed deltas and in the
bootstrap of their mean), so it errs wide rather than narrow; tests/test_stats.py checks its coverage.

Point estimates use scikit-learn directly; only the bootstrap is written by hand.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Optional

import numpy as np
from scipy import sparse
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

# Bootstrap rows per chunk ~ this / max(n, patients): each per-chunk array ([b, P] int64 draws, [<= 3n, b]
# float32 bin sums) then stays at tens of MB whatever n is (small enough for the allocator to reuse rather
# than map fresh pages every chunk, which measurably costs). Chunking never changes the result.
_CHUNK_ELEMENTS = 3_000_000


# ----------------------------------------------------------------------------------------------- resampling

def patient_index(patient_ids: Optional[Sequence[str]], n: int) -> tuple[np.ndarray, int]:
    """(int index [n] of each sample's patient, number of patients). None -> every sample its own patient.

    Indices come from the sorted unique ids, so the mapping does not depend on sample order (reordering or
    duplicating samples keeps each patient's index, hence the same bootstrap draws for a seed)."""
    if patient_ids is None:
        return np.arange(n, dtype=np.int64), n
    ids = np.asarray(patient_ids)
    if ids.ndim != 1 or ids.shape[0] != n:
        raise ValueError(f"patient_ids must have one entry per sample ({n}), got shape {ids.shape}")
    uniq, inv = np.unique(ids, return_inverse=True)
    return inv.astype(np.int64).reshape(n), int(uniq.size)


def _bootstrap_counts(num_patients: int, n_boot: int, seed: int, chunk: int) -> Iterator[np.ndarray]:
    """float32 [b, num_patients] chunks: how often each patient is drawn in each resample."""
    if num_patients <= 0:
        raise ValueError("need at least one patient to resample")
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        # Row-major draws from one Generator: the values come off one sequential stream (PCG64 keeps its spare
        # 32-bit half in the generator state, not per call), so rows do not depend on how they are chunked
        # (tests/test_stats.py checks this with odd chunk sizes).
        draws = rng.integers(0, num_patients, size=(b, num_patients), dtype=np.int64)
        draws += np.arange(b, dtype=np.int64)[:, None] * num_patients  # row offsets: one bincount for the chunk
        counts = np.bincount(draws.ravel(), minlength=b * num_patients)
        yield counts.reshape(b, num_patients).astype(np.float32)


def bootstrap_weights(patient_idx: np.ndarray, num_patients: int, n_boot: int, seed: int,
                      chunk: int = 64) -> Iterator[np.ndarray]:
    """Yields float32 [b, n] chunks (b <= chunk, n_boot rows in total) of per-sample weights: each row
    resamples the patients with replacement (num_patients draws), and a sample's weight is how many times its
    patient was drawn. Deterministic for a seed; the same seed gives the same rows whatever `chunk` is, and they
    are exactly the rows auroc_ci and paired_delta use for that seed."""
    patient_idx = np.asarray(patient_idx, dtype=np.int64)
    for counts in _bootstrap_counts(num_patients, n_boot, seed, chunk):
        yield counts[:, patient_idx]


# ---------------------------------------------------------------------------------------- weighted AUROC

class _RankedLabel:
    """One (scores, y) pair, binned once, that scores any number of weight rows with one sparse product.

    AUROC = P(s_pos > s_neg) + 1/2 P(s_pos == s_neg) under the weights. Take one class as the anchor and
    group its distinct scores into levels 1..G (below). Every sample of the other class falls in one of 2G + 1
    bins: "tied with level k" or "in the gap just below level k" (or above the last). Per row, the other
    class's weight below / at each level is then a cumulative sum over G bins, and
        num = sum_k A_k * (O_below_k + O_at_k / 2)        (anchor = positives)
        AUROC = num / (A_total * O_total)
    (with negatives as anchor, "below" becomes "above"). All bin sums come from one sparse matrix
    [3G + 1, columns] times the weights, so a chunk of rows costs one pass over the nonzeros, and everything
    after is O(G) per row. Ties need no special care: they are the "at" bins.

    Levels: consecutive distinct anchor scores with no other-class sample between or on them have the same
    O_below and no O_at, so they merge into one level. G is then the number of anchor runs in the sorted
    order, which is well under the anchor count for a useful classifier (it keeps the per-row cumsum short).

    `columns` maps the samples to columns of the weight matrix (default: sample i -> column i). The bootstrap
    maps each sample to its *patient*, so it multiplies per-patient draw counts [P, b] directly instead of
    expanding them to per-sample weights first; a patient's samples in one bin merge into one entry.
    """

    def __init__(self, scores: np.ndarray, y: np.ndarray, columns: Optional[np.ndarray] = None,
                 num_columns: Optional[int] = None):
        scores = np.asarray(scores, dtype=np.float64).ravel()
        y = np.asarray(y).ravel() > 0.5
        if scores.shape != y.shape:
            raise ValueError(f"scores {scores.shape} and y {y.shape} differ in shape")
        columns = np.arange(scores.size) if columns is None else np.asarray(columns, dtype=np.int64)
        num_columns = scores.size if num_columns is None else int(num_columns)
        self.num_columns = num_columns
        self.defined = _has_both_classes(y)
        if not self.defined:
            return
        pos_levels, neg_levels = np.unique(scores[y]), np.unique(scores[~y])
        self.anchor_is_pos = pos_levels.size <= neg_levels.size
        anchor = y if self.anchor_is_pos else ~y
        distinct = pos_levels if self.anchor_is_pos else neg_levels
        other_sorted = np.sort(scores[~anchor])
        # merge key per distinct anchor score: other samples strictly below it, and whether any ties it;
        # nondecreasing in the score, and a tied score always ends its run (its ties count as "below" next)
        n_below = np.searchsorted(other_sorted, distinct, side="left")
        tied = np.searchsorted(other_sorted, distinct, side="right") > n_below
        _, first, level_of = np.unique(2 * n_below + tied, return_index=True, return_inverse=True)
        g = first.size
        lowest = distinct[first]  # a level's lowest score; other-class samples never fall inside a merged level
        highest = np.empty(g)
        highest[level_of] = distinct  # distinct is ascending, so the last write per level is its highest
        # rows: [0, g] gaps of the other class, [g+1, 2g] other class tied with a level, [2g+1, 3g] anchor
        other_s = scores[~anchor]
        below = np.searchsorted(highest, other_s, side="left")  # number of levels entirely below
        at = (below < g) & (lowest[np.minimum(below, g - 1)] == other_s)
        rows = np.empty(scores.size, dtype=np.int64)
        rows[~anchor] = np.where(at, g + 1 + below, below)
        rows[anchor] = 2 * g + 1 + level_of[np.searchsorted(distinct, scores[anchor])]
        # coo -> csr sums duplicates: samples of one patient landing in one bin merge into one entry
        self.matrix = sparse.csr_matrix((np.ones(scores.size), (rows, columns)), shape=(3 * g + 1, num_columns))
        self.matrix32 = self.matrix.astype(np.float32)  # entries are small counts: exact in float32
        self.g = g

    def __call__(self, weights_t: np.ndarray) -> np.ndarray:
        """AUROC per row for weights_t [num_columns, b] (one column per row: the transpose of [b, n]).

        float64 weights are general. float32 weights are only for integer counts whose row total stays under
        2**23: then every sum below is an integer under 2**24, exact in float32, and the float32 product runs
        ~3x faster than float64 (half the memory traffic). Products that reach ~n^2 are taken in float64."""
        b = weights_t.shape[1]
        if not self.defined:
            return np.full(b, np.nan)
        g = self.g
        sums = (self.matrix32 if weights_t.dtype == np.float32 else self.matrix) @ weights_t  # [3g + 1, b]
        gap, at, anchor = sums[:g + 1], sums[g + 1:2 * g + 1], sums[2 * g + 1:]
        other_below = np.cumsum(gap[:g] + at, axis=0)
        other_below -= at  # cumulative weight strictly below each level, gap before it included
        twice_rank = 2 * other_below + at  # 2 x (below + at / 2): stays an integer for counts
        a_total = anchor.sum(axis=0, dtype=np.float64)
        o_total = gap.sum(axis=0, dtype=np.float64) + at.sum(axis=0, dtype=np.float64)
        num = 0.5 * np.einsum("gb,gb->b", anchor, twice_rank, dtype=np.float64)
        if not self.anchor_is_pos:
            num = a_total * o_total - num  # anchor = negatives: count the other class above instead
        denom = a_total * o_total
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, num / np.where(denom > 0, denom, 1.0), np.nan)


def weighted_auroc(scores: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of scores [n] against binary y [n] under each row of weights [b, n] -> [b] (nan where a row has
    zero positive or zero negative weight). Ties count 1/2, exactly as sklearn's roc_auc_score with
    sample_weight. A single [n] weight vector is treated as one row."""
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    ranked = _RankedLabel(scores, y)
    if weights.ndim != 2 or weights.shape[1] != ranked.num_columns:
        raise ValueError(f"weights {weights.shape} do not match {ranked.num_columns} scores")
    return ranked(weights.T)


# --------------------------------------------------------------------------------------- bootstrap tables

def _check_table(probs, targets, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    probs, targets, mask = np.asarray(probs), np.asarray(targets), np.asarray(mask).astype(bool)
    if probs.ndim != 2 or probs.shape != targets.shape or probs.shape != mask.shape:
        raise ValueError(f"probs {probs.shape}, targets {targets.shape}, mask {mask.shape} must be equal [n, L]")
    return probs, targets, mask


def _has_both_classes(y: np.ndarray) -> bool:
    y = np.asarray(y) > 0.5
    return bool(y.any() and not y.all())


def _point_auroc(y: np.ndarray, p: np.ndarray) -> Optional[float]:
    if not _has_both_classes(y):
        return None  # undefined without both classes
    return float(roc_auc_score(np.asarray(y) > 0.5, p))


def _rank_labels(probs, targets, mask, labels, pidx, num_patients) -> list[_RankedLabel]:
    """Per label, the unmasked samples binned against columns = their patients."""
    return [_RankedLabel(probs[mask[:, j], j], targets[mask[:, j], j], pidx[mask[:, j]], num_patients)
            for j in labels]


def _patient_counts_t(pidx: np.ndarray, num_patients: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """The rows of bootstrap_weights, as per-patient counts transposed to [P, b] for the sparse products.

    float32 (the fast, exact path of _RankedLabel) when every row's total sample weight is under 2**23, which
    holds for any realistic test set (the expected total is n); float64 otherwise."""
    sizes = np.bincount(pidx, minlength=num_patients).astype(np.float64)  # samples per patient
    for counts in _bootstrap_counts(num_patients, n_boot, seed, _chunk_rows(max(pidx.size, num_patients))):
        exact32 = float((sizes @ counts.T).max()) < 2.0 ** 23
        yield np.ascontiguousarray(counts.T, dtype=np.float32 if exact32 else np.float64)


def _interval(values: np.ndarray, level: float) -> Optional[tuple[float, float]]:
    """Percentile interval of the finite values; None when there are none."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    alpha = 1.0 - level
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _check_level(level: float, n_boot: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot <= 0:
        raise ValueError(f"n_boot must be positive, got {n_boot}")


def _chunk_rows(n: int) -> int:
    """Bootstrap rows per chunk for n samples or patients, whichever is larger."""
    return max(1, min(128, _CHUNK_ELEMENTS // max(n, 1)))


def auroc_ci(probs, targets, mask, label_idx, patient_ids=None, n_boot=1000, seed=0, level=0.95) -> dict:
    """Patient bootstrap for a multi-label AUROC table. probs/targets float [n, L], mask bool [n, L]
    (unmasked entries count). label_idx: the label columns averaged into the macro figure.
    Returns {"per_label": [L] list of (lo, hi) or None where the point AUROC is undefined,
             "macro": (lo, hi) or None, "resamples": n_boot, "valid_macro_resamples": k, "seed": seed,
             "level": level, "unit": "patient", "num_patients": P}
    Every label uses the SAME resampled patients per bootstrap row (so the macro of a row is the mean of that
    row's per-label AUROCs over label_idx). Rows where some macro label is undefined are dropped from the
    macro CI (count kept in valid_macro_resamples); per-label CIs use that label's defined rows. Percentile
    intervals."""
    probs, targets, mask = _check_table(probs, targets, mask)
    _check_level(level, n_boot)
    n, num_labels = probs.shape
    label_idx = [int(j) for j in label_idx]
    pidx, num_patients = patient_index(patient_ids, n)
    defined = [_has_both_classes(targets[mask[:, j], j]) for j in range(num_labels)]
    todo = [j for j in range(num_labels) if defined[j]]  # undefined labels stay nan in every row anyway
    ranked = dict(zip(todo, _rank_labels(probs, targets, mask, todo, pidx, num_patients)))

    rows = np.full((n_boot, num_labels), np.nan)
    start = 0
    for counts_t in _patient_counts_t(pidx, num_patients, n_boot, seed):
        b = counts_t.shape[1]
        for j, r in ranked.items():
            rows[start:start + b, j] = r(counts_t)
        start += b

    per_label = [_interval(rows[:, j], level) if defined[j] else None for j in range(num_labels)]
    macro, valid = None, 0
    if label_idx and all(defined[j] for j in label_idx):
        sub = rows[:, label_idx]
        ok = np.isfinite(sub).all(axis=1)  # a row counts only if every macro label is defined in it
        valid = int(ok.sum())
        macro = _interval(sub[ok].mean(axis=1), level)
    return {"per_label": per_label, "macro": macro, "resamples": int(n_boot), "valid_macro_resamples": valid,
            "seed": seed, "level": level, "unit": "patient", "num_patients": int(num_patients)}


def paired_delta(probs_a: list[np.ndarray], probs_b: list[np.ndarray], targets, mask, label_idx,
                 patient_ids=None, n_boot=1000, seed=0, level=0.95, seeds_paired: Optional[bool] = None) -> dict:
    """Paired comparison on the same samples: each arm is a list of [n, L] prediction arrays (one per seed of
    that arm), scored against the same targets/mask. The statistic is
    delta = mean over a's seeds of macro AUROC - mean over b's seeds of macro AUROC (macro over label_idx).

    Two sources of noise move delta: which patients the test set holds, and the training run itself (a seed).
    - "test_noise_only": one patient bootstrap applied to every prediction array at once (the models fixed),
      percentile CI and two-sided p = min(1, 2 (c + 1) / (k + 1)), c = resamples on the far side of 0 (d <= 0
      or d >= 0, the fewer), k = valid resamples. With c = 0 the p is below what k resamples resolve: p_value
      is then the bound 2 / (k + 1) and p_value_is_bound is True.
    - the headline ("ci", "p_value"), when both arms have two or more seeds: a t-interval whose variance adds
      the seeds' and the patients' (seed_and_patient_interval): the per-seed deltas' variance / S when the seeds
      are paired (seed i of a with seed i of b), else each arm's per-seed macro variance / its seed count, plus
      the patient bootstrap's variance of delta. With fewer seeds the headline is test_noise_only, and
      "interval" says which one it is.
    - "seed_t_interval": the paired t-interval over the per-seed deltas (the test set fixed), when paired.

    seeds_paired: None pairs seed i of a with seed i of b when the arms have as many seeds; False counts each
    arm's seed spread on its own (Welch: their seeds differ); True with unequal counts is an error.
    Returns {"delta", "ci", "p_value", "p_value_is_bound", "interval", "se", "df", "test_noise_only": {"ci",
    "p_value", "p_value_is_bound", "se"}, "seed_t_interval", "seeds_paired", "resamples", "valid_resamples",
    "macro_a": [per-seed point macro of a], "macro_b": [...], "per_seed_delta": [macro_a[i] - macro_b[i]] when
    paired, else None}. When some macro label lacks a class, delta, the intervals and the macros are None
    (valid_resamples 0); when no resample keeps every class, the intervals are None."""
    if not probs_a or not probs_b:
        raise ValueError("each arm needs at least one prediction array")
    if seeds_paired and len(probs_a) != len(probs_b):
        raise ValueError(f"seeds_paired with {len(probs_a)} seeds in a and {len(probs_b)} in b: pairs need as many")
    paired = len(probs_a) == len(probs_b) if seeds_paired is None else seeds_paired
    targets, mask = np.asarray(targets), np.asarray(mask).astype(bool)
    arms = [[_check_table(p, targets, mask)[0] for p in arm] for arm in (probs_a, probs_b)]
    _check_level(level, n_boot)
    label_idx = [int(j) for j in label_idx]
    if not label_idx:
        raise ValueError("label_idx is empty: no macro to compare")
    n = targets.shape[0]

    def point_macro(p: np.ndarray) -> Optional[float]:
        per = [_point_auroc(targets[mask[:, j], j], p[mask[:, j], j]) for j in label_idx]
        defined = [v for v in per if v is not None]
        return float(np.mean(defined)) if len(defined) == len(per) else None

    macro_a, macro_b = [point_macro(p) for p in arms[0]], [point_macro(p) for p in arms[1]]
    result: dict[str, Any] = {"delta": None, "ci": None, "p_value": None, "p_value_is_bound": False,
                              "interval": None, "se": None, "df": None, "test_noise_only": None,
                              "seed_t_interval": None, "seeds_paired": paired, "resamples": int(n_boot),
                              "valid_resamples": 0, "macro_a": macro_a, "macro_b": macro_b, "per_seed_delta": None}
    if None in macro_a or None in macro_b:
        return result  # definedness depends only on targets/mask, so it fails for every seed alike
    a, b = np.array(macro_a), np.array(macro_b)
    result["delta"] = delta = float(a.mean() - b.mean())
    if paired:
        result["per_seed_delta"] = (a - b).tolist()
        if len(a) >= 2:
            result["seed_t_interval"] = t_interval(result["per_seed_delta"], level)

    pidx, num_patients = patient_index(patient_ids, n)
    ranked = [[_rank_labels(p, targets, mask, label_idx, pidx, num_patients) for p in arm] for arm in arms]
    d = np.empty(n_boot)
    start = 0
    for counts_t in _patient_counts_t(pidx, num_patients, n_boot, seed):
        b_rows = counts_t.shape[1]
        # macro per seed, then mean over seeds, per arm; nan propagates when a row loses a class
        arm_means = [np.mean([np.mean([r(counts_t) for r in labels], axis=0) for labels in arm], axis=0)
                     for arm in ranked]
        d[start:start + b_rows] = arm_means[0] - arm_means[1]
        start += b_rows

    d = d[np.isfinite(d)]
    k = int(d.size)
    result["valid_resamples"] = k
    if not k:
        return result
    noise = {"ci": _interval(d, level), **_bootstrap_p(d), "se": float(d.std(ddof=1)) if k > 1 else 0.0}
    result["test_noise_only"] = noise
    seed_terms = _seed_terms(a, b, paired)
    if seed_terms is None:
        result.update(ci=noise["ci"], p_value=noise["p_value"], p_value_is_bound=noise["p_value_is_bound"],
                      se=noise["se"], interval="test-set noise only")
    else:
        both = seed_and_patient_interval(delta, seed_terms, noise["se"] ** 2, level)
        result.update(ci=both["ci"], p_value=both["p_value"], se=both["se"], df=both["df"],
                      interval="seeds and test patients")
    return result


def _bootstrap_p(d: np.ndarray) -> dict:
    """Two-sided percentile-bootstrap p of d against 0 (the p at which the percentile CI starts to hold 0),
    with the +1 correction; flagged as a bound when no resample lies on the far side."""
    far = int(min((d <= 0).sum(), (d >= 0).sum()))
    return {"p_value": float(min(1.0, 2 * (far + 1) / (d.size + 1))), "p_value_is_bound": far == 0}


def _seed_terms(a: np.ndarray, b: np.ndarray, paired: bool) -> Optional[list[tuple[float, int]]]:
    """(variance of the seed mean, its df) per seed component of delta; None unless both arms have 2+ seeds."""
    if len(a) < 2 or len(b) < 2:
        return None
    if paired:
        return [(float(np.var(a - b, ddof=1)) / len(a), len(a) - 1)]
    return [(float(np.var(a, ddof=1)) / len(a), len(a) - 1), (float(np.var(b, ddof=1)) / len(b), len(b) - 1)]


# ---------------------------------------------------------------------------------- intervals over seeds

def _t_test(estimate: float, se: float, df: float, level: float) -> tuple[tuple[float, float], float]:
    """((lo, hi), two-sided p against 0) for estimate with standard error se on df degrees of freedom (inf:
    normal). se 0: the interval is the point, p 1 at 0 and 0 elsewhere."""
    from scipy.stats import t

    if se == 0.0:
        return (estimate, estimate), float(estimate == 0.0)
    half = float(t.ppf(0.5 + level / 2, df)) * se
    return (estimate - half, estimate + half), float(min(1.0, 2.0 * t.sf(abs(estimate) / se, df)))


def t_interval(values: Sequence[float], level: float = 0.95) -> dict:
    """Student t over values (seeds, or per-seed deltas): {"n", "mean", "sd", "se", "df", "ci", "p_value"}
    (p two-sided, the mean against 0). With fewer than two values everything but n and mean is None."""
    v = np.asarray(values, dtype=np.float64)
    out: dict[str, Any] = {"n": int(v.size), "mean": float(v.mean()) if v.size else None, "sd": None, "se": None,
                           "df": None, "ci": None, "p_value": None}
    if v.size >= 2:
        _check_level(level, 1)
        sd = float(v.std(ddof=1))
        se = sd / float(np.sqrt(v.size))
        ci, p = _t_test(out["mean"], se, v.size - 1, level)
        out.update(sd=sd, se=se, df=v.size - 1, ci=ci, p_value=p)
    return out


def seed_and_patient_interval(delta: float, seed_terms: Sequence[tuple[float, float]], patient_var: float,
                              level: float = 0.95) -> dict:
    """A t-interval for delta whose variance adds training randomness and test-set noise:
        V = sum_i v_i + patient_var,   df = (sum_i v_i)^2 / sum_i (v_i^2 / df_i)
    seed_terms: (v_i, df_i) pairs, each the variance of a seed mean and its degrees of freedom (paired seeds:
    var(per-seed delta) / S on S - 1; unpaired: one term per arm). patient_var: the patient bootstrap's
    variance of delta. The df are the seed terms' own (Welch-Satterthwaite over them; S - 1 when paired): the
    patient part, estimated from hundreds of patients, would raise them, and with them shrink the t quantile
    faster than it widens V; keeping the seeds' df makes the interval never narrower than the seeds-only one
    (patient_var 0: exactly the t-interval over seeds, Welch's when unpaired). No seed spread at all (identical
    runs): the normal interval of the patient bootstrap. Returns {"ci", "p_value", "se", "df"}."""
    seed_var = float(sum(v for v, _ in seed_terms))
    spread = sum(v * v / f for v, f in seed_terms)
    df = seed_var * seed_var / spread if spread > 0 else float("inf")
    se = float(np.sqrt(seed_var + float(patient_var)))
    ci, p = _t_test(delta, se, df, level)
    return {"ci": ci, "p_value": p, "se": se, "df": df}


# ------------------------------------------------------------------------------------------- calibration

def _bins(y, p, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(edges, count, sum_y, sum_p, y) for equal-width bins on [0, 1]; bins are [e_k, e_k+1), the last one
    closed so p == 1 counts. Out-of-range p falls in the end bins."""
    if n_bins <= 0:
        raise ValueError(f"n_bins must be positive, got {n_bins}")
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y {y.shape} and p {p.shape} differ in shape")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted against the same edges that are reported, so a p on an edge lands where the plot says
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    return edges, count, np.bincount(idx, weights=y, minlength=n_bins), np.bincount(idx, weights=p, minlength=n_bins), y


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> Optional[float]:
    """Equal-width bins on [0, 1] (p == 1 falls in the last bin): sum_b (n_b / n) |mean(y_b) - mean(p_b)|.
    None for an empty input."""
    _, count, sum_y, sum_p, y = _bins(y, p, n_bins)
    if y.size == 0:
        return None
    # (n_b / n) * |sum_y/n_b - sum_p/n_b| == |sum_y - sum_p| / n, and empty bins contribute 0
    return float(np.abs(sum_y - sum_p).sum() / y.size)


def reliability(y, p, n_bins=10) -> dict:
    """{"bin_edges", "mean_pred", "frac_pos", "count"} per bin as plain lists (for reliability-diagram plots;
    empty bins have count 0 and nan means). bin_edges has n_bins + 1 entries, the others n_bins."""
    edges, count, sum_y, sum_p, _ = _bins(y, p, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.where(count > 0, sum_p / count, np.nan)
        frac_pos = np.where(count > 0, sum_y / count, np.nan)
    return {"bin_edges": edges.tolist(), "mean_pred": mean_pred.tolist(), "frac_pos": frac_pos.tolist(),
            "count": count.astype(int).tolist()}


# -------------------------------------------------------------------------------------- operating points

def sensitivity_at_specificity(y, p, specificity: float = 0.9) -> Optional[float]:
    """The highest TPR among ROC operating points (sklearn roc_curve) with FPR <= 1 - specificity. None when y
    lacks either class."""
    y = np.asarray(y).ravel() > 0.5
    if not _has_both_classes(y):
        return None
    # drop_intermediate=False: a collinear point dropped from the curve can be the best one under the bound
    fpr, tpr, _ = roc_curve(y, np.asarray(p, dtype=np.float64).ravel(), drop_intermediate=False)
    # 1 - 0.9 == 0.09999999999999998, so an FPR of exactly 1/10 would miss the bound without the slack
    ok = fpr <= (1.0 - specificity) + 1e-12
    return float(tpr[ok].max())  # (0, 0) is always a point, so ok is never empty


def auprc(y, p) -> Optional[float]:
    """sklearn average_precision_score; None when y has no positives."""
    y = np.asarray(y).ravel() > 0.5
    if not y.any():
        return None
    return float(average_precision_score(y, np.asarray(p, dtype=np.float64).ravel()))
