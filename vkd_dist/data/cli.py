"""`vkd-data`: build and convert data sets into the shard schema (see vkd_dist/data/schema.py)."""

from __future__ import annotations

import argparse
import sys

from vkd_dist.data.shards import Timer, summary_line


def _add_synthetic(sub) -> None:
    p = sub.add_parser("synthetic", help="generate the synthetic paired chest X-ray corpus")
    p.add_argument("--out", required=True)
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=500)
    p.add_argument("--num-test", type=int, default=500)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lesion-contrast", type=float, default=1.0, help="finding visibility multiplier")
    p.add_argument("--noise", type=float, default=1.0, help="image noise/texture multiplier")
    p.add_argument("--label-noise", type=float, default=0.05, help="chance the image disagrees with the report")
    p.add_argument("--prevalence-scale", type=float, default=1.0, help="multiplies every finding's base rate")
    p.add_argument("--samples-per-shard", type=int, default=250)
    p.add_argument("--image-format", choices=("jpg", "png"), default="jpg")
    p.add_argument("--workers", type=int, default=0, help="processes (0 = all cores)")
    p.set_defaults(func=_run_synthetic)


def _run_synthetic(args) -> int:
    from vkd_dist.data.synthetic import build_synthetic

    with Timer() as t:
        meta = build_synthetic(args.out, args.num_train, args.num_val, args.num_test, image_size=args.image_size,
                               seed=args.seed, lesion_contrast=args.lesion_contrast, noise=args.noise,
                               label_noise=args.label_noise, prevalence_scale=args.prevalence_scale,
                               samples_per_shard=args.samples_per_shard, workers=args.workers,
                               fmt=args.image_format)
    print(summary_line(meta, t.seconds))
    prev = meta["prevalence"]["train"]
    print("train prevalence: " + ", ".join(f"{k} {v:.2f}" for k, v in prev.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vkd-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_synthetic(sub)
    from vkd_dist.data.text_features import add_subcommand as _add_embed_text

    _add_embed_text(sub)
    try:  # converters for real data sets register their own subcommands
        from vkd_dist.data.sources import register_subcommands
    except ImportError:
        register_subcommands = None
    if register_subcommands:
        register_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
