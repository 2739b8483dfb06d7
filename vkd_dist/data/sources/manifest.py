"""A generic CSV manifest -> shards, for one's own hospital data.
`vkd-data manifest --csv F --out DIR [--image-col C] [--text-col C] [--label-cols A,B | --label-col C]
                   [--patient-col C]`

One row = one sample: an image path (relative paths are resolved against --image-root, default the
CSV's folder), the report text, labels, and a patient id.
Labels, one of:
  --label-cols A,B,...  columns holding 1 / 0 / -1 / blank (1.0 / 0.0 / -1.0 accepted).
                        With --label-set columns (the default with --label-cols) the data set's labels are
                        exactly these columns, in this order (`column=Name` renames), CheXpert names or not
                        (COVID-19, a nodule type, a device); the model, metrics and vkd-predict are then sized
                        and named by them. With --label-set chexpert each is a CheXpert name, or
                        `column=CheXpert Name` to map a differently named column, and the data set has all 14
                        CheXpert labels: the ones not given are blank on every row (a warning names them).
  --label-col C         one categorical column whose value is a CheXpert name (case-insensitive; several
                        joined by "|" allowed): those labels are 1, the other 13 are 0; a blank cell
                        leaves all 14 null.
Evaluation policy (dataset.json "eval_policy"; training has its own, data.uncertain / data.missing):
  --eval-missing negative (default, as MIMIC-CXR: a blank cell is a negative) | mask (blank is left out)
  --eval-uncertain ignore (default: -1 is left out) | ones | zeros
Split: --split-col (train / val / validate / test) if given, else a deterministic patient-level hash
split of --patient-col with --val-frac / --test-frac / --seed (a missing patient column is an error;
pass --patient-col "" to treat every row as its own patient).
Unlabelled rows: a row whose every label cell is blank has no labels at all; reading its blanks as negatives
(the default policy) would invent 14 negative findings, so it is rejected (no_labels) unless
--allow-unlabelled is given. Then a training-split row becomes an unlabelled study: its image and report are
used by objectives that learn from reports (vkd, kd), never as negatives, and the conversion summary counts
them. Validation and test rows still need labels (they are scored), so they are rejected there either way.
Key: row-NNNNNNN (the 1-based data row). Text is whitespace-normalised (vkd_dist/data/reports.py).
Rejects: bad_row (empty image path, unknown split value), bad_label, no_labels, empty_report and the image
kinds.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Optional

from vkd_dist.data.reports import normalise_text
from vkd_dist.data.schema import Reject
from vkd_dist.data.sources import (
    ConvertOptions,
    add_common_args,
    add_split_args,
    build_record,
    check_fractions,
    common_kwargs,
    convert,
    hash_split,
    hash_split_fix,
    open_table,
    options_from_args,
    options_params,
    parse_label,
    require_columns,
    require_eval_splits,
    run_and_report,
)
from vkd_dist.labels import LABELS, MISSING_POLICIES, UNCERTAIN_POLICIES, EvalPolicy

SOURCE = "manifest"
SPLIT_VALUES = {"train": "train", "val": "val", "valid": "val", "validate": "val", "validation": "val",
                "test": "test"}
_BY_LOWER = {n.lower(): n for n in LABELS}


LABEL_SETS = ("chexpert", "columns")


def resolve_label_set(label_set: Optional[str], label_cols: Optional[str]) -> str:
    """--label-set as given, else what the labels given mean: --label-cols name the data set's labels (columns),
    --label-col picks among the CheXpert ones (chexpert)."""
    if label_set is not None:
        return label_set
    return "columns" if label_cols else "chexpert"


def parse_label_cols(spec: str, label_set: str = "chexpert") -> list[tuple[str, str]]:
    """'A,col=B' -> [(column, label name)]. Under the chexpert set a name must be a CheXpert label (any case);
    under `columns` any name is a label of its own."""
    out: list[tuple[str, str]] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        col, _, name = part.partition("=")
        name = (name or col).strip()
        if label_set == "columns":
            if name in {n for _, n in out}:
                raise ValueError(f"--label-cols: label {name!r} is given twice")
            out.append((col.strip(), name))
            continue
        if name.lower() not in _BY_LOWER:
            raise ValueError(f"--label-cols: {name!r} is not a CheXpert label (expected one of: {', '.join(LABELS)}; "
                             "map other column names with column=Label)")
        out.append((col.strip(), _BY_LOWER[name.lower()]))
    if not out:
        raise ValueError(f"--label-cols: no columns in {spec!r}")
    return out


def categorical_labels(value: str, where: str) -> dict:
    text = value.strip()
    if not text:
        return {n: None for n in LABELS}
    names = [v.strip() for v in text.split("|") if v.strip()]
    unknown = [v for v in names if v.lower() not in _BY_LOWER]
    if unknown:
        raise ValueError(f"{where}: value {unknown[0]!r} is not a CheXpert label name")
    positive = {_BY_LOWER[v.lower()] for v in names}
    return {n: int(n in positive) for n in LABELS}


def make_record(item: tuple, opts: ConvertOptions):
    split, key, image, raw_text, labels, patient, study, labelled = item
    text = normalise_text(raw_text, opts.deid, opts.deid_token)
    return build_record(opts, split=split, key=key, image_path=image, text=text, labels=dict(labels),
                        patient_id=patient, study_id=study, view="", source=SOURCE, labelled=labelled)


def plan(csv_path: Path, *, image_root: Optional[Path] = None, image_col: str = "image", text_col: str = "text",
         label_cols: Optional[str] = None, label_col: Optional[str] = None, patient_col: str = "patient_id",
         study_col: Optional[str] = None, split_col: Optional[str] = None, val_frac: float = 0.1,
         test_frac: float = 0.1, seed: int = 0, label_set: Optional[str] = None, allow_unlabelled: bool = False):
    """(items by split, rejects, counts, label names in order). `label_set` None: resolve_label_set."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"--csv {csv_path}: not found")
    if bool(label_cols) == bool(label_col):
        raise ValueError("give exactly one of --label-cols A,B,... (one column per label) or --label-col C "
                         "(one categorical column)")
    label_set = resolve_label_set(label_set, label_cols)
    if label_set not in LABEL_SETS:
        raise ValueError(f"--label-set: got {label_set!r}, expected one of {', '.join(LABEL_SETS)}")
    if label_set == "columns" and not label_cols:
        raise ValueError("--label-set columns takes its labels from --label-cols A,B,... (not --label-col)")
    check_fractions(val_frac, test_frac)
    mapping = parse_label_cols(label_cols, label_set) if label_cols else []
    names = tuple(n for _, n in mapping) if label_set == "columns" else LABELS
    image_root = Path(image_root) if image_root else csv_path.parent
    needed = [image_col, text_col, *(c for c, _ in mapping), *([label_col] if label_col else []),
              *([patient_col] if patient_col else []), *([study_col] if study_col else []),
              *([split_col] if split_col else [])]
    items: dict[str, list[tuple]] = {s: [] for s in ("train", "val", "test")}
    rejects: list[Reject] = []
    rows = 0
    fh, reader = open_table(csv_path)
    with fh:
        require_columns(csv_path, reader, needed)
        for n, row in enumerate(reader, start=1):
            rows += 1
            key = f"row-{n:07d}"
            line = n + 1
            patient = (row[patient_col] or "").strip() if patient_col else key
            patient = patient or key
            if split_col:
                raw = (row[split_col] or "").strip().lower()
                split = SPLIT_VALUES.get(raw)
                if split is None:
                    rejects.append(Reject("", key, f"bad_row: {csv_path.name} line {line} column {split_col!r} has "
                                          f"{raw!r} (expected train, val, validate or test)", ""))
                    continue
            else:
                split = hash_split(patient, val_frac, test_frac, seed)
            image = (row[image_col] or "").strip()
            if not image:
                rejects.append(Reject(split, key,
                                      f"bad_row: {csv_path.name} line {line} column {image_col!r} is empty"))
                continue
            path = Path(image) if Path(image).is_absolute() else image_root / image
            try:
                if mapping:
                    labels: dict[str, Optional[int]] = {n_: None for n_ in names}
                    for col, name in mapping:
                        labels[name] = parse_label(row[col], f"{csv_path.name} line {line} column {col!r}")
                else:
                    where = f"{csv_path.name} line {line} column {label_col!r}"
                    labels = categorical_labels(row[label_col] or "", where)
            except ValueError as exc:
                rejects.append(Reject(split, key, f"bad_label: {exc}", str(path)))
                continue
            labelled = any(v is not None for v in labels.values())
            if not labelled and not (allow_unlabelled and split == "train"):
                why = ("a validation or test study is scored, so it needs labels" if allow_unlabelled else
                       "--allow-unlabelled keeps such training rows as studies with a report but no labels")
                rejects.append(Reject(split, key, f"no_labels: {csv_path.name} line {line}: every label cell is "
                                      f"blank ({why})", str(path)))
                continue
            study = (row[study_col] or "").strip() if study_col else key
            items[split].append((split, key, str(path), row[text_col] or "", tuple(labels.items()), patient,
                                 study or key, labelled))
    planned = sum(len(v) for v in items.values())
    unlabelled = sum(not item[-1] for v in items.values() for item in v)
    patients = len({item[5] for v in items.values() for item in v})
    require_eval_splits(items, rejects, partial(_split_fix, split_col=split_col, csv_name=csv_path.name,
                                                fracs={"val": val_frac, "test": test_frac}, patients=patients,
                                                seed=seed))
    return items, rejects, {"rows": rows, "planned": planned, "unlabelled": unlabelled}, names


def _split_fix(split: str, *, split_col: Optional[str], csv_name: str, fracs: dict, patients: int,
               seed: int) -> Optional[str]:
    if split_col:
        return (f"no usable row of {csv_name} has {split!r} in --split-col {split_col!r}: give some rows that "
                "split, or leave out --split-col for a patient hash split")
    return hash_split_fix(split, fracs[split], patients, seed)


def convert_manifest(csv_path, out, *, opts: ConvertOptions = ConvertOptions(), image_root=None,
                     image_col: str = "image", text_col: str = "text", label_cols: Optional[str] = None,
                     label_col: Optional[str] = None, patient_col: str = "patient_id", study_col: Optional[str] = None,
                     split_col: Optional[str] = None, val_frac: float = 0.1, test_frac: float = 0.1, seed: int = 0,
                     label_set: Optional[str] = None, eval_policy: EvalPolicy = EvalPolicy(),
                     allow_unlabelled: bool = False, samples_per_shard: int = 1000, workers: int = 0,
                     progress: bool = True) -> dict:
    """Convert a CSV manifest into `out`; returns the dataset.json contents."""
    opts.check()
    label_set = resolve_label_set(label_set, label_cols)
    items, rejects, counts, names = plan(
        csv_path, image_root=image_root, image_col=image_col, text_col=text_col, label_cols=label_cols,
        label_col=label_col, patient_col=patient_col, study_col=study_col, split_col=split_col, val_frac=val_frac,
        test_frac=test_frac, seed=seed, label_set=label_set, allow_unlabelled=allow_unlabelled)
    params = {**options_params(opts), "image_col": image_col, "text_col": text_col, "label_cols": label_cols,
              "label_col": label_col, "label_set": label_set, "allow_unlabelled": allow_unlabelled,
              "patient_col": patient_col, "split_col": split_col,
              "split": "column" if split_col else "patient-hash",
              **({} if split_col else {"val_frac": val_frac, "test_frac": test_frac, "seed": seed}), "counts": counts}
    return convert(out, items, partial(make_record, opts=opts), params, SOURCE, rejects,
                   samples_per_shard=samples_per_shard, workers=workers, fmt=opts.fmt, progress=progress,
                   labels=names, eval_policy=eval_policy)


def add_subcommand(sub) -> None:
    p = sub.add_parser("manifest", help="convert a generic CSV (image, text, labels, patient) into shards")
    p.add_argument("--csv", required=True, help="the manifest (.csv or .csv.gz)")
    p.add_argument("--image-root", help="resolve relative image paths here (default: the CSV's folder)")
    p.add_argument("--image-col", default="image", help="column of image paths")
    p.add_argument("--text-col", default="text", help="column of report text")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--label-cols", help="comma-separated label columns (CheXpert names, or column=Label)")
    g.add_argument("--label-col", help="one categorical column holding a CheXpert label name per row")
    p.add_argument("--label-set", choices=LABEL_SETS,
                   help="columns: the data set's labels are exactly the --label-cols, in order; chexpert: the 14 "
                        "CheXpert labels, the ones not in --label-cols blank on every row (default: columns with "
                        "--label-cols, chexpert with --label-col)")
    p.add_argument("--eval-missing", choices=MISSING_POLICIES, default="negative",
                   help="how evaluation scores a blank label cell (negative: as MIMIC-CXR; mask: left out)")
    p.add_argument("--eval-uncertain", choices=UNCERTAIN_POLICIES, default="ignore",
                   help="how evaluation scores -1 (ignore: left out, as MIMIC-CXR)")
    p.add_argument("--allow-unlabelled", action="store_true",
                   help="keep training rows whose every label cell is blank as studies with a report but no "
                        "labels (default: reject them as no_labels, since blank would read as negative)")
    p.add_argument("--patient-col", default="patient_id", help="patient id for the patient-level split "
                                                               "('' = every row its own patient)")
    p.add_argument("--study-col", help="optional study id column")
    p.add_argument("--split-col", help="optional column with train/val/test; otherwise a patient hash split")
    add_split_args(p)
    add_common_args(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    opts = options_from_args(args)
    label_set = resolve_label_set(args.label_set, args.label_cols)
    if args.label_cols and args.label_set is None:
        names = ", ".join(n for _, n in parse_label_cols(args.label_cols, label_set))
        print(f"labels: {names} (the --label-cols, in order; --label-set chexpert gives all 14 CheXpert labels "
              "instead, with the others blank)")
    hint = ("give only the labels you have: --label-cols with --label-set columns" if label_set == "chexpert"
            else "drop those columns from --label-cols, or fill them in")
    return run_and_report(lambda: convert_manifest(
        args.csv, args.out, opts=opts, image_root=args.image_root, image_col=args.image_col, text_col=args.text_col,
        label_cols=args.label_cols, label_col=args.label_col, patient_col=args.patient_col, study_col=args.study_col,
        split_col=args.split_col, val_frac=args.val_frac, test_frac=args.test_frac, seed=args.seed,
        label_set=label_set, eval_policy=EvalPolicy(args.eval_uncertain, args.eval_missing),
        allow_unlabelled=args.allow_unlabelled, **common_kwargs(args)), blank_hint=hint)
