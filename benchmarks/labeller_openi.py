"""The report labeller against OpenI's MeSH labels: per label and overall agreement.

    python -m benchmarks.labeller_openi --reports ../shared/data/openi-sample/ecgen-radiology [--json out.json]

The reports are read as `vkd-data openi` reads them (FINDINGS and IMPRESSION, else the whole report) and their MeSH
terms mapped onto the labels by the converter's own table (vkd_dist/data/sources/openi.py mesh_labels: a coded
report is negative for every label its terms do not name). Only MeSH-coded reports are compared. The labeller's
reading counts as positive when it is 1; a hedged reading (-1) is left out of that label's comparison, as OpenI's
label policy leaves uncertain labels out (uncertain=ignore), and counted apart. Accuracy is over every compared
(report, label) pair; precision, recall and F1 are over the positives. The overall figures are over the 13 findings:
No Finding is listed but not counted, because the two define it differently (MeSH: the `normal` term; the
labeller, as CheXpert: no pathology mentioned as present or possible, so a report coded only with terms outside
the label set, e.g. a calcified granuloma, is No Finding to the labeller and not to MeSH).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vkd_dist.data.labeller import ReportLabeller
from vkd_dist.data.reports import DEFAULT_SECTIONS, compose
from vkd_dist.data.sources.openi import iter_xml, mesh_labels, parse_report
from vkd_dist.labels import LABELS


def _scores(tp: int, fp: int, fn: int, tn: int, uncertain: int) -> dict:
    n = tp + fp + fn + tn
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {"compared": n, "mesh_positive": tp + fn, "read_positive": tp + fp, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "uncertain_left_out": uncertain, "accuracy": (tp + tn) / n if n else None, "precision": precision,
            "recall": recall, "f1": f1}


def agreement(reports: str | Path) -> dict:
    texts, mesh = [], []
    total = 0
    for name, data in iter_xml(Path(reports)):
        total += 1
        rep = parse_report(data, name)
        labels, _ = mesh_labels(rep["mesh"])
        if labels["No Finding"] is None:  # no MeSH coding: no reference
            continue
        text, _ = compose(rep["sections"], DEFAULT_SECTIONS, fallback=True)
        texts.append(text)
        mesh.append(labels)
    readings = ReportLabeller().read_many(texts)
    counts = {n: [0, 0, 0, 0, 0] for n in LABELS}  # tp fp fn tn uncertain
    for ref, read in zip(mesh, readings):
        for n in LABELS:
            if read[n] == -1:
                counts[n][4] += 1
                continue
            said, truth = read[n] == 1, ref[n] == 1
            counts[n][0 if said and truth else 1 if said else 2 if truth else 3] += 1
    overall = [sum(c[i] for n, c in counts.items() if n != "No Finding") for i in range(5)]
    return {"reports": total, "overall": {"coded": len(texts), **_scores(*overall)},
            "per_label": {n: _scores(*counts[n]) for n in LABELS}}


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reports", required=True, help="OpenI XML reports: a folder or NLMCXR_reports.tgz")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args(argv)
    table = agreement(args.reports)
    o = table["overall"]
    print(f"{o['coded']} MeSH-coded reports of {table['reports']}, the 13 findings: accuracy {_fmt(o['accuracy'])} "
          f"over "
          f"{o['compared']} report-label pairs, precision {_fmt(o['precision'])}, recall {_fmt(o['recall'])}, "
          f"F1 {_fmt(o['f1'])}; {o['uncertain_left_out']} hedged readings left out")
    print(f"{'label':28s} {'MeSH+':>5s} {'read+':>5s} {'acc':>5s} {'prec':>5s} {'rec':>5s} {'F1':>5s} {'-1':>3s}")
    for name, s in table["per_label"].items():
        print(f"{name:28s} {s['mesh_positive']:5d} {s['read_positive']:5d} {_fmt(s['accuracy']):>5s} "
              f"{_fmt(s['precision']):>5s} {_fmt(s['recall']):>5s} {_fmt(s['f1']):>5s} {s['uncertain_left_out']:3d}")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
