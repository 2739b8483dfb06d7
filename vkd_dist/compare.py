"""`vkd-compare --a RUN [RUN ...] --b RUN [RUN ...] --data DIR --split test --out C.json`: is arm a better than b?

Every run predicts the same samples of the split (image-only inference, the data set's evaluation policy).
The statistic is the difference in macro AUROC, a minus b, with each arm's seeds averaged, over the split's
fixed macro label set. Two kinds of noise move it: which patients the test set holds, and training itself (the
seed). With two or more seeds in each arm, the 95 % CI and two-sided p printed first (and written as `ci`,
`p_value`) count both: a t-interval whose variance is the seeds' (the per-seed deltas, runs paired by their
train.seed; Welch's per-arm spreads when the arms' seeds differ) plus the patient bootstrap's
(vkd_dist/stats.py `paired_delta`, `seed_and_patient_interval`). The patient bootstrap alone, one resample applied
to every run at once, is listed as "test-set noise only" (`test_noise_only`): it holds the trained models
fixed. With one seed in an arm, training randomness is not measured and the headline is that one, said so.
A bootstrap p with no resample on the far side of 0 is below what the resamples resolve: printed `p < 2/(B+1)`
and written with `p_value_is_bound: true`. Per-seed macro AUROCs, per-seed deltas and their paired t-interval
are listed too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from vkd_dist import RawDefaultsHelpFormatter

if TYPE_CHECKING:  # imported where used: `vkd-compare --help` answers before torch and scikit-learn load
    from vkd_dist.metrics import Predictions


def _predictions(run: str, info, split: str, which: str, batch_size: Optional[int]) -> Predictions:
    from vkd_dist.evaluate import load_exported, predict_split
    from vkd_dist.metrics import Predictions
    from vkd_dist.run_dir import RunDir

    RunDir(run).check_labels(info.labels, info.root)
    model, cfg, tokenizer = load_exported(run, which)
    if batch_size:
        cfg.data.eval_batch_size = batch_size
    pred = predict_split(model, cfg, info, split, tokenizer, None)
    order = np.argsort(np.asarray(pred.keys))  # the same sample order for every run
    return Predictions(pred.probs[order], pred.targets[order], pred.mask[order], [pred.keys[i] for i in order],
                       [pred.patient_ids[i] for i in order])


def _seeds(runs: Sequence[str]) -> list[int]:
    from vkd_dist.run_dir import RunDir

    return [RunDir(run).config().train.seed for run in runs]


def _pair_by_seed(a_runs: Sequence[str], b_runs: Sequence[str]) -> tuple[list[str], Optional[list[int]],
                                                                         Optional[list[int]], Optional[bool]]:
    """(b's runs in a's seed order, a's seeds, b's seeds, whether seed i of a pairs with seed i of b).
    Seeds are read only where both arms have two or more runs (below that no seed spread is measured, and one
    run per arm pairs trivially); they pair when both arms hold the same distinct seeds."""
    if len(a_runs) < 2 or len(b_runs) < 2:
        return list(b_runs), None, None, None
    seeds_a, seeds_b = _seeds(a_runs), _seeds(b_runs)
    if sorted(seeds_a) != sorted(seeds_b) or len(set(seeds_a)) != len(seeds_a):
        return list(b_runs), seeds_a, seeds_b, False
    by_seed = dict(zip(seeds_b, b_runs))
    return [by_seed[s] for s in seeds_a], seeds_a, list(seeds_a), True


def _listed(value):
    """Tuples (intervals) as JSON lists, in nested dicts too."""
    if isinstance(value, dict):
        return {k: _listed(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value


def compare(a_runs: Sequence[str], b_runs: Sequence[str], data: str, split: str = "test", which: str = "best",
            n_boot: int = 1000, seed: int = 0, batch_size: Optional[int] = None) -> dict:
    from vkd_dist import stats
    from vkd_dist.data.schema import read_dataset
    from vkd_dist.metrics import macro_label_set

    info = read_dataset(data)
    info.split(split)
    b_runs, seeds_a, seeds_b, paired = _pair_by_seed(a_runs, b_runs)
    preds = {run: _predictions(run, info, split, which, batch_size) for run in [*a_runs, *b_runs]}
    ref = preds[a_runs[0]]
    for run, p in preds.items():
        if p.keys != ref.keys:
            raise RuntimeError(f"{run} predicted other samples than {a_runs[0]} on {data} {split}")
    macro_labels = macro_label_set(ref, info.labels, info.scorable_labels(split))  # as vkd-eval's macro
    idx = [info.labels.index(n) for n in macro_labels]
    result = stats.paired_delta([preds[r].probs for r in a_runs], [preds[r].probs for r in b_runs], ref.targets,
                                ref.mask, idx, ref.patient_ids, n_boot=n_boot, seed=seed, seeds_paired=paired)
    return _listed({
        "a": list(a_runs), "b": list(b_runs), "data": str(info.root), "split": split, "checkpoint": which,
        "eval_policy": info.eval_policy.to_dict(), "macro_labels": macro_labels,
        "num_samples": len(ref.keys), "num_patients": len(set(ref.patient_ids)),
        "delta_macro_auroc": result["delta"],
        # the headline: seeds and test patients with 2+ seeds per arm, else test-set noise only ("interval")
        "ci": result["ci"], "p_value": result["p_value"], "p_value_is_bound": result["p_value_is_bound"],
        "interval": result["interval"], "se": result["se"],
        "df": result["df"] if result["df"] is None or np.isfinite(result["df"]) else None,  # inf: strict JSON lacks it
        "test_noise_only": result["test_noise_only"], "seed_t_interval": result["seed_t_interval"],
        "seeds_a": seeds_a, "seeds_b": seeds_b, "seeds_paired": result["seeds_paired"],
        "macro_auroc_a": result["macro_a"], "macro_auroc_b": result["macro_b"],
        "per_seed_delta": result["per_seed_delta"],
        "bootstrap": {"resamples": result["resamples"], "valid": result["valid_resamples"], "seed": seed,
                      "unit": "patient", "level": 0.95},
    })


def p_text(p_value: float, is_bound: bool) -> str:
    """`p = 0.17`, or `p < 0.002` where the bootstrap resolves no smaller p (the bound, to 3 digits)."""
    return f"p < {p_value:.3g}" if is_bound else f"p = {p_value:.3g}"


def _ci(ci) -> str:
    return f"95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}]"


def _seed_note(r: dict) -> str:
    """How the headline treats seeds."""
    if r["interval"] != "seeds and test patients":
        few = [arm for arm in ("a", "b") if len(r[arm]) < 2]
        return f"test-set noise only (one seed in {' and '.join(few)}: training randomness not measured)"
    how = (f"{len(r['a'])} seeds paired by train.seed" if r["seeds_paired"] else
           f"the arms' seeds differ ({r['seeds_a']} / {r['seeds_b']}): each arm's seed spread counted (Welch)")
    tails = f"t on {r['df']:.1f} df" if r["df"] is not None else "normal: the seeds do not differ"
    return f"over seeds and test patients ({how}; {tails})"


def _interval(r: dict) -> str:
    """The headline CI and p-value of a comparison, then the test-set-noise-only one, or why they are undefined
    (no resample kept both classes of every macro label; the macro labels have both among the samples, so the
    delta itself is defined)."""
    if r["ci"] is None:
        return (f"CI undefined (none of the {r['bootstrap']['resamples']} paired patient resamples kept a positive "
                "and a negative of every macro label: too few positives or negatives)")
    noise = r["test_noise_only"]
    resamples = (f"{r['bootstrap']['valid']} of {r['bootstrap']['resamples']} paired patient resamples"
                 + ("; none on the far side of 0" if noise["p_value_is_bound"] else ""))
    head = f"{_ci(r['ci'])}  {p_text(r['p_value'], r['p_value_is_bound'])}  {_seed_note(r)}"
    if r["interval"] != "seeds and test patients":
        return f"{head} ({resamples})"
    return (f"{head}\n  test-set noise only (the trained models fixed): {_ci(noise['ci'])}  "
            f"{p_text(noise['p_value'], noise['p_value_is_bound'])}  ({resamples})")


def format_result(r: dict) -> str:
    mean = lambda v: float(np.mean(v))  # noqa: E731
    lines = [f"{r['split']} split of {r['data']}, checkpoint {r['checkpoint']}, {r['num_samples']} samples / "
             f"{r['num_patients']} patients, macro over {len(r['macro_labels'])} labels",
             f"a ({len(r['a'])} runs): macro AUROC {mean(r['macro_auroc_a']):.4f}  per seed "
             + ", ".join(f"{v:.4f}" for v in r["macro_auroc_a"]),
             f"b ({len(r['b'])} runs): macro AUROC {mean(r['macro_auroc_b']):.4f}  per seed "
             + ", ".join(f"{v:.4f}" for v in r["macro_auroc_b"]),
             f"delta (a - b) {r['delta_macro_auroc']:+.4f}  " + _interval(r)]
    if r["per_seed_delta"] is not None:
        lines.append("per-seed deltas: " + ", ".join(f"{v:+.4f}" for v in r["per_seed_delta"]))
    seed_t = r["seed_t_interval"]
    if seed_t is not None:
        lines.append(f"  seeds only, paired t over the per-seed deltas (the test set fixed): {_ci(seed_t['ci'])}  "
                     f"{p_text(seed_t['p_value'], False)}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vkd-compare", description=__doc__,
                                     formatter_class=RawDefaultsHelpFormatter)
    parser.add_argument("--a", nargs="+", required=True, metavar="RUN", help="run directories of arm a (seeds)")
    parser.add_argument("--b", nargs="+", required=True, metavar="RUN", help="run directories of arm b (seeds)")
    parser.add_argument("--data", help="shard directory (default: the first run's data.path)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--checkpoint", default="best", choices=("best", "final", "last"))
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired patient-bootstrap resamples (B)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--out", help="write the comparison JSON here")
    args = parser.parse_args(argv)
    try:
        from vkd_dist.evaluate import check_run_dir, run_dataset

        # the first run's data set unless --data names one; a missing one said with where it was looked for
        data = args.data or str(run_dataset(check_run_dir(args.a[0], "--a")).root)
        result = compare(args.a, args.b, data, args.split, args.checkpoint, args.bootstrap, args.seed,
                         args.batch_size)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"vkd-compare: error: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}",
              file=sys.stderr)
        return 2
    print(format_result(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
