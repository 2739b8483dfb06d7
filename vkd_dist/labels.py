"""Label sets and the policies that turn 1/0/-1/missing values into (targets, mask).

A data set declares its label names in order (`dataset.json` "labels": the 14 CheXpert labels by default, or a
manifest's own columns), its **evaluation policy** (how blank and uncertain entries are scored) and its
**training policy** (how training reads them; the evaluation policy unless the data set says otherwise, so a
model is trained on the targets it is scored on). `data.uncertain` / `data.missing` override the training
policy; evaluation always uses the data set's, so two runs trained differently are scored on the same targets.

A study with no labels at all (a report but no curated labels: `"labelled": false` in its shard json) is
masked whole under every policy: no policy turns its blanks into negatives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Optional

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
CHEXPERT5: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
UNCERTAIN_POLICIES = ("ignore", "ones", "zeros")
MISSING_POLICIES = ("mask", "negative")


@dataclass(frozen=True)
class LabelPolicy:
    """How a data set's blank (missing) and uncertain (-1) entries are read, in evaluation or in training. The
    default is the published MIMIC-CXR / CheXpert convention: blank counts as negative, uncertain is left out."""

    uncertain: str = "ignore"
    missing: str = "negative"

    def __post_init__(self):
        if self.uncertain not in UNCERTAIN_POLICIES:
            raise ValueError(f"label policy: uncertain={self.uncertain!r} (expected {', '.join(UNCERTAIN_POLICIES)})")
        if self.missing not in MISSING_POLICIES:
            raise ValueError(f"label policy: missing={self.missing!r} (expected {', '.join(MISSING_POLICIES)})")

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return f"blank={self.missing}, uncertain={self.uncertain}"

    def overridden(self, uncertain: Optional[str], missing: Optional[str]) -> LabelPolicy:
        """This policy with the keys a config sets (None: keep this policy's)."""
        return LabelPolicy(uncertain or self.uncertain, missing or self.missing)

    def scored(self, counts: Mapping[str, int]) -> tuple[int, int]:
        """(positives, negatives) of one label given its value counts {"1", "0", "-1", "null"}."""
        pos, neg = counts.get("1", 0), counts.get("0", 0)
        if self.uncertain == "ones":
            pos += counts.get("-1", 0)
        elif self.uncertain == "zeros":
            neg += counts.get("-1", 0)
        if self.missing == "negative":
            neg += counts.get("null", 0)
        return pos, neg


EvalPolicy = LabelPolicy  # the name the evaluation side has always used


# The literature's convention per source (docs/data.md): MIMIC-CXR and the synthetic corpus (whose reports
# determine labels as MIMIC's do) score blank as negative; the OpenI converter writes explicit negatives for
# every label a MeSH-coded report does not name, so a blank there means an uncoded report and is left out.
SOURCE_EVAL_POLICY = {"mimic-cxr": EvalPolicy(), "synthetic": EvalPolicy(), "manifest": EvalPolicy(),
                      "openi": EvalPolicy(uncertain="ignore", missing="mask")}


def describe_policy(source: str) -> str:
    """One paragraph for a converter's --help: how its data set's labels are scored in evaluation."""
    policy = SOURCE_EVAL_POLICY.get(source, EvalPolicy())
    blank = "a negative" if policy.missing == "negative" else "left out"
    uncertain = {"ignore": "left out", "ones": "a positive", "zeros": "a negative"}[policy.uncertain]
    why = {"openi": " The converter writes 0 for every label a MeSH-coded report does not name ('normal' is No "
                    "Finding = 1), so only reports without MeSH terms are blank.",
           "manifest": " Set with --eval-missing / --eval-uncertain."}.get(source, "")
    return (f"Evaluation policy (dataset.json eval_policy; vkd-eval always uses it, whatever the training "
            f"policy): a blank label is {blank}, an uncertain (-1) one {uncertain}.{why}")


def check_label_names(names: Sequence[str], where: str) -> tuple[str, ...]:
    names = tuple(names)
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"{where}: labels must be a non-empty list of names, got {list(names)}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{where}: label {dupes[0]!r} appears more than once")
    return names


def check_label_dict(labels: Mapping[str, Optional[float]], where: str = "sample",
                     names: Sequence[str] = LABELS) -> dict[str, Optional[int]]:
    """Normalise a label mapping to {name: 1|0|-1|None} for every name of the set, with a specific error."""
    unknown = set(labels) - set(names)
    if unknown:
        raise ValueError(f"{where}: unknown label name {sorted(unknown)[0]!r} (this data set's labels: "
                         f"{', '.join(names)})")
    out: dict[str, Optional[int]] = {}
    for name in names:
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


def encode_labels(labels: Mapping[str, Optional[int]], uncertain: str = "ignore", missing: str = "mask",
                  names: Sequence[str] = LABELS, labelled: bool = True):
    """Return (targets float32[L], mask bool[L]) under the uncertain (ignore|ones|zeros) and
    missing (mask|negative) policies. Masked entries have target 0 and contribute to no loss or metric; an
    unlabelled study (`labelled=False`) is masked whole, whatever the policy."""
    targets = np.zeros(len(names), dtype=np.float32)
    mask = np.zeros(len(names), dtype=bool)
    if not labelled:
        return targets, mask
    for i, name in enumerate(names):
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


def scorable_labels(label_counts: Mapping[str, Mapping[str, int]], names: Sequence[str],
                    policy: EvalPolicy) -> list[str]:
    """The labels with both classes under `policy`, given a split's value counts: the fixed set a split's
    macro AUROC averages over."""
    return [n for n in names if min(policy.scored(label_counts.get(n, {}))) > 0]
