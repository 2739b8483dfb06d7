"""AUROC family over the 14 labels, with the distributed gather done exactly once.

Each rank holds the predictions for the samples it evaluated (a disjoint set, see eval_loader);
`gather_predictions` concatenates them across ranks without padding duplicates, and the metrics are
computed on the gathered arrays.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from vkd_dist.labels import CHEXPERT5, LABELS


def gather_predictions(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray, keys: list[str]):
    """All ranks' (probs, targets, mask, keys), concatenated in rank order. No-op without a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
            or torch.distributed.get_world_size() == 1:
        return probs, targets, mask, keys
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, (probs, targets, mask, keys))
    probs = np.concatenate([p[0] for p in parts])
    targets = np.concatenate([p[1] for p in parts])
    mask = np.concatenate([p[2] for p in parts])
    keys = [k for p in parts for k in p[3]]
    if len(set(keys)) != len(keys):
        raise RuntimeError(f"evaluation saw {len(keys) - len(set(keys))} samples twice across ranks")
    return probs, targets, mask, keys


def _auroc(y: np.ndarray, p: np.ndarray) -> Optional[float]:
    if y.size == 0 or y.min() == y.max():
        return None  # undefined without both positives and negatives
    return float(roc_auc_score(y, p))


def auroc_report(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> dict:
    """Per-label AUROC over unmasked entries (None where undefined), macro over defined labels, macro over
    the CheXpert competition five, micro over all unmasked entries, and n (unmasked count) per label."""
    per: dict[str, Optional[float]] = {}
    n: dict[str, int] = {}
    pos: dict[str, int] = {}
    for i, name in enumerate(LABELS):
        m = mask[:, i].astype(bool)
        per[name] = _auroc(targets[m, i], probs[m, i])
        n[name] = int(m.sum())
        pos[name] = int(targets[m, i].sum())
    defined = [v for v in per.values() if v is not None]
    five = [per[k] for k in CHEXPERT5 if per[k] is not None]
    flat = mask.astype(bool)
    return {
        "auroc": per,
        "macro_auroc": float(np.mean(defined)) if defined else None,
        "macro_auroc_chexpert5": float(np.mean(five)) if five else None,
        "micro_auroc": _auroc(targets[flat], probs[flat]),
        "n": n,
        "positives": pos,
        "num_samples": int(probs.shape[0]),
    }


def format_table(report: dict) -> str:
    rows = [f"{'label':<28}{'AUROC':>8}{'n':>7}{'pos':>6}"]
    for name in LABELS:
        v = report["auroc"][name]
        rows.append(f"{name:<28}{('%.3f' % v) if v is not None else '   -  ':>8}{report['n'][name]:>7}"
                    f"{report['positives'][name]:>6}")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    rows.append(f"macro AUROC {fmt(report['macro_auroc'])}   CheXpert-5 {fmt(report['macro_auroc_chexpert5'])}"
                f"   micro {fmt(report['micro_auroc'])}   samples {report['num_samples']}")
    return "\n".join(rows)
