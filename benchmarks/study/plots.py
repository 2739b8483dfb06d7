"""The study's figures (benchmarks.study): test macro AUROC against one corpus knob, a line and a 95 % band over
seeds per arm, from study.json's summaries."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

PLOTS = {"num_train": ("auroc_vs_train_size.png", "training-set size (studies)"),
         "label_noise": ("auroc_vs_label_noise.png", "label noise (fraction of findings the image does not show)"),
         "lesion_contrast": ("auroc_vs_lesion_contrast.png", "lesion contrast"),
         "label_fraction": ("auroc_vs_label_fraction.png", "labelled fraction of the training studies")}
LOG_AXIS = ("num_train", "label_fraction")


def plot_knob(study: dict, out: Path, knob: str, title: str) -> Optional[str]:
    """Test macro AUROC against one knob (regimes where only it moves off the base), a line and band per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid, base = study["grid"], study["grid"]["base"]
    points = sorted((k[knob], name) for name, k in grid["regimes"].items()
                    if set(k) == set(base) and all(k[o] == base[o] for o in base if o != knob))  # not a testbed
    if not points or (knob != "num_train" and len({x for x, _ in points}) < 2):
        return None
    rows = {(s["regime"], s["arm"]): s for s in study["summaries"]}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arm in grid["arms"]:
        got = [(x, rows[(name, arm)]) for x, name in points if rows[(name, arm)]["mean"] is not None]
        if not got:
            continue
        xs = np.array([x for x, _ in got], dtype=float)
        report = got[0][1]["reads_report"]
        (line,) = ax.plot(xs, [s["mean"] for _, s in got], marker="o", linestyle="--" if report else "-",
                          label=f"{arm} (reads the report)" if report else arm)
        lo = np.array([s["ci95"][0] if s["ci95"] else np.nan for _, s in got])
        hi = np.array([s["ci95"][1] if s["ci95"] else np.nan for _, s in got])
        if len(xs) > 1:
            ax.fill_between(xs, lo, hi, where=~np.isnan(lo), color=line.get_color(), alpha=0.2, linewidth=0)
        elif not np.isnan(lo[0]):  # one point: no band to shade
            ax.errorbar(xs, [got[0][1]["mean"]], yerr=[[got[0][1]["mean"] - lo[0]], [hi[0] - got[0][1]["mean"]]],
                        color=line.get_color(), capsize=4)
    if knob in LOG_AXIS:
        ax.set_xscale("log")
        ax.set_xticks([x for x, _ in points], [f"{x:g}" for x, _ in points])
        ax.minorticks_off()
    ax.set_xlabel(PLOTS[knob][1])
    ax.set_ylabel("test macro AUROC (mean, 95 % CI over seeds)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOTS[knob][0], dpi=110)
    plt.close(fig)
    return PLOTS[knob][0]
