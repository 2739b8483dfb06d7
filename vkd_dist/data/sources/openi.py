"""OpenI (Indiana University chest X-ray collection) -> shards.
`vkd-data openi --reports DIR_OR_TGZ --images DIR --out DIR`

Inputs: the XML reports (a folder of *.xml, searched recursively, or NLMCXR_reports.tgz) and the PNG
release's images folder, where each image is `<parentImage id>.png`.
Text: the `AbstractText Label=...` sections chosen by --sections (default FINDINGS,IMPRESSION; the
whole report - COMPARISON, INDICATION, ... - when both are empty, unless --no-fallback).
Labels: MeSH `<major>` terms mapped onto the 14 CheXpert labels by MESH_TABLE below; see mesh_labels. A
report with MeSH coding is negative for every label its codes do not name (the literature's convention for
OpenI), and `normal` means No Finding = 1; a report without any MeSH term is unlabelled (all null). The
evaluation policy in dataset.json therefore leaves blanks out (missing: mask) and there are no uncertains.
Split: OpenI has no official split, so a deterministic report-level hash split (the collection has no
patient ids; one report = one patient study) with --val-frac / --test-frac / --seed; every image of
a report lands in the same split.
Views (--views): the XML does not record the view position.
  first (default)  one sample per report: its first listed image, which in OpenI is the frontal view
                   for the great majority (ids ending -1001); the other images are counted in
                   params.counts.images_not_used, not rejected. key = the report uId (e.g. CXR1007).
  all              one sample per image, key = the image id; view is recorded as "" (unknown).
Rejects: unreadable_report (bad XML), no_image (a report with no parentImage), empty_report, and the
image kinds of vkd_dist/data/images.py (missing_image for a listed id without a file).
"""

from __future__ import annotations

import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Optional

from vkd_dist.data.reports import DEFAULT_SECTIONS, compose, parse_sections_arg
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
    options_from_args,
    options_params,
    require_eval_splits,
    run_and_report,
)
from vkd_dist.labels import LABELS

SOURCE = "openi"
VIEW_MODES = ("first", "all")

# MeSH major term (the part before the first "/", case-insensitive) -> CheXpert label. Positive (1) when
# present. Terms not listed (emphysema, granuloma, degenerative spine, ...) map to nothing.
MESH_TABLE: dict[str, str] = {
    "normal": "No Finding",
    "cardiomegaly": "Cardiomegaly",
    "pulmonary atelectasis": "Atelectasis",
    "atelectasis": "Atelectasis",
    "pleural effusion": "Pleural Effusion",
    "opacity": "Lung Opacity",
    "airspace disease": "Lung Opacity",
    "infiltrate": "Lung Opacity",
    "density": "Lung Opacity",
    "consolidation": "Consolidation",
    "pneumonia": "Pneumonia",
    "pneumothorax": "Pneumothorax",
    "pulmonary edema": "Edema",
    "edema": "Edema",
    "nodule": "Lung Lesion",
    "mass": "Lung Lesion",
    "lung neoplasms": "Lung Lesion",
    "fractures, bone": "Fracture",
    "rib fractures": "Fracture",
    "pleural thickening": "Pleural Other",
    "catheters, indwelling": "Support Devices",
    "central venous catheters": "Support Devices",
    "medical device": "Support Devices",
    "implanted medical device": "Support Devices",
    "tube, inserted": "Support Devices",
    "pacemaker, artificial": "Support Devices",
    "defibrillators, implantable": "Support Devices",
    "stents": "Support Devices",
    "electrodes, implanted": "Support Devices",
    "heart valve prosthesis": "Support Devices",
}
# (term, qualifier) pairs where the qualifier decides: e.g. "Cardiac Shadow/enlarged" -> Cardiomegaly.
MESH_QUALIFIED: dict[tuple[str, str], str] = {
    ("cardiac shadow", "enlarged"): "Cardiomegaly",
    ("heart", "enlarged"): "Cardiomegaly",
    ("mediastinum", "enlarged"): "Enlarged Cardiomediastinum",
    ("mediastinum", "widened"): "Enlarged Cardiomediastinum",
    ("costophrenic angle", "blunted"): "Pleural Effusion",
    ("pleura", "thickening"): "Pleural Other",
    ("thickening", "pleura"): "Pleural Other",
}
PATHOLOGIES = tuple(n for n in LABELS if n not in ("No Finding", "Support Devices"))


def mesh_labels(terms: Sequence[str]) -> tuple[dict, list[str]]:
    """MeSH major terms -> ({label: 1 | 0 | None} for all 14, the terms that mapped to nothing).

    A mapped term makes its label 1. A coded report (any term) is negative for every label its terms do not
    name: OpenI's indexers code every finding they see, so an uncoded label is an absent finding. No Finding
    is 1 only for `normal`, and 0 when any of the 12 pathologies (all but No Finding and Support Devices) is
    also coded. A report with no terms at all stays unlabelled (all None)."""
    coded = any(t.strip() for t in terms)
    labels: dict = {n: (0 if coded else None) for n in LABELS}
    unmapped = []
    for term in terms:
        parts = [p.strip().lower() for p in term.split("/")]
        head, quals = parts[0], parts[1:]
        hit = MESH_TABLE.get(head) or next((MESH_QUALIFIED[(head, q)] for q in quals if (head, q) in MESH_QUALIFIED),
                                           None)
        if hit:
            labels[hit] = 1
        elif head:
            unmapped.append(term.strip())
    if any(labels[n] == 1 for n in PATHOLOGIES):
        labels["No Finding"] = 0
    return labels, unmapped


def _text(el: Optional[ET.Element]) -> str:
    return "".join(el.itertext()) if el is not None else ""


def parse_report(data: bytes, name: str) -> dict:
    """One OpenI XML file -> {"uid", "sections" (ordered), "mesh" (major terms), "images" (ids)}.
    Raises ValueError naming the file for XML that does not parse."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise ValueError(f"{name}: not well-formed XML ({exc})") from exc
    uid_el = root.find("uId")
    uid = (uid_el.get("id") if uid_el is not None else None) or f"CXR{Path(name).stem}"
    sections: dict[str, str] = {}
    for el in root.iter("AbstractText"):
        label = (el.get("Label") or "TEXT").strip().upper()
        sections[label] = f"{sections.get(label, '')} {_text(el)}".strip()
    mesh = [_text(m).strip() for m in root.iter("major") if _text(m).strip()]
    images = [p.get("id") for p in root.iter("parentImage") if p.get("id")]
    return {"uid": uid, "sections": sections, "mesh": mesh, "images": images}


def iter_xml(reports: Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) for every .xml under a folder or in a .tgz / .tar(.gz), sorted by name."""
    reports = Path(reports)
    if reports.is_dir():
        for path in sorted(reports.rglob("*.xml")):
            yield str(path), path.read_bytes()
    elif reports.is_file() and tarfile.is_tarfile(reports):
        with tarfile.open(reports) as tf:
            members = sorted((m for m in tf.getmembers() if m.isfile() and m.name.endswith(".xml")),
                             key=lambda m: m.name)
            for m in members:
                fh = tf.extractfile(m)
                if fh is not None:  # None for anything but a regular file, which `members` holds only
                    yield f"{reports}!{m.name}", fh.read()
    else:
        raise FileNotFoundError(f"--reports {reports}: expected a folder of OpenI XML reports or "
                                "NLMCXR_reports.tgz")


def make_record(item: tuple, opts: ConvertOptions):
    split, key, uid, image_path, text, labels, view, image_id = item
    return build_record(opts, split=split, key=key, image_path=image_path, text=text, labels=dict(labels),
                        patient_id=uid, study_id=uid, view=view, source=SOURCE, extra={"image_id": image_id})


_KEY_OK = re.compile(r"[^A-Za-z0-9_\-]")


def plan(reports: Path, images: Path, *, views: str = "first", sections: Sequence[str] = DEFAULT_SECTIONS,
         fallback: bool = True, val_frac: float = 0.1, test_frac: float = 0.1, seed: int = 0,
         image_ext: str = "png", deid: str = "keep", deid_token: str = "[DEID]"):
    if views not in VIEW_MODES:
        raise ValueError(f"--views: got {views!r}, expected one of {', '.join(VIEW_MODES)}")
    check_fractions(val_frac, test_frac)
    images = Path(images)
    if not images.is_dir():
        raise FileNotFoundError(f"--images {images}: not a folder (expected <parentImage id>.{image_ext} files)")
    items: dict[str, list[tuple]] = {s: [] for s in ("train", "val", "test")}
    rejects: list[Reject] = []
    counts: dict[str, Any] = {"reports": 0, "images_listed": 0, "images_not_used": 0, "unmapped_mesh_terms": {}}
    seen: set = set()
    for name, data in iter_xml(reports):
        counts["reports"] += 1
        try:
            rep = parse_report(data, name)
        except ValueError as exc:
            rejects.append(Reject("", Path(name).name, f"unreadable_report: {exc}", name))
            continue
        uid = rep["uid"]
        if uid in seen:
            rejects.append(Reject("", uid, f"duplicate_report: uId {uid} seen before in an earlier file", name))
            continue
        seen.add(uid)
        split = hash_split(uid, val_frac, test_frac, seed)
        counts["images_listed"] += len(rep["images"])
        if not rep["images"]:
            rejects.append(Reject(split, uid, "no_image: report lists no parentImage", name))
            continue
        text, _ = compose(rep["sections"], sections, fallback=fallback, deid=deid, token=deid_token)
        labels, unmapped = mesh_labels(rep["mesh"])
        for term in unmapped:
            head = term.split("/")[0]
            counts["unmapped_mesh_terms"][head] = counts["unmapped_mesh_terms"].get(head, 0) + 1
        chosen = rep["images"][:1] if views == "first" else rep["images"]
        counts["images_not_used"] += len(rep["images"]) - len(chosen)
        label_items = tuple(labels.items())
        for image_id in chosen:
            key = _KEY_OK.sub("_", uid if views == "first" else image_id)
            items[split].append((split, key, uid, str(images / f"{image_id}.{image_ext}"), text, label_items, "",
                                 image_id))
    for split in items:
        items[split].sort(key=lambda it: it[1])
    counts["unmapped_mesh_terms"] = dict(sorted(counts["unmapped_mesh_terms"].items()))
    fracs = {"val": val_frac, "test": test_frac}
    reports_kept = len({item[2] for v in items.values() for item in v})  # each report is its own patient
    require_eval_splits(items, rejects, lambda s: hash_split_fix(s, fracs[s], reports_kept, seed))
    return items, rejects, counts


def convert_openi(reports, images, out, *, opts: ConvertOptions = ConvertOptions(), views: str = "first",
                  sections: Sequence[str] = DEFAULT_SECTIONS, fallback: bool = True, val_frac: float = 0.1,
                  test_frac: float = 0.1, seed: int = 0, image_ext: str = "png", samples_per_shard: int = 1000,
                  workers: int = 0, progress: bool = True) -> dict:
    """Convert OpenI into `out`; returns the dataset.json contents."""
    opts.check()
    sections = parse_sections_arg(sections)
    items, rejects, counts = plan(reports, images, views=views, sections=sections, fallback=fallback,
                                  val_frac=val_frac, test_frac=test_frac, seed=seed, image_ext=image_ext,
                                  deid=opts.deid, deid_token=opts.deid_token)
    params = {**options_params(opts), "views": views, "sections": list(sections), "section_fallback": fallback,
              "split": "report-hash", "val_frac": val_frac, "test_frac": test_frac, "seed": seed, "counts": counts}
    return convert(out, items, partial(make_record, opts=opts), params, SOURCE, rejects,
                   samples_per_shard=samples_per_shard, workers=workers, fmt=opts.fmt, progress=progress)


def add_subcommand(sub) -> None:
    p = sub.add_parser("openi", help="convert OpenI / Indiana XML reports + PNG images into shards")
    p.add_argument("--reports", required=True, help="folder of ecgen-radiology XML files or NLMCXR_reports.tgz")
    p.add_argument("--images", required=True, help="folder of <parentImage id>.png files")
    p.add_argument("--image-ext", default="png", help="extension of the image files")
    p.add_argument("--views", choices=VIEW_MODES, default="first",
                   help="first: one sample per report from its first image (usually frontal); "
                        "all: one sample per image")
    p.add_argument("--sections", default="FINDINGS,IMPRESSION", help="report sections forming the text, in order")
    p.add_argument("--no-fallback", action="store_true",
                   help="do not fall back to the whole report when none of --sections has text")
    add_split_args(p)
    add_common_args(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    opts = options_from_args(args)
    return run_and_report(lambda: convert_openi(
        args.reports, args.images, args.out, opts=opts, views=args.views, sections=args.sections,
        fallback=not args.no_fallback, val_frac=args.val_frac, test_frac=args.test_frac, seed=args.seed,
        image_ext=args.image_ext, **common_kwargs(args)))
