import numpy as np
import pytest

from vkd_dist.labels import LABELS, check_label_dict, encode_labels


def test_label_order_is_chexpert():
    assert len(LABELS) == 14 and LABELS[0] == "No Finding" and LABELS[-1] == "Support Devices"


@pytest.mark.parametrize("uncertain, missing, t, m", [
    ("ignore", "mask", [1, 0, 0, 0], [1, 1, 0, 0]),
    ("ones", "mask", [1, 0, 1, 0], [1, 1, 1, 0]),
    ("zeros", "mask", [1, 0, 0, 0], [1, 1, 1, 0]),
    ("ignore", "negative", [1, 0, 0, 0], [1, 1, 0, 1]),
])
def test_uncertain_and_missing_policies(uncertain, missing, t, m):
    labels = {"Cardiomegaly": 1, "Edema": 0, "Pneumonia": -1}  # everything else missing
    targets, mask = encode_labels(labels, uncertain, missing)
    idx = [LABELS.index(n) for n in ("Cardiomegaly", "Edema", "Pneumonia", "Fracture")]
    assert targets[idx].tolist() == t
    assert mask[idx].astype(int).tolist() == m
    assert targets.dtype == np.float32 and mask.dtype == bool


def test_bad_label_values_are_reported_by_name():
    with pytest.raises(ValueError, match="Edema.*2"):
        check_label_dict({"Edema": 2}, where="s1")
    with pytest.raises(ValueError, match="Heart Attack"):
        check_label_dict({"Heart Attack": 1}, where="s1")
    assert check_label_dict({"Edema": float("nan"), "Cardiomegaly": 1.0})["Edema"] is None


def test_eval_policy_scores_counts_as_the_literature_does():
    from vkd_dist.labels import SOURCE_EVAL_POLICY, EvalPolicy

    counts = {"1": 5, "0": 2, "-1": 3, "null": 10}
    assert EvalPolicy().scored(counts) == (5, 12)  # MIMIC: blank is negative, uncertain left out
    assert EvalPolicy("ones", "mask").scored(counts) == (8, 2)
    assert EvalPolicy("zeros", "mask").scored(counts) == (5, 5)
    assert SOURCE_EVAL_POLICY["openi"] == EvalPolicy("ignore", "mask")
    with pytest.raises(ValueError, match="missing='blank'"):
        EvalPolicy("ignore", "blank")


def test_macro_label_set_and_the_start_warning(tmp_path):
    from vkd_dist.data.schema import DatasetInfo
    from vkd_dist.prepare import warn_unscorable

    counts = {"A": {"1": 3, "0": 0, "-1": 0, "null": 4}, "B": {"1": 0, "0": 7, "-1": 0, "null": 0},
              "C": {"1": 2, "0": 5, "-1": 0, "null": 0}}
    info = DatasetInfo(tmp_path, {"labels": ["A", "B", "C"], "splits": {}, "label_counts": {"val": counts},
                                  "eval_policy": {"uncertain": "ignore", "missing": "negative"}})
    assert info.scorable_labels("val") == ["A", "C"]  # B has no positive
    said = []
    warn_unscorable(info, "val", said.append)
    assert len(said) == 1 and "B" in said[0] and "A" not in said[0].split(":")[-1]
    info.meta["eval_policy"] = {"uncertain": "ignore", "missing": "mask"}
    assert info.scorable_labels("val") == ["C"]  # A's blanks no longer count as negatives


def test_report_macro_is_over_the_fixed_set_and_says_so():
    from vkd_dist.metrics import Predictions, report

    rng = np.random.default_rng(0)
    y = np.stack([rng.integers(0, 2, 40), np.r_[np.ones(2), np.zeros(38)], rng.integers(0, 2, 40)], 1)
    y = y.astype(np.float32)
    p = rng.random((40, 3)).astype(np.float32)
    keys, patients = [f"k{i}" for i in range(40)], [f"p{i // 2}" for i in range(40)]
    pred = Predictions(p, y, np.ones_like(y, dtype=bool), keys, patients)
    full = report(pred, ["A", "B", "C"], ["A", "B", "C"], n_boot=100)
    assert full["macro_labels"] == ["A", "B", "C"] and full["num_patients"] == 20
    assert full["macro_auroc"] == pytest.approx(np.mean([full["auroc"][n] for n in "ABC"]))
    assert "macro_auroc_chexpert5" not in full
    # The first 20 samples (a truncated evaluation) hold no positive of B: B drops out of the macro, visibly.
    head = Predictions(p[:20], y[:20].copy(), np.ones((20, 3), bool), pred.keys[:20], pred.patient_ids[:20])
    head.targets[:, 1] = 0
    part = report(head, ["A", "B", "C"], ["A", "B", "C"], n_boot=100)
    assert part["macro_labels"] == ["A", "C"] and part["scorable_labels"] == ["A", "B", "C"]
    # The loss of the image path: summed over labels, averaged over studies.
    q = np.clip(p, 1e-7, 1 - 1e-7)
    assert full["bce"] == pytest.approx(float(-(y * np.log(q) + (1 - y) * np.log(1 - q)).sum(1).mean()), rel=1e-5)


@pytest.mark.parametrize("empty_at", [0, 1, 2])
def test_mc_predictions_join_with_an_empty_rank_anywhere(empty_at):
    """model.inference=mc: a rank without evaluation samples builds its part as evaluate.predict_split does (no
    batches: Predictions.concat([])); the gathered result keeps every sample and the std columns wherever it is."""
    from vkd_dist.metrics import Predictions

    rng = np.random.default_rng(0)

    def part(rank: int) -> Predictions:
        p = rng.random((3, 2)).astype(np.float32)
        return Predictions(p, (p > 0.5).astype(np.float32), np.ones((3, 2), bool), [f"r{rank}-{i}" for i in range(3)],
                           [f"p{rank}"] * 3, std=p / 10)

    parts = [part(r) for r in range(2)]
    parts.insert(empty_at, Predictions.concat([], 2))  # the empty rank's part
    joined = Predictions.concat(parts, 2)
    full = [p for p in parts if p.keys]
    assert joined.keys == [k for p in full for k in p.keys] and joined.probs.shape == (6, 2)
    assert joined.std is not None and np.array_equal(joined.std, np.concatenate([p.std for p in full]))
    assert Predictions.concat([Predictions.concat([], 2)] * 2, 2).probs.shape == (0, 2)
