"""Seed-level statistics for the comparisons that docs/evidence.md publishes, from the figures it lists:
`python -m benchmarks.study.seed_stats` prints the table that docs/evidence.md shows.

vkd-compare now puts training randomness into its headline interval (vkd_dist.stats.paired_delta). The published
studies' run directories are not at hand, so their comparisons are re-derived here from what the tables list,
with the same functions vkd-compare uses:
- where the per-seed deltas are listed: the paired t-interval over seeds (the test set fixed), and the headline,
  which adds the patient bootstrap's variance (read off the published test-set-noise-only CI as
  ((hi - lo) / 2 / 1.96)^2), on the seeds' degrees of freedom (stats.seed_and_patient_interval);
- where only each arm's mean and 95 % t-interval over its seeds are listed: each arm's seed sd from its interval
  (half-width x sqrt(S) / t(0.975, S - 1)) and Welch's interval for the difference, unpaired (the pairing by seed
  is not in the table), with and without the patient variance.
The inputs are the tables' 3-decimal figures, so the outputs are good to about +-0.001.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from benchmarks.study.results import ci_text
from vkd_dist.stats import seed_and_patient_interval, t_interval

SEEDS = 5


@dataclass(frozen=True)
class Published:
    """One comparison as docs/evidence.md lists it."""

    study: str
    regime: str
    a: str
    b: str
    delta: float  # the published delta, each arm's 5 seeds averaged
    noise_ci: tuple[float, float]  # the published paired patient-bootstrap CI: test-set noise only
    noise_p: str  # its published p, "p < 0.002" where no resample of 1,000 fell on the far side of 0
    per_seed_delta: Optional[tuple[float, ...]] = None
    arm_a: Optional[tuple[float, float, float]] = None  # mean, lo, hi of a's t-interval over seeds
    arm_b: Optional[tuple[float, float, float]] = None


EVIDENCE = "2026-12-02"
MASK = "2026-11-30"
IMAGE_ONLY_L01, IMAGE_ONLY_N2000 = (0.565, 0.556, 0.574), (0.695, 0.681, 0.710)
PUBLISHED = [
    Published(EVIDENCE, "labels0.1", "kd", "image_only", 0.056, (0.043, 0.068), "p < 0.002",
              arm_a=(0.620, 0.594, 0.646), arm_b=IMAGE_ONLY_L01),
    Published(EVIDENCE, "labels0.1", "vkd", "image_only", -0.007, (-0.015, 0.001), "p = 0.098",
              arm_a=(0.558, 0.531, 0.584), arm_b=IMAGE_ONLY_L01),
    Published(EVIDENCE, "labels0.1", "vkd_distil", "image_only", 0.072, (0.060, 0.084), "p < 0.002",
              arm_a=(0.637, 0.617, 0.657), arm_b=IMAGE_ONLY_L01),
    Published(EVIDENCE, "labels0.1", "vkd_distil", "kd", 0.016, (0.009, 0.024), "p < 0.002",
              per_seed_delta=(0.010, -0.009, 0.004, 0.047, 0.030)),
    Published(EVIDENCE, "n2000", "kd", "image_only", -0.037, (-0.046, -0.029), "p < 0.002",
              arm_a=(0.658, 0.634, 0.683), arm_b=IMAGE_ONLY_N2000),
    Published(EVIDENCE, "n2000", "vkd", "image_only", -0.026, (-0.037, -0.016), "p < 0.002",
              arm_a=(0.669, 0.659, 0.679), arm_b=IMAGE_ONLY_N2000),
    Published(EVIDENCE, "n2000", "vkd_distil", "image_only", -0.024, (-0.035, -0.013), "p < 0.002",
              arm_a=(0.671, 0.657, 0.685), arm_b=IMAGE_ONLY_N2000),
    Published(MASK, "contrast0.5", "vkd", "image_only", -0.013, (-0.023, -0.002), "p = 0.026",
              per_seed_delta=(0.004, 0.014, -0.045, -0.008, -0.029)),
    Published(MASK, "n2000", "vkd", "image_only", -0.025, (-0.033, -0.016), "p < 0.002",
              per_seed_delta=(-0.029, -0.019, -0.045, -0.024, -0.007)),
]


def _patient_var(ci: tuple[float, float]) -> float:
    """The patient bootstrap's variance, read off its 95 % percentile CI as a normal interval."""
    return ((ci[1] - ci[0]) / 2 / 1.959964) ** 2


def _arm_var(arm: tuple[float, float, float], seeds: int = SEEDS) -> float:
    """The variance of an arm's seed mean, from its 95 % t-interval over seeds."""
    from scipy.stats import t

    sd = (arm[2] - arm[1]) / 2 * math.sqrt(seeds) / float(t.ppf(0.975, seeds - 1))
    return sd * sd / seeds


def derive(c: Published) -> dict:
    """{"method", "seeds_only": {"ci", "p_value"}, "headline": {"ci", "p_value", "df"}} for one comparison."""
    if c.per_seed_delta is not None:
        seeds = t_interval(c.per_seed_delta)
        terms = [(seeds["se"] ** 2, seeds["df"])]
        delta, method = seeds["mean"], "paired t over its 5 per-seed deltas"
        seeds_only = {"ci": seeds["ci"], "p_value": seeds["p_value"]}
    elif c.arm_a is not None and c.arm_b is not None:
        terms = [(_arm_var(c.arm_a), SEEDS - 1), (_arm_var(c.arm_b), SEEDS - 1)]
        delta, method = c.delta, "Welch (unpaired), from each arm's t-interval over 5 seeds"
        seeds_only = seed_and_patient_interval(delta, terms, 0.0)
    else:
        raise ValueError(f"{c.regime} {c.a} - {c.b}: neither per-seed deltas nor both arms' intervals")
    headline = seed_and_patient_interval(delta, terms, _patient_var(c.noise_ci))
    return {"delta": delta, "method": method, "seeds_only": seeds_only, "headline": headline}


def table(rows: list[Published] = PUBLISHED) -> str:
    lines = ["| study | regime | a - b | delta | over seeds and test patients: 95 % CI, p | seeds only: 95 % CI, p "
             "| test-set noise only (measured): 95 % CI, p | seeds counted by |", "|---|---|---|---|---|---|---|---|"]
    for c in rows:
        d = derive(c)
        head, seeds = d["headline"], d["seeds_only"]
        lines.append(f"| {c.study} | `{c.regime}` | {c.a} - {c.b} | {d['delta']:+.3f} | {ci_text(head['ci'], True)}, "
                     f"p = {head['p_value']:.2g} | {ci_text(seeds['ci'], True)}, p = {seeds['p_value']:.2g} "
                     f"| {ci_text(c.noise_ci, True)}, {c.noise_p} | {d['method']} |")
    return "\n".join(lines)


def main() -> int:
    print(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
