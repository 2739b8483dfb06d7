"""benchmarks/figures.py: every figure read from its result file, or from its checked-in record where the file is
absent (and the page says which); --record stores what was read; README's headline figures are the records'."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks import figures
from conftest import REPO
from test_verdict import _typical  # a study.json whose bars are hand-computed there


def _results(tmp_path: Path) -> dict[str, Path]:
    run = tmp_path / "runs" / "default"
    run.mkdir(parents=True)
    (run / "test_metrics.json").write_text(json.dumps(
        {"macro_auroc": 0.72634, "macro_auroc_ci": [0.7081, 0.7449], "macro_ece": 0.1312,
         "macro_labels": [f"L{i}" for i in range(14)]}))
    study = tmp_path / "study"
    study.mkdir()

    def cmp(regime, arm, delta, lo, hi):
        return {"regime": regime, "arm": arm, "baseline": "image_only", "delta": delta, "ci": [lo, hi],
                "p_value": 0.002, "seeds_a": [0, 1, 2, 3, 4]}

    (study / "study.json").write_text(json.dumps({"comparisons": [
        cmp("labels0.1", "vkd_distil", 0.0721, 0.0604, 0.0838), cmp("n2000", "vkd_distil", -0.0243, -0.0351, -0.0129),
        cmp("n2000", "vkd", -0.0262, -0.0371, -0.0158), {"regime": "n2000", "arm": "kd", "skipped": "no run"}]}))
    table = tmp_path / "table"
    table.mkdir()
    (table / "study.json").write_text(json.dumps(_typical(best_delta=0.05, vkd_full=(-0.02, -0.03, -0.01))))
    pilot = tmp_path / "pilot"
    pilot.mkdir()
    (pilot / "tuned.json").write_text(json.dumps({"regime": "testbed0.1", "seeds": [100], "trials": 8, "arms": {
        arm: {"complete": True, "best": {"trial": k, "val_macro_auroc": v}}
        for arm, k, v in (("image_only", 0, 0.6641), ("kd", 5, 0.6894))}}))
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"machine": {"cpu": "AMD EPYC 7B13", "cpus": 2}, "end_to_end_samples_s": 104.2,
                                 "end_to_end_data_wait_frac": 0.009, "ratios": {"trainer_vs_bare_loop": 0.987}}))
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps({"machine": {"gpu": "NVIDIA H200", "cpu": "Xeon", "cpus": 16},
                               "end_to_end_samples_s": 401.0, "end_to_end_data_wait_frac": 0.0025}))
    log = tmp_path / "suite.log"
    log.write_text("....\n= 3 failed in 2.0s =\n....\n"
                   "==== 525 passed, 5 skipped, 3 warnings in 979.61s (0:16:19) ====\n")
    return {"default_run": run, "evidence": study, "verdict": table, "tuning_pilot": pilot, "throughput_cpu": bench,
            "throughput_gpu": gpu, "suite": log}


def test_every_figure_is_read_from_its_result_file(tmp_path):
    rows = {r["name"]: r for r in figures.gather(_results(tmp_path), records=tmp_path / "no-records")}
    assert rows["default_run"]["value"] == "0.726, 95 % CI [0.708, 0.745] over 14 labels; macro ECE 0.13"
    assert rows["evidence"]["value"] == (
        "labels0.1 (5 seeds): vkd_distil - image_only +0.072 [+0.060, +0.084], p = 0.002; n2000: vkd_distil "
        "-0.024 [-0.035, -0.013], p = 0.002, vkd (the default) -0.026 [-0.037, -0.016], p = 0.002")
    assert rows["verdict"]["value"].startswith("testbed0.1 (5 seeds): labeller (best on validation) - image_only")
    assert rows["tuning_pilot"]["value"] == ("testbed0.1, seed 100, 8 trials per arm, best validation macro AUROC: "
                                             "image_only 0.664 (trial 0), kd 0.689 (trial 5)")
    assert rows["throughput_cpu"]["value"] == "end-to-end 104 samples/s, data wait 0.9 %; trainer / bare loop 0.99"
    assert rows["throughput_cpu"]["machine"] == "AMD EPYC 7B13, 2 cores"  # the benchmark's own record of it
    assert rows["throughput_gpu"]["value"] == "end-to-end 401 samples/s, data wait 0.2 %"
    assert rows["throughput_gpu"]["machine"] == "NVIDIA H200, Xeon, 16 cores"
    assert rows["suite"]["value"] == "980 s for 525 passed and 5 skipped"  # the last summary line, not the first
    for row in rows.values():
        assert row["from"].startswith("`") and row["date"] and row["commit"] and row["machine"], row


def test_the_date_is_the_result_files(tmp_path):
    src = _results(tmp_path)
    os.utime(src["suite"], (1764633600, 1764633600))  # 2025-12-02 00:00 UTC
    rows = {r["name"]: r for r in figures.gather(src, records=tmp_path / "none")}
    assert rows["suite"]["date"] == "2025-12-02"


def test_an_absent_result_file_falls_back_to_its_record_and_the_page_says_so(tmp_path):
    records = tmp_path / "records"
    src = _results(tmp_path)
    figures.write_records(figures.gather(src, records=records), records)
    assert sorted(p.stem for p in records.glob("*.json")) == sorted(f.name for f in figures.FIGURES)
    rec = json.loads((records / "suite.json").read_text())
    assert set(rec) == set(figures.FIELDS) and rec["value"] == "980 s for 525 passed and 5 skipped"

    rows = figures.gather({**src, "suite": tmp_path / "gone.log", "evidence": None}, records=records)
    page = figures.markdown(rows)
    suite_row = next(line for line in page.splitlines() if line.startswith("| the test suite |"))
    assert "**980 s for 525 passed and 5 skipped**" in suite_row
    assert "the record [figures/suite.json](figures/suite.json)" in suite_row
    assert "[figures/evidence.json]" in page and f"`{src['default_run'] / 'test_metrics.json'}`" in page


def test_neither_result_nor_record_is_an_error_naming_both(tmp_path, capsys):
    assert figures.main(["--records", str(tmp_path / "none"), "--out", str(tmp_path / "f.md"), "--default-run",
                         str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "default_run:" in err and "nope is not here" in err and "no record" in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "default_run.json").write_text(json.dumps({"value": "1"}))
    with pytest.raises(ValueError, match="missing what, date, commit, machine, command"):
        figures.gather({}, records=tmp_path / "bad")


def test_an_unfinished_table_is_a_one_line_error_naming_what_it_lacks(tmp_path, capsys):
    sources = _results(tmp_path)
    study = json.loads((sources["verdict"] / "study.json").read_text())
    study["summaries"] = [s for s in study["summaries"] if s["regime"] != "testbed1"]  # still training
    (sources["verdict"] / "study.json").write_text(json.dumps(study))
    args = ["--records", str(tmp_path / "none"), "--out", str(tmp_path / "f.md")]
    args += [f for fig in figures.FIGURES for f in (fig.flag, str(sources[fig.name]))]
    assert figures.main(args) == 2
    err = capsys.readouterr().err
    assert "no finished image_only cell in regime testbed1" in err and "Traceback" not in err


def test_the_checked_in_page_is_the_generators_and_the_readme_quotes_it():
    """docs/figures.md is what the records give today, and every record's value stands in README.md."""
    rows = figures.gather({}, records=figures.RECORDS)
    assert (REPO / "docs" / "figures.md").read_text() == figures.markdown(rows), (
        "docs/figures.md is not what its records give: python -m benchmarks.figures (--record after a new measurement)")
    readme = (REPO / "README.md").read_text()
    for row in rows:
        assert row["value"] in readme, f"README.md does not quote {row['name']}: {row['value']!r}"
