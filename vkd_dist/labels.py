"""The 14 CheXpert labels and the policies that turn 1/0/-1/missing values into (targets, mask)."""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
NUM_LABELS = len(LABELS)
LABEL_INDEX = {name: i for i, name in enumerate(LABELS)}
CHEXPERT5: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
VALID_VALUES = (1, 0, -1, None)


def check_label_dict(labels: Mapping[str, Optional[float]], where: str = "sample") -> dict[str, Optional[int]]:
    """Normalise a label mapping to {name: 1|0|-1|None} for all 14 labels, with a specific error if bad."""
    unknown = set(labels) - set(LABELS)
    if unknown:
        raise ValueError(f"{where}: unknown label name {sorted(unknown)[0]!r} (expected CheXpert names)")
    out: dict[str, Optional[int]] = {}
    for name in LABELS:
        value = labels.get(name)
        if value is not None:
            if isinstance(value, float) and np.isnan(value):
                value = None
            elif value not in (1, 0, -1):
                raise ValueError(f"{where}: label {name!r} has value {value!r} (expected 1, 0, -1 or null)")
            else:
                value = int(value)
        out[name] = value
    return out


def encode_labels(labels: Mapping[str, Optional[int]], uncertain: str = "ignore", missing: str = "mask"):
    """Return (targets float32[14], mask bool[14]) under the uncertain (ignore|ones|zeros) and
    missing (mask|negative) policies. Masked entries have target 0 and contribute to no loss or metric."""
    targets = np.zeros(NUM_LABELS, dtype=np.float32)
    mask = np.zeros(NUM_LABELS, dtype=bool)
    for i, name in enumerate(LABELS):
        value = labels.get(name)
        if value == 1:
            targets[i], mask[i] = 1.0, True
        elif value == 0:
            mask[i] = True
        elif value == -1:
            if uncertain == "ones":
                targets[i], mask[i] = 1.0, True
            elif uncertain == "zeros":
                mask[i] = True
            elif uncertain != "ignore":
                raise ValueError(f"unknown uncertain-label policy {uncertain!r} (ignore, ones, zeros)")
        elif value is None:
            if missing == "negative":
                mask[i] = True
            elif missing != "mask":
                raise ValueError(f"unknown missing-label policy {missing!r} (mask, negative)")
    return targets, mask
