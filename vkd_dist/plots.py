"""ROC curves and reliability diagrams of a split's predictions (matplotlib, headless), for `vkd-eval --plots`
and TensorBoard. Each figure's title names what it shows (run, checkpoint, split); a reliability diagram writes
each bin's number of samples beside its point, so a point resting on three samples is seen as such."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from vkd_dist import stats  # noqa: E402


def _scored(pred, i: int) -> tuple[np.ndarray, np.ndarray]:
    m = pred.mask[:, i].astype(bool)
    return pred.targets[m, i], pred.probs[m, i]


def _grid(n: int, title: str):
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows + (0.4 if title else 0)), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig, axes.flat


def roc_figure(pred, labels: Sequence[str], title: str = ""):
    """One ROC panel per label with both classes (the others say so)."""
    fig, axes = _grid(len(labels), title)
    for i, (name, ax) in enumerate(zip(labels, axes)):
        y, p = _scored(pred, i)
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8)
        if y.size and y.min() != y.max():
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, lw=1.5)
            ax.set_title(f"{name}\nAUROC {roc_auc_score(y, p):.3f} (n={y.size})", fontsize=8)
        else:
            ax.set_title(f"{name}\none class: no ROC", fontsize=8)
        ax.set_xlabel("1 - specificity", fontsize=7)
        ax.set_ylabel("sensitivity", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    return fig


def reliability_figure(pred, labels: Sequence[str], n_bins: int = 10, title: str = ""):
    """One reliability diagram per label: observed positive fraction against mean predicted probability, each
    point labelled with its bin's number of samples."""
    fig, axes = _grid(len(labels), title)
    for i, (name, ax) in enumerate(zip(labels, axes)):
        y, p = _scored(pred, i)
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8)
        if y.size:
            rel = stats.reliability(y, p, n_bins)
            counts = np.asarray(rel["count"])
            used = counts > 0
            x, y_obs = np.asarray(rel["mean_pred"])[used], np.asarray(rel["frac_pos"])[used]
            ax.plot(x, y_obs, marker="o", ms=3)
            for xi, yi, n in zip(x, y_obs, counts[used]):
                ax.annotate(str(int(n)), (xi, yi), textcoords="offset points", xytext=(2, 3), fontsize=5)
            ece = stats.expected_calibration_error(y, p, n_bins)
            ax.set_title(f"{name}\nECE {ece:.3f} (n={y.size})", fontsize=8)
        else:
            ax.set_title(f"{name}\nno scored samples", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean predicted", fontsize=7)
        ax.set_ylabel("fraction positive (n per bin)", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    return fig


def save_plots(pred, labels: Sequence[str], out_dir: str | Path, title: str = "") -> list[Path]:
    """roc.png and reliability.png in `out_dir`, titled `title` (e.g. the run, checkpoint and split)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, make in (("roc.png", roc_figure), ("reliability.png", reliability_figure)):
        fig = make(pred, labels, title=title)
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        paths.append(out_dir / name)
    return paths
