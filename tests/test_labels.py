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
