"""Converters from real data sets into the shard schema (vkd_dist/data/schema.py).

  vkd-data mimic-cxr  MIMIC-CXR-JPG v2 tree + reports (zip or tree)      -> sources/mimic_cxr.py
  vkd-data openi      OpenI / Indiana XML reports (dir or .tgz) + PNGs  -> sources/openi.py
  vkd-data manifest   a generic CSV (image, text, labels, patient)       -> sources/manifest.py

Every converter plans its items (one per output sample) in the parent process, deterministically
sorted, records items it cannot use as Rejects (rejects.csv, counted in dataset.json), then builds
shards in parallel with `write_split` (atomic, resumable, byte-identical on a rerun). Items filtered
by choice (e.g. a lateral view under --views PA,AP) are not rejects; their counts are in
dataset.json `params.counts`. A rerun keeps finished shards only when the inputs' plan and all
parameters are unchanged (the fingerprint covers both); image files replaced in place are not
detected - convert into a fresh --out after changing source files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from vkd_dist.labels import LABELS, EvalPolicy

SPLIT_NAMES = ("train", "val", "test")
LABEL_TEXT = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "-1": -1, "-1.0": -1, "": None, "nan": None, "NaN": None}


@dataclass(frozen=True)
class ConvertOptions:
    """What every converter shares: output image sizing and format, text policies, parallelism."""

    image_size: int = 256
    resize: str = "crop"  # crop | pad | keep-aspect (vkd_dist/data/images.py)
    fmt: str = "jpg"
    deid: str = "keep"  # keep | token (vkd_dist/data/reports.py)
    deid_token: str = "[DEID]"
    empty_report: str = "skip"  # skip (Reject "empty_report") | keep (sample with text "")
    min_side: int = 32

    def check(self) -> None:
        from vkd_dist.data.images import RESIZE_MODES
        from vkd_dist.data.reports import DEID_MODES, EMPTY_POLICIES

        if self.image_size < 8:
            raise ValueError(f"--image-size must be >= 8, got {self.image_size}")
        for name, value, allowed in (("--resize", self.resize, RESIZE_MODES), ("--deid", self.deid, DEID_MODES),
                                     ("--empty-report", self.empty_report, EMPTY_POLICIES),
                                     ("--image-format", self.fmt, ("jpg", "png"))):
            if value not in allowed:
                raise ValueError(f"{name}: got {value!r}, expected one of {', '.join(allowed)}")


def parse_label(value: Optional[str], where: str) -> Optional[int]:
    """A CSV label cell (1.0 / 0.0 / -1.0 / blank, or 1 / 0 / -1) -> 1 | 0 | -1 | None."""
    text = "" if value is None else str(value).strip()
    if text in LABEL_TEXT:
        return LABEL_TEXT[text]
    raise ValueError(f"{where}: label value {text!r} (expected 1.0, 0.0, -1.0 or blank)")


def hash_unit(key: str, seed: int = 0) -> float:
    """A stable uniform number in [0, 1) from a string: the same on every machine and Python version."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def hash_split(patient_id: str, val_frac: float, test_frac: float, seed: int = 0) -> str:
    """Deterministic patient-level split: every item of a patient lands in the same split, and adding
    patients never moves existing ones."""
    u = hash_unit(str(patient_id), seed)
    return "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"


def check_fractions(val_frac: float, test_frac: float) -> None:
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"--val-frac {val_frac} and --test-frac {test_frac}: each must be in [0, 1) and their "
                         "sum below 1")


def hash_split_fix(split: str, frac: float, patients: int, seed: int) -> Optional[str]:
    """The fix for an empty `split` of a patient hash split, or None when --SPLIT-frac 0 asked for none."""
    if frac == 0:
        return None
    return (f"the patient hash split put none of the {patients} patient(s) in it (--{split}-frac {frac:g}, --seed "
            f"{seed}): raise --{split}-frac, or try another --seed; --{split}-frac 0 converts without a {split} "
            "split on purpose")


def require_eval_splits(items_by_split: dict, rejects: Sequence, fix: Callable[[str], Optional[str]]) -> None:
    """Refuse a conversion whose validation or test split came out empty (training validates and tests on them),
    saying how to fix it: `fix(split)` names the flag, or returns None when the user asked for no such split."""
    total = sum(len(v) for v in items_by_split.values())
    for split in ("val", "test"):
        if items_by_split.get(split):
            continue
        how = fix(split)
        if how is None:
            continue
        lost = sum(r.split == split for r in rejects)
        why = f"; {lost} of its item(s) were rejected (rejects.csv says why)" if lost else ""
        raise ValueError(f"the {split} split would be empty ({total} sample(s) planned, none in {split}; "
                         f"vkd-train validates and tests on it): {how}{why}")


def blank_labels(meta: dict) -> list[str]:
    """The labels that are blank on every labelled sample of every split: no data, yet a policy that reads blank
    as negative trains and scores them as negatives."""
    counts = meta.get("label_counts", {})
    return [name for name in meta.get("labels", [])
            if all(sum(c.get(name, {}).get(k, 0) for k in ("1", "0", "-1")) == 0 for c in counts.values())]


def plan_fingerprint(params: dict, items: Sequence) -> str:
    """Identifies a split's parameters and its planned items (so a changed input never reuses shards)."""
    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode("utf-8"))
    for item in items:
        h.update(repr(item).encode("utf-8"))
    return h.hexdigest()


def convert(out: str | Path, items_by_split: dict, make_record: Callable, params: dict, source: str,
            extra_rejects: Iterable = (), *, samples_per_shard: int = 1000, workers: int = 0, fmt: str = "jpg",
            progress: bool = True, labels: Sequence[str] = LABELS, eval_policy: Optional[EvalPolicy] = None) -> dict:
    """Write every split's items as shards and finish dataset.json / rejects.csv. Returns dataset.json.
    `labels` is the data set's label names in order; `eval_policy` how its blanks and uncertains are scored
    (default: the source's convention, vkd_dist/labels.py SOURCE_EVAL_POLICY)."""
    from vkd_dist.data.shards import finish_dataset, write_split

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or (os.cpu_count() or 1)
    results = {}
    for split in SPLIT_NAMES:
        items = items_by_split.get(split, [])
        results[split] = write_split(out, split, items, make_record, samples_per_shard=samples_per_shard,
                                     workers=workers, fmt=fmt, progress=progress,
                                     fingerprint=plan_fingerprint({**params, "labels": list(labels)}, items),
                                     labels=labels)
    return finish_dataset(out, results, {**params, "samples_per_shard": samples_per_shard}, source=source,
                          extra_rejects=list(extra_rejects), labels=labels, eval_policy=eval_policy)


def add_split_args(p, note: str = "") -> None:
    """The patient-level hash split's fractions and seed (each patient's studies stay in one split)."""
    p.add_argument("--val-frac", type=float, default=0.1, help=f"fraction of patients in val{note}")
    p.add_argument("--test-frac", type=float, default=0.1, help=f"fraction of patients in test{note}")
    p.add_argument("--seed", type=int, default=0, help=f"seed of the patient hash split{note}")


def add_common_args(p) -> None:
    p.add_argument("--out", required=True, help="output directory (shards, dataset.json, rejects.csv)")
    p.add_argument("--image-size", type=int, default=256, help="output size in pixels")
    p.add_argument("--resize", choices=("crop", "pad", "keep-aspect"), default="crop",
                   help="crop: shorter side to --image-size then center-crop square; pad: longer "
                        "side to --image-size, pad square with black; keep-aspect: shorter side, no crop")
    p.add_argument("--image-format", choices=("jpg", "png"), default="jpg", help="image encoding in the shards")
    p.add_argument("--deid", choices=("keep", "token"), default="keep",
                   help="de-identified spans (___ / XXXX): keep as is, or replace each run by --deid-token")
    p.add_argument("--deid-token", default="[DEID]", help="replacement text with --deid token")
    p.add_argument("--empty-report", choices=("skip", "keep"), default="skip",
                   help="an item whose report text is empty: skip it as a reject, or keep it")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard")
    p.add_argument("--workers", type=int, default=0, help="processes (0 = all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def options_from_args(args) -> ConvertOptions:
    opts = ConvertOptions(image_size=args.image_size, resize=args.resize, fmt=args.image_format, deid=args.deid,
                          deid_token=args.deid_token, empty_report=args.empty_report)
    opts.check()
    return opts


def common_kwargs(args) -> dict:
    return {"samples_per_shard": args.samples_per_shard, "workers": args.workers, "progress": not args.no_progress}


def options_params(opts: ConvertOptions) -> dict:
    return asdict(opts)


def register_subcommands(sub) -> None:
    """Called by vkd_dist/data_cli.py: adds `mimic-cxr`, `openi` and `manifest`."""
    from vkd_dist.data.sources import manifest, mimic_cxr, openi

    for module in (mimic_cxr, openi, manifest):
        module.add_subcommand(sub)


def run_and_report(build: Callable[[], dict], blank_hint: str = "") -> int:
    """Convert, print the summary and the rejects by reason, and warn about labels without data (`blank_hint`:
    how this converter leaves them out)."""
    import sys

    from vkd_dist.data.shards import Timer, summary_line

    with Timer() as t:
        meta = build()
    print(summary_line(meta, t.seconds))
    if meta["rejects"]:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(meta["rejects_by_reason"].items()))
        print(f"rejects by reason: {reasons} (see rejects.csv)")
    blank = blank_labels(meta)
    if blank:
        policy = meta.get("eval_policy", {}).get("missing", "")
        read = "trained and scored as negatives" if policy == "negative" else "left out of training and scoring"
        print(f"warning: {len(blank)} of {len(meta['labels'])} labels have no data (blank on every sample): "
              f"{', '.join(blank)}; the data set's policy (blank = {policy or 'its own'}) has them {read}"
              + (f"; {blank_hint}" if blank_hint else ""), file=sys.stderr)
    return 0


def build_record(opts: ConvertOptions, *, split: str, key: str, image_path: str, text: str, labels: dict,
                 patient_id: str, study_id: str, view: str, source: str, extra: Optional[dict] = None,
                 labelled: bool = True):
    """The shared tail of every converter's make_record: empty-report policy, then the image.
    Returns a Record or a Reject (never raises for a bad image)."""
    from vkd_dist.data.images import ImageError, load_image
    from vkd_dist.data.schema import Record, Reject

    if not text.strip() and opts.empty_report == "skip":
        return Reject(split=split, item_id=key, reason="empty_report: no report text in the chosen sections",
                      path=str(image_path))
    try:
        image = load_image(image_path, opts.image_size, opts.resize, min_side=opts.min_side)
    except ImageError as exc:
        return Reject(split=split, item_id=key, reason=exc.reason, path=str(image_path))
    return Record(key=key, image=image, text=text, labels=labels, patient_id=str(patient_id),
                  study_id=str(study_id), view=view, source=source, extra=extra or {}, labelled=labelled)


def open_table(path: Path):
    """A CSV file, gzip-compressed when its name ends in .gz, as a csv.DictReader (file closed by caller)."""
    import csv
    import gzip

    fh = gzip.open(path, "rt", newline="", encoding="utf-8") if str(path).endswith(".gz") else \
        open(path, newline="", encoding="utf-8")
    return fh, csv.DictReader(fh)


def require_columns(path: Path, reader, needed: Iterable[str]) -> None:
    have = reader.fieldnames or []
    missing = [c for c in needed if c not in have]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; "
                         f"found: {', '.join(have) or '(no header)'}")
