"""MIMIC-CXR-JPG v2 -> shards.  `vkd-data mimic-cxr --jpg-root DIR --reports PATH --out DIR`

Inputs (PhysioNet layout):
  DIR/files/pNN/pSUBJECT/sSTUDY/<dicom_id>.jpg     pNN = the first two digits of the subject id
  DIR/mimic-cxr-2.0.0-metadata.csv.gz   dicom_id, subject_id, study_id, ViewPosition, ...
  DIR/mimic-cxr-2.0.0-split.csv.gz      dicom_id, study_id, subject_id, split (train / validate / test)
  DIR/mimic-cxr-2.0.0-{chexpert,negbio}.csv.gz  subject_id, study_id, the 14 labels (1.0 / 0.0 / -1.0 / blank)
  reports: mimic-cxr-reports.zip, or its extracted tree, holding files/pNN/pSUBJECT/sSTUDY.txt
One sample per DICOM image (key = dicom_id), text = the chosen sections of its study's report
(default FINDINGS + IMPRESSION; the whole report when both are missing), labels = its study's row.
Splits: the official split with validate -> val (default), or --split patient (hash of subject id).
Rejects: no_split, no_labels, bad_label, missing_report, unreadable_report, empty_report and the image
kinds of vkd_dist/data/images.py. Images of other views are filtered (counted in params.counts).
Studies without labels: a study missing from the label table is rejected (no_labels), and a row whose every
label is blank is kept and, by MIMIC-CXR's convention, read as 14 negatives. --allow-unlabelled reads both as a
study with a report and no labels instead: kept in train (used by objectives that learn from reports, never as
negatives), rejected in val and test (they are scored, so they need labels).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Optional

from vkd_dist.data.reports import DEFAULT_SECTIONS, parse_sections_arg, report_text
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
from vkd_dist.labels import LABELS

SOURCE = "mimic-cxr"
DEFAULT_VIEWS = ("PA", "AP")
OFFICIAL_SPLIT = {"train": "train", "validate": "val", "val": "val", "test": "test"}
METADATA = "mimic-cxr-2.0.0-metadata.csv.gz"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv.gz"
LABEL_CSV = {"chexpert": "mimic-cxr-2.0.0-chexpert.csv.gz", "negbio": "mimic-cxr-2.0.0-negbio.csv.gz"}


def _pdir(subject: str) -> str:
    return f"p{subject[:2]}/p{subject}"


class _Reports:
    """Report lookup from a zip or a tree. Opened lazily per process (a zip handle must not cross fork)."""

    _zips: dict = {}

    def __init__(self, path: Path):
        self.path = Path(path)
        self.is_zip = self.path.is_file()
        if self.is_zip and not zipfile.is_zipfile(self.path):
            raise ValueError(f"--reports {self.path}: neither a directory nor a zip file")
        if not self.is_zip and not self.path.is_dir():
            raise FileNotFoundError(f"--reports {self.path}: not found (expected mimic-cxr-reports.zip or its "
                                    "extracted folder holding files/pNN/pSUBJECT/sSTUDY.txt)")
        self.members: dict[str, str] = {}
        if self.is_zip:
            with zipfile.ZipFile(self.path) as zf:
                for name in zf.namelist():
                    if name.endswith(".txt"):
                        parts = name.split("/")
                        if len(parts) >= 3:
                            self.members["/".join(parts[-3:])] = name
        else:
            self.base = self.path / "files" if (self.path / "files").is_dir() else self.path

    def locate(self, subject: str, study: str) -> Optional[str]:
        rel = f"{_pdir(subject)}/s{study}.txt"
        if self.is_zip:
            member = self.members.get(rel)
            return f"zip:{self.path}!{member}" if member else None
        return str(self.base / rel)


def read_report(locator: str) -> str:
    """A locator from _Reports.locate -> the report text. Raises FileNotFoundError / OSError."""
    if locator.startswith("zip:"):
        zpath, member = locator[4:].rsplit("!", 1)
        key = (os.getpid(), zpath)
        zf = _Reports._zips.get(key)
        if zf is None:
            zf = _Reports._zips[key] = zipfile.ZipFile(zpath)
        data = zf.read(member)
    else:
        data = Path(locator).read_bytes()
    return data.decode("utf-8", errors="replace")


def make_record(item: tuple, opts: ConvertOptions, sections: tuple, fallback: bool):
    split, dicom, subject, study, view, image_path, locator, labels, labelled = item
    if locator is None:
        return Reject(split, dicom, f"missing_report: no s{study}.txt for subject {subject} in --reports",
                      image_path)
    try:
        raw = read_report(locator)
    except FileNotFoundError:
        return Reject(split, dicom, f"missing_report: {locator} not found", image_path)
    except (OSError, zipfile.BadZipFile) as exc:
        return Reject(split, dicom, f"unreadable_report: {type(exc).__name__}: {str(exc)[:120]}", image_path)
    text, used = report_text(raw, sections, fallback=fallback, deid=opts.deid, token=opts.deid_token)
    return build_record(opts, split=split, key=dicom, image_path=image_path, text=text, labels=dict(labels),
                        patient_id=subject, study_id=study, view=view, source=SOURCE,
                        extra={"sections": used}, labelled=labelled)


def _read_labels(path: Path) -> tuple[dict, list]:
    fh, reader = open_table(path)
    with fh:
        require_columns(path, reader, ("subject_id", "study_id", *LABELS))
        out, bad = {}, []
        for line, row in enumerate(reader, start=2):
            key = (row["subject_id"].strip(), row["study_id"].strip())
            try:
                out[key] = tuple((n, parse_label(row[n], f"{path} line {line} column {n!r}")) for n in LABELS)
            except ValueError as exc:
                bad.append((key, str(exc)))
    return out, bad


def plan(jpg_root: Path, reports: Path, *, metadata: Optional[Path] = None, split_csv: Optional[Path] = None,
         labels_csv: Optional[Path] = None, label_source: str = "chexpert", views: Sequence[str] = DEFAULT_VIEWS,
         split: str = "official", val_frac: float = 0.1, test_frac: float = 0.1, seed: int = 0,
         allow_unlabelled: bool = False):
    """-> (items_by_split, rejects, counts). Items are sorted by (subject, study, dicom) in each split."""
    jpg_root = Path(jpg_root)
    if not (jpg_root / "files").is_dir():
        raise FileNotFoundError(f"--jpg-root {jpg_root}: no files/ folder (expected the MIMIC-CXR-JPG v2 layout "
                                "files/pNN/pSUBJECT/sSTUDY/<dicom_id>.jpg)")
    if label_source not in LABEL_CSV:
        raise ValueError(f"--labels: got {label_source!r}, expected one of {', '.join(LABEL_CSV)}")
    metadata = Path(metadata or jpg_root / METADATA)
    split_csv = Path(split_csv or jpg_root / SPLIT_CSV)
    labels_csv = Path(labels_csv or jpg_root / LABEL_CSV[label_source])
    for flag, p in (("--metadata", metadata), ("--split-csv", split_csv), ("--labels-csv", labels_csv)):
        if not p.is_file():
            raise FileNotFoundError(f"{flag} {p}: not found")
    if split not in ("official", "patient"):
        raise ValueError(f"--split: got {split!r}, expected official or patient")
    check_fractions(val_frac, test_frac)
    view_set = None if [v.lower() for v in views] == ["all"] else {v.strip().upper() for v in views}
    rep = _Reports(reports)
    labels, bad_labels = _read_labels(labels_csv)
    bad_label = dict(bad_labels)

    official = {}
    fh, reader = open_table(split_csv)
    with fh:
        require_columns(split_csv, reader, ("dicom_id", "split"))
        for line, row in enumerate(reader, start=2):
            official[row["dicom_id"].strip()] = (row["split"].strip().lower(), line)

    fh, reader = open_table(metadata)
    rows = []
    with fh:
        require_columns(metadata, reader, ("dicom_id", "subject_id", "study_id", "ViewPosition"))
        for row in reader:
            rows.append((row["subject_id"].strip(), row["study_id"].strip(), row["dicom_id"].strip(),
                         (row["ViewPosition"] or "").strip().upper()))
    rows.sort()
    items: dict[str, list[tuple]] = {s: [] for s in ("train", "val", "test")}
    rejects: list[Reject] = []
    counts: dict[str, Any] = {"metadata_rows": len(rows), "filtered_by_view": {}, "planned": 0}
    for subject, study, dicom, view in rows:
        image = str(jpg_root / "files" / _pdir(subject) / f"s{study}" / f"{dicom}.jpg")
        if view_set is not None and view not in view_set:
            counts["filtered_by_view"][view or "(blank)"] = counts["filtered_by_view"].get(view or "(blank)", 0) + 1
            continue
        if split == "official":
            if dicom not in official:
                rejects.append(Reject("", dicom, f"no_split: dicom_id not in {split_csv.name}", image))
                continue
            raw, line = official[dicom]
            if raw not in OFFICIAL_SPLIT:
                rejects.append(Reject("", dicom, f"no_split: {split_csv.name} line {line} has split {raw!r} "
                                      "(expected train, validate or test)", image))
                continue
            name = OFFICIAL_SPLIT[raw]
        else:
            name = hash_split(subject, val_frac, test_frac, seed)
        key = (subject, study)
        if key in bad_label:
            rejects.append(Reject(name, dicom, f"bad_label: {bad_label[key]}", image))
            continue
        row = labels.get(key)
        labelled = row is not None and (not allow_unlabelled or any(v is not None for _, v in row))
        if not labelled and not (allow_unlabelled and name == "train"):
            why = (f"not in {labels_csv.name}" if row is None else f"every label in {labels_csv.name} is blank")
            fix = ("a validation or test study is scored, so it needs labels" if allow_unlabelled else
                   "--allow-unlabelled keeps such training studies as reports without labels")
            rejects.append(Reject(name, dicom, f"no_labels: study {study} of subject {subject}: {why} ({fix})", image))
            continue
        row = row if labelled else tuple((n, None) for n in LABELS)
        items[name].append((name, dicom, subject, study, view, image, rep.locate(subject, study), row, labelled))
    counts["planned"] = sum(len(v) for v in items.values())
    counts["unlabelled"] = sum(not item[-1] for v in items.values() for item in v)
    counts["filtered_by_view"] = dict(sorted(counts["filtered_by_view"].items()))
    fracs = {"val": val_frac, "test": test_frac}
    patients = len({item[2] for v in items.values() for item in v})
    require_eval_splits(items, rejects, lambda s: _split_fix(s, split, split_csv.name, fracs, patients, seed))
    return items, rejects, counts


def _split_fix(name: str, split: str, split_csv: str, fracs: dict, patients: int, seed: int) -> Optional[str]:
    if split == "official":
        official = "validate" if name == "val" else name
        return (f"no image of the kept views has split {official!r} in {split_csv}: check --split-csv and --views, "
                "or use --split patient")
    return hash_split_fix(name, fracs[name], patients, seed)


def convert_mimic(jpg_root, reports, out, *, opts: ConvertOptions = ConvertOptions(), label_source="chexpert",
                  views: Sequence[str] = DEFAULT_VIEWS, sections: Sequence[str] = DEFAULT_SECTIONS,
                  fallback: bool = True, split: str = "official", val_frac: float = 0.1, test_frac: float = 0.1,
                  seed: int = 0, metadata=None, split_csv=None, labels_csv=None, allow_unlabelled: bool = False,
                  samples_per_shard: int = 1000, workers: int = 0, progress: bool = True) -> dict:
    """Convert MIMIC-CXR-JPG into `out`; returns the dataset.json contents."""
    opts.check()
    sections = parse_sections_arg(sections)
    items, rejects, counts = plan(jpg_root, reports, metadata=metadata, split_csv=split_csv, labels_csv=labels_csv,
                                  label_source=label_source, views=views, split=split, val_frac=val_frac,
                                  test_frac=test_frac, seed=seed, allow_unlabelled=allow_unlabelled)
    params = {**options_params(opts), "label_source": label_source, "views": list(views),
              "sections": list(sections), "section_fallback": fallback, "split": split,
              **({"val_frac": val_frac, "test_frac": test_frac, "seed": seed} if split == "patient" else {}),
              "allow_unlabelled": allow_unlabelled, "counts": counts}
    fn = partial(make_record, opts=opts, sections=tuple(sections), fallback=fallback)
    return convert(out, items, fn, params, SOURCE, rejects, samples_per_shard=samples_per_shard, workers=workers,
                   fmt=opts.fmt, progress=progress)


def add_subcommand(sub) -> None:
    p = sub.add_parser("mimic-cxr", help="convert MIMIC-CXR-JPG v2 (+ reports) into shards",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--jpg-root", required=True, help="MIMIC-CXR-JPG root (files/ and the csv.gz tables)")
    p.add_argument("--reports", required=True, help="mimic-cxr-reports.zip or its extracted folder")
    p.add_argument("--labels", choices=tuple(LABEL_CSV), default="chexpert", help="label source")
    p.add_argument("--views", default="PA,AP", help="comma-separated ViewPosition values to keep (PA,AP: the "
                                                    "frontal views), or 'all'")
    p.add_argument("--sections", default="FINDINGS,IMPRESSION",
                   help="report sections forming the text, in order")
    p.add_argument("--no-fallback", action="store_true",
                   help="do not fall back to the whole report when none of --sections is present")
    p.add_argument("--split", choices=("official", "patient"), default="official",
                   help="official (mimic-cxr-2.0.0-split; validate -> val) or a patient-level hash split")
    add_split_args(p, " (with --split patient)")
    p.add_argument("--metadata", help=f"default JPG_ROOT/{METADATA}")
    p.add_argument("--split-csv", help=f"default JPG_ROOT/{SPLIT_CSV}")
    p.add_argument("--labels-csv", help="default JPG_ROOT/mimic-cxr-2.0.0-<labels>.csv.gz")
    p.add_argument("--allow-unlabelled", action="store_true",
                   help="keep training studies missing from the label table, or with every label blank, as studies "
                        "with a report but no labels (default: reject the first as no_labels; read the second's "
                        "blanks as negatives, MIMIC-CXR's convention)")
    add_common_args(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    opts = options_from_args(args)
    return run_and_report(lambda: convert_mimic(
        args.jpg_root, args.reports, args.out, opts=opts, label_source=args.labels,
        views=[v for v in args.views.split(",") if v.strip()], sections=args.sections,
        fallback=not args.no_fallback, split=args.split, val_frac=args.val_frac, test_frac=args.test_frac,
        seed=args.seed, metadata=args.metadata, split_csv=args.split_csv, labels_csv=args.labels_csv,
        allow_unlabelled=args.allow_unlabelled, **common_kwargs(args)))
