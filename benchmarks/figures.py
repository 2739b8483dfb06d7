"""One page for every measured figure the docs quote: docs/figures.md, generated from the result files.

    python -m benchmarks.figures                       # read what is here, fall back to the records, write the page
    python -m benchmarks.figures --record              # ... and store what was read as the new records
    python -m benchmarks.figures --default-run runs/default --study runs/study-evidence --table runs/evidence-observed \
        --pilot runs/evidence-pilot --bench bench.json --gpu-bench gpu.json --suite-log suite.log

Each figure is read from its result file when that file is here (the default run's test_metrics.json, the evidence
studies' study.json, the tuning pilot's tuned.json, the throughput benchmark's JSON, the log of a test-suite run);
otherwise from its checked-in record, docs/figures/<name>.json, which holds the value with the date, commit, machine
and command of its measurement. The page says which of the two each row came from. `--record` writes the figures
read from result files into their records, so that the page can be generated again on a machine without them."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
RECORDS = REPO / "docs" / "figures"
PAGE = REPO / "docs" / "figures.md"
FIELDS = ("what", "value", "date", "commit", "machine", "command")


@dataclass(frozen=True)
class Figure:
    name: str  # the record's file stem and the command-line flag's default source
    what: str
    command: str
    read: Callable[[Path], dict]  # result file -> {"value": ..., optional "machine", "date", "commit"}
    flag: str  # the command-line option naming the result file


# ------------------------------------------------------------------------------------------- result files
def read_default_run(run: Path) -> dict:
    """RUN/test_metrics.json: the test macro AUROC with its patient-bootstrap CI, and the macro ECE."""
    from benchmarks.study.results import ci_text

    m = json.loads((run / "test_metrics.json").read_text())
    ci = m.get("macro_auroc_ci")
    value = f"{m['macro_auroc']:.3f}" + (f", 95 % CI {ci_text(ci)}" if ci else "")
    labels = m.get("macro_labels")
    if labels:
        value += f" over {len(labels)} labels"
    return {"value": f"{value}; macro ECE {m['macro_ece']:.2f}", "path": run / "test_metrics.json"}


def read_evidence(out: Path) -> dict:
    """OUT/study.json of `python -m benchmarks.study --evidence`: vkd_distil against image_only with a tenth of
    the labels and with all of them, and the default vkd with all of them."""
    from benchmarks.study.results import delta_text
    from benchmarks.study.verdict import comparison

    study = json.loads((out / "study.json").read_text())
    scarce = comparison(study, "labels0.1", "vkd_distil")
    full, vkd = comparison(study, "n2000", "vkd_distil"), comparison(study, "n2000", "vkd")
    seeds = len(scarce.get("seeds_a", []))
    value = (f"labels0.1 ({seeds} seeds): vkd_distil - image_only {delta_text(scarce)}; n2000: vkd_distil "
             f"{delta_text(full)}, vkd (the default) {delta_text(vkd)}")
    return {"value": value, "path": out / "study.json"}


def read_verdict(out: Path) -> dict:
    """OUT/study.json of the evidence table (docs/evidence.md): benchmarks.study.verdict's two bars, the best arm
    (chosen on validation) against image_only with a tenth of the labels and the default with all of them."""
    from benchmarks.study.results import delta_text
    from benchmarks.study.verdict import verdict

    v = verdict(json.loads((out / "study.json").read_text()), "testbed0.1", "testbed1")
    b, d = v["best"], v["default"]
    closed = "" if b["closed"] is None else f", {100 * b['closed']:.0f} % of the gap to every label"
    value = (f"{v['scarce']} ({b['seeds']} seeds): {b['arm']} (best on validation) - image_only {delta_text(b)}"
             f"{closed}: bar {'met' if b['met'] else 'not met'}")
    if d["met"] is not None:
        value += (f"; {v['full']}: {d['arm']} (the default) - image_only {delta_text(d)}: non-inferiority "
                  f"{'met' if d['met'] else 'not met'}")
    return {"value": value, "path": out / "study.json"}


def read_tuning_pilot(out: Path) -> dict:
    """OUT/tuned.json of `python -m benchmarks.study.tune`: each arm's best validation macro AUROC and its trial."""
    tuned = json.loads((out / "tuned.json").read_text())
    arms = []
    for arm, entry in tuned["arms"].items():
        best = entry.get("best")
        if not entry.get("complete") or best is None:
            raise KeyError(f"{out / 'tuned.json'}: the pilot of {arm} has not finished every trial")
        arms.append(f"{arm} {best['val_macro_auroc']:.3f} (trial {best['trial']})")
    value = (f"{tuned['regime']}, seed {', '.join(map(str, tuned['seeds']))}, {tuned['trials']} trials per arm, best "
             f"validation macro AUROC: " + ", ".join(arms))
    commit = tuned.get("commit")
    return {"value": value, "path": out / "tuned.json",
            "commit": f"{commit[:7]} (the pilot's code)" if commit else None}


def read_throughput(path: Path) -> dict:
    """The throughput benchmark's --json: end-to-end samples/s with its data wait, the trainer against the bare
    loop; the machine it records."""
    res = json.loads(path.read_text())
    parts = []
    if "end_to_end_samples_s" in res:
        wait = res.get("end_to_end_data_wait_frac")
        parts.append(f"end-to-end {res['end_to_end_samples_s']:.0f} samples/s"
                     + (f", data wait {100 * wait:.1f} %" if wait is not None else ""))
    ratio = res.get("ratios", {}).get("trainer_vs_bare_loop")
    if ratio is not None:
        parts.append(f"trainer / bare loop {ratio:.2f}")
    if not parts:
        raise KeyError(f"{path}: no end_to_end_samples_s or ratios.trainer_vs_bare_loop (run its end_to_end part)")
    m = res.get("machine", {})
    machine = ", ".join(str(v) for v in (m.get("gpu"), m.get("cpu"), f"{m['cpus']} cores" if m.get("cpus") else None)
                        if v)
    return {"value": "; ".join(parts), "machine": machine or None, "path": path}


SUITE_SUMMARY = re.compile(r"(\d+) passed(?:, (\d+) skipped)?.*? in ([\d.]+)s")


def read_suite_log(path: Path) -> dict:
    """The last pytest summary line of a test-suite log (`bash scripts/test.sh 2>&1 | tee suite.log`)."""
    found = SUITE_SUMMARY.findall(path.read_text(errors="replace"))
    if not found:
        raise KeyError(f"{path}: no pytest summary line ('N passed ... in S s')")
    passed, skipped, seconds = found[-1]
    value = f"{float(seconds):.0f} s for {passed} passed" + (f" and {skipped} skipped" if skipped else "")
    return {"value": value, "path": path}


FIGURES = (
    Figure("default_run", "the default run (the Quick start's first command): test macro AUROC, 95 % patient-"
           "bootstrap CI; macro ECE", "rm -rf runs/default && .venv/bin/accelerate launch -m vkd_dist.train",
           read_default_run, "--default-run"),
    Figure("evidence", "evidence, reports for every study: labels for a tenth (labels0.1) and for all (n2000), "
           "macro AUROC against image_only, 95 % CI over seeds and test patients",
           "python -m benchmarks.study --evidence",
           read_evidence, "--study"),
    Figure("verdict", "the evidence table on the observation testbed: the best report-using arm on validation "
           "against image_only with a tenth of the labels (bar: >= +0.03, CI above 0, >= 60 % of the gap to every "
           "label), the shipped default against image_only with every label (non-inferiority: >= -0.005, CI lower "
           "end >= -0.015); 95 % CI over seeds and test patients",
           "python -m benchmarks.study --out runs/evidence-observed --regimes testbed0.1,testbed1,labels0.1 "
           "--arms image_only,labeller,text_only,kd,pseudo,contrastive_pre,contrastive,vkd,vkd_distil --seeds 5 "
           "--set train.max_steps=300 --set train.eval_every=100 --set train.ckpt_every=300 "
           "--tuned runs/evidence-pilot/tuned.json; python -m benchmarks.study.verdict --out runs/evidence-observed",
           read_verdict, "--table"),
    Figure("tuning_pilot", "the tuning pilot: every competing arm's best of the same number of trials, on "
           "validation, on a seed and labelled subset the table does not use",
           "python -m benchmarks.study.tune --out runs/evidence-pilot --regime testbed0.1 --seed 100 --trials 8 "
           "--arms image_only,labeller,kd,pseudo,contrastive,vkd,vkd_distil --set train.max_steps=300 "
           "--set train.eval_every=100 --set train.ckpt_every=300", read_tuning_pilot, "--pilot"),
    Figure("throughput_cpu", "training throughput, CPU (the default config, one thread)",
           ".venv/bin/python benchmarks/throughput.py --threads 1 --json bench.json", read_throughput, "--bench"),
    Figure("throughput_gpu", "training throughput, GPU (ViT-B/16 + a BERT-base-sized text encoder, 224 px, "
           "batch 32, bf16, eager, 8 workers)",
           ".venv/bin/python benchmarks/throughput.py --device cuda --config F --data DIR --json gpu.json",
           read_throughput, "--gpu-bench"),
    Figure("suite", "the test suite", "bash scripts/test.sh (in a clean clone's .ci/run)", read_suite_log,
           "--suite-log"),
)


# ----------------------------------------------------------------------------------------------- the page
def here() -> tuple[str, str]:
    """(commit, machine) of this checkout and host, for figures read from result files made here."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        pass
    return commit, f"{cpu or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def gather(sources: dict[str, Optional[Path]], records: Path = RECORDS) -> list[dict]:
    """One row per figure: from its result file when given and present, else from its record (an error when
    neither exists, naming both)."""
    commit, machine = None, None
    rows = []
    for fig in FIGURES:
        source = sources.get(fig.name)
        record_path = records / f"{fig.name}.json"
        if source is not None and Path(source).exists():
            read = fig.read(Path(source))
            if commit is None:
                commit, machine = here()
            stamp = datetime.fromtimestamp(Path(read["path"]).stat().st_mtime, timezone.utc).strftime("%Y-%m-%d")
            row = {"name": fig.name, "what": fig.what, "value": read["value"], "date": read.get("date", stamp),
                   "commit": read.get("commit") or f"{commit} (the checkout that read the result file)",
                   "machine": read.get("machine") or machine, "command": fig.command,
                   "from": f"`{read['path']}`"}
        elif record_path.is_file():
            rec = json.loads(record_path.read_text())
            missing = [k for k in FIELDS if not rec.get(k)]
            if missing:
                raise ValueError(f"{record_path}: missing {', '.join(missing)} (a record holds {', '.join(FIELDS)})")
            row = {"name": fig.name, **{k: rec[k] for k in FIELDS}, "note": rec.get("note", ""),
                   "from": f"the record [figures/{record_path.name}](figures/{record_path.name})"}
        else:
            where = f"{source} is not here and " if source is not None else ""
            raise FileNotFoundError(f"{fig.name}: {where}there is no record {record_path} (give {fig.flag} FILE)")
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["# Measured figures", "",
             "Generated by `python -m benchmarks.figures` (`benchmarks/figures.py`); do not edit by hand. Each row "
             "names where its value was read: a result file, or, where that file is not on the machine that made "
             "the page, its checked-in record in [figures/](figures/), written when it was measured. The README "
             "and the other docs quote these values.", "",
             "| figure | value | date | commit | machine | command | read from |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"| {r['what']} | **{r['value']}**{note} | {r['date']} | {r['commit']} | {r['machine']} | "
                     f"`{r['command']}` | {r['from']} |")
    return "\n".join(lines) + "\n"


def write_records(rows: list[dict], records: Path = RECORDS) -> list[Path]:
    """Store each row read from a result file as its record (rows read from records are left as they are)."""
    written = []
    for r in rows:
        if r["from"].startswith("the record"):
            continue
        path = records / f"{r['name']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({k: r[k] for k in FIELDS}, indent=2) + "\n")
        written.append(path)
    return written


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.figures", description=__doc__.split("\n\n")[0])
    # where each command above leaves its result; the suite's log: none
    defaults = {"default_run": "runs/default", "evidence": "runs/study-evidence",
                "verdict": "runs/evidence-observed", "tuning_pilot": "runs/evidence-pilot",
                "throughput_cpu": "bench.json", "throughput_gpu": "gpu.json"}
    for fig in FIGURES:
        ap.add_argument(fig.flag, dest=fig.name, default=defaults.get(fig.name),
                        help=f"result file or directory of: {fig.what}")
    ap.add_argument("--records", default=str(RECORDS), help="the checked-in records (read, and with --record written)")
    ap.add_argument("--out", default=str(PAGE), help="the page to write")
    ap.add_argument("--record", action="store_true", help="store the figures read from result files as records")
    args = ap.parse_args(argv)
    sources = {fig.name: (Path(getattr(args, fig.name)) if getattr(args, fig.name) else None) for fig in FIGURES}
    try:
        rows = gather(sources, Path(args.records))
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"benchmarks.figures: error: {exc}", file=sys.stderr)
        return 2
    if args.record:
        for path in write_records(rows, Path(args.records)):
            print(f"recorded {path}")
    Path(args.out).write_text(markdown(rows))
    fresh = sum(not r["from"].startswith("the record") for r in rows)
    print(f"wrote {args.out}: {len(rows)} figures, {fresh} from result files, {len(rows) - fresh} from records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
