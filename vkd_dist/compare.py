"""`vkd-compare --a RUN [RUN ...] --b RUN [RUN ...] --data DIR --split test --out C.json`: is arm a better than b?

Every run predicts the same samples of the split (image-only inference, the data set's evaluation policy).
The statistic is the difference in macro AUROC, a minus b, with each arm's seeds averaged, over the split's
fixed macro label set. Its 95 % CI and two-sided p-value come from one patient bootstrap applied to every run
at once (vkd_dist/stats.py `paired_delta`), so the sampling noise the arms share cancels. Per-seed macro
AUROCs, and per-seed deltas when the arms have as many seeds, are listed too.
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


def compare(a_runs: Sequence[str], b_runs: Sequence[str], data: str, split: str = "test", which: str = "best",
            n_boot: int = 1000, seed: int = 0, batch_size: Optional[int] = None) -> dict:
    from vkd_dist import stats
    from vkd_dist.data.schema import read_dataset
    from vkd_dist.metrics import macro_label_set

    info = read_dataset(data)
    info.split(split)
    preds = {run: _predictions(run, info, split, which, batch_size) for run in [*a_runs, *b_runs]}
    ref = preds[a_runs[0]]
    for run, p in preds.items():
        if p.keys != ref.keys:
            raise RuntimeError(f"{run} predicted other samples than {a_runs[0]} on {data} {split}")
    macro_labels = macro_label_set(ref, info.labels, info.scorable_labels(split))  # as vkd-eval's macro
    idx = [info.labels.index(n) for n in macro_labels]
    result = stats.paired_delta([preds[r].probs for r in a_runs], [preds[r].probs for r in b_runs], ref.targets,
                                ref.mask, idx, ref.patient_ids, n_boot=n_boot, seed=seed)
    return {
        "a": list(a_runs), "b": list(b_runs), "data": str(info.root), "split": split, "checkpoint": which,
        "eval_policy": info.eval_policy.to_dict(), "macro_labels": macro_labels,
        "num_samples": len(ref.keys), "num_patients": len(set(ref.patient_ids)),
        "delta_macro_auroc": result["delta"], "p_value": result["p_value"],
        "ci": None if result["ci"] is None else list(result["ci"]),  # None: undefined, format_result says why
        "macro_auroc_a": result["macro_a"], "macro_auroc_b": result["macro_b"],
        "per_seed_delta": result["per_seed_delta"],
        "bootstrap": {"resamples": result["resamples"], "valid": result["valid_resamples"], "seed": seed,
                      "unit": "patient", "level": 0.95},
    }


def _interval(r: dict) -> str:
    """The CI and p-value of a comparison, or why they are undefined (no resample kept both classes of every
    macro label; the macro labels have both among the samples, so the delta itself is defined)."""
    if r["ci"] is None:
        return (f"CI undefined (none of the {r['bootstrap']['resamples']} paired patient resamples kept a positive "
                "and a negative of every macro label: too few positives or negatives)")
    return (f"95% CI [{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]  p = {r['p_value']:.4g}  ({r['bootstrap']['valid']} "
            f"of {r['bootstrap']['resamples']} paired patient resamples)")


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
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vkd-compare", description=__doc__,
                                     formatter_class=RawDefaultsHelpFormatter)
    parser.add_argument("--a", nargs="+", required=True, metavar="RUN", help="run directories of arm a (seeds)")
    parser.add_argument("--b", nargs="+", required=True, metavar="RUN", help="run directories of arm b (seeds)")
    parser.add_argument("--data", help="shard directory (default: the first run's data.path)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--checkpoint", default="best", choices=("best", "final", "last"))
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired patient-bootstrap resamples")
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
