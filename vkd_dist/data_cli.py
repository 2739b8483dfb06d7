"""`vkd-data`: build and convert data sets into the shard schema (see vkd_dist/data/schema.py)."""

from __future__ import annotations

import argparse
import os
import sys

from vkd_dist import DefaultsHelpFormatter
from vkd_dist.fileio import restrict_access
from vkd_dist.labels import SOURCE_EVAL_POLICY, describe_policy


def _add_synthetic(sub) -> None:
    p = sub.add_parser("synthetic", help="generate the synthetic paired chest X-ray corpus",
                       description="Render the synthetic corpus (vkd_dist/data/synthetic.py): chest-radiograph-like "
                                   "images with paired reports; labels come from the reports. Same arguments, "
                                   "same bytes.")
    p.add_argument("--out", required=True,
                   help="output directory: shards per split + dataset.json (a rerun with the same arguments "
                        "keeps finished shards)")
    p.add_argument("--num-train", type=int, default=2000, help="samples (one patient each) in the train split")
    p.add_argument("--num-val", type=int, default=500, help="samples in the val split")
    p.add_argument("--num-test", type=int, default=500, help="samples in the test split")
    p.add_argument("--image-size", type=int, default=256, help="side of the square images in pixels")
    p.add_argument("--seed", type=int, default=0,
                   help="every sample is drawn from a generator seeded by (seed, split, index)")
    p.add_argument("--lesion-contrast", type=float, default=1.0,
                   help="multiplies how visible each finding is in the image (the reports are unchanged)")
    p.add_argument("--noise", type=float, default=1.0,
                   help="multiplies the image's quantum noise and lung-marking texture")
    p.add_argument("--label-noise", type=float, default=0.05,
                   help="chance a reported finding is not drawn in the image; a fifth of it: an unmentioned "
                        "finding is drawn")
    p.add_argument("--prevalence-scale", type=float, default=1.0,
                   help="multiplies every finding's base rate (each capped at 0.9)")
    p.add_argument("--label-fraction", type=float, default=1.0,
                   help="fraction of training studies that keep their labels (0 < F <= 1); the others keep image "
                        "and report but have no labels at all (reports for every study, labels for few). A seeded, "
                        "nested choice; val and test keep every label")
    p.add_argument("--label-seed", type=int, default=None,
                   help="seed of which training studies keep their labels (default: --seed): another labelled "
                        "subset of the same images and reports")
    t = p.add_argument_group("the observation testbed (vkd_dist/data/testbed.py; docs/data.md)")
    t.add_argument("--testbed", action="store_true",
                   help="a true finding state draws the image and a radiologist's report observes it with the rates "
                        "below; training labels are the report labeller's reading (or, for --gold-fraction, the "
                        "truth), val and test labels the truth (--label-noise is not used); needs medspaCy")
    t.add_argument("--miss-rate", type=float, default=0.1,
                   help="mean chance a present finding goes unreported (2 x this x (1 - severity): subtle ones more)")
    t.add_argument("--false-rate", type=float, default=0.02, help="chance an absent finding is reported")
    t.add_argument("--hedge-rate", type=float, default=0.15,
                   help="chance a reported finding is hedged ('possible', 'cannot exclude')")
    t.add_argument("--gold-fraction", type=float, default=0.0,
                   help="share of the labelled training studies labelled with the true state")
    p.add_argument("--samples-per-shard", type=int, default=250, help="samples per tar shard")
    p.add_argument("--image-format", choices=("jpg", "png"), default="jpg", help="image encoding in the shards")
    p.add_argument("--workers", type=int, default=0, help="rendering processes (0 = all cores)")
    p.set_defaults(func=_run_synthetic)


KNOBS = ("num_train", "num_val", "num_test", "image_size", "seed", "lesion_contrast", "noise", "label_noise",
         "prevalence_scale", "label_fraction", "label_seed", "testbed", "miss_rate", "false_rate", "hedge_rate",
         "gold_fraction")


def _run_synthetic(args) -> int:
    from vkd_dist.data.shards import Timer, summary_line  # webdataset: imported once a command runs
    from vkd_dist.data.testbed import build_corpus, rates_line

    with Timer() as t:
        meta = build_corpus(args.out, {k: getattr(args, k) for k in KNOBS}, samples_per_shard=args.samples_per_shard,
                            workers=args.workers, fmt=args.image_format, progress=True)
    print(summary_line(meta, t.seconds))
    if args.testbed:
        print(rates_line(meta))
    prev = meta["prevalence"]["train"]
    print("train prevalence: " + ", ".join(f"{k} {v:.2f}" for k, v in prev.items()))
    return 0


def _add_label(sub) -> None:
    p = sub.add_parser("label", help="relabel a converted corpus with the report labeller (labels for every report)",
                       description="Copy the corpus at --data into --out with the labels of --splits read off each "
                                   "report by the rule-based labeller (vkd_dist/data/labeller.py: medspaCy ConText, "
                                   "synonyms per label); studies without labels get them too. Other splits, images "
                                   "and reports are copied unchanged; uncertain readings (-1) follow the data set's "
                                   "label policy. Needs medspaCy (scripts/setup.sh installs it).")
    p.add_argument("--data", required=True, help="a converted corpus (a folder with dataset.json)")
    p.add_argument("--out", required=True, help="where the relabelled copy goes")
    p.add_argument("--splits", default="train", help="comma-separated splits to relabel")
    p.set_defaults(func=_run_label)


def _run_label(args) -> int:
    from vkd_dist.data.relabel import label_corpus
    from vkd_dist.data.shards import Timer, summary_line

    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    with Timer() as t:
        meta = label_corpus(args.data, args.out, splits)
    print(summary_line(meta, t.seconds))
    for split in splits:
        prevalence = meta["prevalence"][split].items()
        print(f"{split} prevalence (labeller): " + ", ".join(f"{k} {v:.2f}" for k, v in prevalence))
    return 0


def _add_embed_text(sub) -> None:
    p = sub.add_parser("embed-text", help="precompute the frozen text encoder's outputs into a sidecar of the shards",
                       description="Run the (frozen) text encoder of a training config over every report of the "
                                   "splits into DATA/text_features/<fingerprint> (vkd_dist/data/text_features.py).")
    p.add_argument("--config", help="training config (default: configs/default.yaml)")
    p.add_argument("--splits", nargs="+", default=None, help="default: the config's train, val and test splits")
    p.add_argument("--out", help="sidecar root (default: DATA/text_features)")
    p.add_argument("--batch-size", type=int, default=64, help="reports per text-encoder forward pass")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, as for vkd-train")
    p.set_defaults(func=_run_embed_text)


def _run_embed_text(args) -> int:
    # Builds the data set, tokenizer and text encoder as vkd-train does, so it reaches above data/ (on use);
    # text_features.py itself only writes and reads sidecars.
    import torch

    from vkd_dist.configure import ConfigError, load_config
    from vkd_dist.data.text_features import sidecar_summary, write_sidecar
    from vkd_dist.models.encoders import build_text_encoder
    from vkd_dist.prepare import ensure_dataset, resolve_tokenizer

    overrides = [o for o in args.overrides if not o.startswith("data.text_features=")] + ["data.text_features=null"]
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"vkd-data embed-text: config error: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(cfg.train.seed)  # a random tiny-bert is reproducible; real use: a local pretrained encoder
    info = ensure_dataset(cfg)
    tokenizer = resolve_tokenizer(cfg, info)
    encoder = build_text_encoder(cfg.model, len(tokenizer))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    splits = args.splits or [cfg.data.train_split, cfg.data.val_split, cfg.data.test_split]
    out = write_sidecar(encoder, tokenizer, info, splits, cfg.data.max_text_len, cfg.model.text_pooling, args.out,
                        args.batch_size, device, source=cfg.model.text_encoder)
    print(f"{sidecar_summary(out)} in {out}\ntrain with: data.text_features={out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vkd-data", description=__doc__, formatter_class=DefaultsHelpFormatter,
                                     epilog="A user error (bad path, column or value) prints one line and exits "
                                            "2; VKD_DEBUG=1 shows its traceback.")
    parser.add_argument("--shared-group", metavar="GROUP",
                        help="a group that may read what this writes (0750 directories, 0640 files, --out given to "
                             "GROUP); default: owner only (0700, 0600)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_synthetic(sub)
    _add_label(sub)
    _add_embed_text(sub)
    try:  # converters for real data sets register their own subcommands
        from vkd_dist.data.sources import register_subcommands
    except ImportError:
        pass
    else:
        register_subcommands(sub)
    for name, subparser in sub.choices.items():  # add_parser does not pass the parent's formatter_class on
        subparser.formatter_class = DefaultsHelpFormatter
        if name in SOURCE_EVAL_POLICY:
            subparser.epilog = describe_policy(name)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        restrict_access(getattr(args, "out", None), args.shared_group, "--shared-group")  # shards hold reports
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # a user error (bad column, path, value): one line, no traceback
        if os.environ.get("VKD_DEBUG") == "1":
            raise
        message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        print(f"vkd-data: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
