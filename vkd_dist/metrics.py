"""Evaluation metrics over a data set's labels, with the distributed gather done exactly once.

Each rank holds the predictions for the samples it evaluated (a disjoint set, see eval_loader);
`Predictions.gathered` concatenates them across ranks without padding duplicates, and `report` computes,
per label and macro: AUROC with a 95 % CI from a bootstrap over patients (vkd_dist/stats.py), AUPRC, expected
calibration error and sensitivity at 90 % specificity. The macro figures average a fixed label set, the
labels with both classes on the split under the data set's evaluation policy, and name it ("macro_labels").
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from vkd_dist import stats
from vkd_dist.config import not_allowed
from vkd_dist.labels import CHEXPERT5

if TYPE_CHECKING:
    from vkd_dist.config import Config

SPECIFICITY = 0.9


@dataclass
class Predictions:
    """Image-only (or, for text_only, report-only) probabilities of a split with their targets."""

    probs: np.ndarray  # float [N, L]
    targets: np.ndarray  # float [N, L], under the data set's evaluation policy
    mask: np.ndarray  # bool [N, L]: scored entries
    keys: list = field(default_factory=list)
    patient_ids: list = field(default_factory=list)
    std: Optional[np.ndarray] = None  # [N, L] spread over K prior samples (model.inference=mc)

    @classmethod
    def concat(cls, parts: Sequence[Predictions], num_labels: int) -> Predictions:
        """`parts` in order. An empty part (a rank without evaluation samples, whose std is None even under
        model.inference=mc) adds nothing wherever it stands: the std columns are kept if any part has them."""
        with_std = any(p.std is not None for p in parts)
        parts = [p for p in parts if len(p.probs)]
        if not parts:
            empty = np.zeros((0, num_labels), dtype=np.float32)
            return cls(empty, empty.copy(), empty.astype(bool), std=empty.copy() if with_std else None)
        if with_std and any(p.std is None for p in parts):
            raise ValueError("predictions to join mix parts with and without std (model.inference=mc)")
        joined = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        return cls(joined("probs"), joined("targets"), joined("mask"), keys=[k for p in parts for k in p.keys],
                   patient_ids=[k for p in parts for k in p.patient_ids], std=joined("std") if with_std else None)

    def gathered(self) -> Predictions:
        """All ranks' predictions, concatenated in rank order. Itself without a process group."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
                or torch.distributed.get_world_size() == 1:
            return self
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, self)
        out = Predictions.concat(parts, self.probs.shape[1])
        if len(set(out.keys)) != len(out.keys):
            raise RuntimeError(f"evaluation saw {len(out.keys) - len(set(out.keys))} samples twice across ranks")
        return out

    def write_csv(self, path: str | Path, labels: Sequence[str]) -> None:
        """One row per sample: key, patient_id, a probability column per label (and <label>_std with mc)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["key", "patient_id", *labels, *([f"{n}_std" for n in labels] if self.std is not None
                                                              else [])])
            for i, key in enumerate(self.keys):
                row = [key, self.patient_ids[i], *(f"{v:.7g}" for v in self.probs[i])]
                if self.std is not None:
                    row += [f"{v:.7g}" for v in self.std[i]]
                writer.writerow(row)


def _auroc(y: np.ndarray, p: np.ndarray) -> Optional[float]:
    if y.size == 0 or y.min() == y.max():
        return None  # undefined without both positives and negatives
    return float(roc_auc_score(y, p))


def macro_label_set(pred: Predictions, labels: Sequence[str], scorable: Sequence[str]) -> list[str]:
    """The labels of the split's fixed set `scorable` that have both classes among these scored targets: what a
    macro figure over `pred` averages (fewer than `scorable` only for a truncated evaluation)."""
    labels = list(labels)
    defined = lambda i: np.unique(pred.targets[pred.mask[:, i].astype(bool), i]).size == 2  # noqa: E731
    return [n for n in scorable if defined(labels.index(n))]


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


# The summary figures of `report` that can select best/, and which way is better.
SELECTABLE: dict[str, str] = {"macro_auroc": "max", "macro_auprc": "max", "macro_sens_at_90_spec": "max",
                              "micro_auroc": "max", "macro_auroc_chexpert5": "max", "macro_ece": "min", "bce": "min"}


def check_config(cfg: Config) -> None:
    """train.select_metric is one of SELECTABLE."""
    if cfg.train.select_metric not in SELECTABLE:
        raise not_allowed("train.select_metric", cfg.train.select_metric, tuple(SELECTABLE))


def is_better(metric: str, new: Optional[float], best: Optional[float]) -> bool:
    """Whether `new` improves on `best` under `metric`'s direction (an undefined value never does)."""
    if new is None:
        return False
    return best is None or (new > best if SELECTABLE[metric] == "max" else new < best)


def report(pred: Predictions, labels: Sequence[str], scorable: Optional[Sequence[str]] = None,
           n_boot: int = 1000, seed: int = 0) -> dict:
    """Per-label and macro metrics. `scorable` is the split's fixed macro label set (default: the labels with
    both classes in these targets); a scorable label left undefined here (a truncated evaluation) drops out of
    the macro, and "macro_labels" says which labels the macro figures average."""
    labels = list(labels)
    per: dict[str, dict] = {}
    for i, name in enumerate(labels):
        m = pred.mask[:, i].astype(bool)
        y, p = pred.targets[m, i], pred.probs[m, i]
        per[name] = {"auroc": _auroc(y, p), "auprc": stats.auprc(y, p),
                     "ece": stats.expected_calibration_error(y, p),
                     "sens_at_90_spec": stats.sensitivity_at_specificity(y, p, SPECIFICITY),
                     "n": int(m.sum()), "positives": int(y.sum())}
    if scorable is None:
        scorable = [n for n in labels if per[n]["auroc"] is not None]
    macro_labels = macro_label_set(pred, labels, scorable)
    idx = [labels.index(n) for n in macro_labels]
    boot = stats.auroc_ci(pred.probs, pred.targets, pred.mask, idx, pred.patient_ids or None, n_boot=n_boot,
                          seed=seed) if n_boot > 0 and len(pred.probs) else None
    for i, name in enumerate(labels):
        ci = boot["per_label"][i] if boot else None
        per[name]["auroc_ci"] = list(ci) if ci is not None else None
    flat = pred.mask.astype(bool)
    p = np.clip(pred.probs.astype(np.float64), 1e-7, 1 - 1e-7)  # the loss of the predicted path, per study
    nll = -(pred.targets * np.log(p) + (1 - pred.targets) * np.log1p(-p)) * flat
    out = {
        "labels": labels,
        "per_label": per,
        "auroc": {n: per[n]["auroc"] for n in labels},
        "macro_labels": macro_labels,
        "scorable_labels": list(scorable),
        "macro_auroc": _mean(per[n]["auroc"] for n in macro_labels),
        "macro_auroc_ci": list(boot["macro"]) if boot and boot["macro"] is not None else None,
        "macro_auprc": _mean(per[n]["auprc"] for n in macro_labels),
        "macro_ece": _mean(per[n]["ece"] for n in macro_labels),
        "macro_sens_at_90_spec": _mean(per[n]["sens_at_90_spec"] for n in macro_labels),
        "micro_auroc": _auroc(pred.targets[flat], pred.probs[flat]),
        "bce": float(nll.sum(1).mean()) if len(p) else None,
        "n": {n: per[n]["n"] for n in labels},
        "positives": {n: per[n]["positives"] for n in labels},
        "num_samples": int(pred.probs.shape[0]),
        "num_patients": len(set(pred.patient_ids)) if pred.patient_ids else int(pred.probs.shape[0]),
        "bootstrap": {k: v for k, v in boot.items() if k != "per_label"} if boot else None,
    }
    if set(CHEXPERT5) <= set(labels):  # the CheXpert competition five, only where the data set has them
        five = [per[n]["auroc"] for n in CHEXPERT5 if n in macro_labels]
        out["macro_auroc_chexpert5"] = _mean(five)
        out["chexpert5_labels"] = [n for n in CHEXPERT5 if n in macro_labels]
    return out


def format_table(rep: dict) -> str:
    """The printed table: per-label AUROC with its CI, AUPRC, counts; then the macro figures and what they average."""
    fmt = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    ci = lambda c: "" if c is None else f"[{c[0]:.3f}, {c[1]:.3f}]"  # noqa: E731
    width = max(28, 2 + max(len(n) for n in rep["labels"]))
    head = []
    if rep.get("checkpoint") or rep.get("split"):
        policy = rep.get("eval_policy") or {}
        head.append(f"split {rep.get('split', '?')} | checkpoint {rep.get('checkpoint', '?')} | eval policy: "
                    f"blank={policy.get('missing', '?')}, uncertain={policy.get('uncertain', '?')}")
    rows = [*head, f"{'label':<{width}}{'AUROC':>7}{'95% CI':>18}{'AUPRC':>7}{'n':>7}{'pos':>6}"]
    for name in rep["labels"]:
        p = rep["per_label"][name]
        note = "" if name in rep["macro_labels"] else "  (not in macro: one class)"
        rows.append(f"{name:<{width}}{fmt(p['auroc']):>7}{ci(p['auroc_ci']):>18}{fmt(p['auprc']):>7}{p['n']:>7}"
                    f"{p['positives']:>6}{note}")
    k = len(rep["macro_labels"])
    line = (f"macro AUROC {fmt(rep['macro_auroc'], 4)} {ci(rep['macro_auroc_ci'])} over {k} of "
            f"{len(rep['labels'])} labels")
    if "macro_auroc_chexpert5" in rep:
        line += f"   CheXpert-5 {fmt(rep['macro_auroc_chexpert5'], 4)}"
    rows.append(line)
    rows.append(f"macro AUPRC {fmt(rep['macro_auprc'], 4)}   ECE {fmt(rep['macro_ece'], 4)}   sens@90%spec "
                f"{fmt(rep['macro_sens_at_90_spec'], 4)}   micro AUROC {fmt(rep['micro_auroc'], 4)}   "
                f"samples {rep['num_samples']}   patients {rep['num_patients']}")
    return "\n".join(rows)
