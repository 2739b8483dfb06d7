"""The figures of an evaluation name what they show, and a reliability diagram says how many samples each of
its points rests on."""

import numpy as np

from vkd_dist.metrics import Predictions
from vkd_dist.plots import reliability_figure, roc_figure


def _predictions(n: int = 200) -> Predictions:
    rng = np.random.default_rng(0)
    probs = rng.uniform(size=(n, 2))
    targets = (rng.uniform(size=(n, 2)) < probs).astype(float)
    mask = np.ones((n, 2), bool)
    mask[:30, 1] = False  # 30 unscored entries of the second label
    return Predictions(probs, targets, mask, [f"k{i}" for i in range(n)], [f"p{i}" for i in range(n)])


def test_reliability_points_carry_their_bin_counts_and_figures_their_title():
    pred = _predictions()
    title = "runs/x: checkpoint best (step 400), split test"
    fig = reliability_figure(pred, ["A", "B"], n_bins=10, title=title)
    assert fig._suptitle.get_text() == title
    for ax, scored in zip(fig.axes, (200, 170)):
        counts = [int(t.get_text()) for t in ax.texts]
        assert len(counts) == 10 and sum(counts) == scored  # one number per non-empty bin, all samples counted
    assert roc_figure(pred, ["A", "B"], title=title)._suptitle.get_text() == title
