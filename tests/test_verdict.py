"""benchmarks.study.verdict: the bars of the evidence table, read off a study.json by hand-computable figures."""

import json

import pytest

from benchmarks.study.verdict import VerdictError, candidates, main, markdown, verdict

ARMS = ["image_only", "labeller", "text_only", "kd", "contrastive_pre", "contrastive", "vkd"]
RUNS_OF = {"kd": {"objective.kd_teacher": "text_only"}, "contrastive": {"model.init_from": "contrastive_pre"}}


def _study(means: dict, vals: dict, deltas: dict) -> dict:
    """means[(regime, arm)] test mean; vals[arm] its validation mean in testbed0.1; deltas[(regime, arm)]
    (delta, lo, hi)."""
    regimes = sorted({r for r, _ in means})
    info = {a: {"objective": a, "reads_report": a == "text_only", "runs_of": RUNS_OF.get(a, {})} for a in ARMS}
    summaries = [{"regime": r, "arm": a, "mean": m, "ci95": [m - 0.01, m + 0.01], "n_ok": 5,
                  "reads_report": info[a]["reads_report"],
                  "best_val_macro_auroc_mean": vals.get(a, 0.5) if r == "testbed0.1" else 0.5}
                 for (r, a), m in means.items()]
    comparisons = [{"regime": r, "arm": a, "delta": d, "ci": [lo, hi], "p_value": 0.01, "p_value_is_bound": False,
                    "interval": "seeds and test patients", "seeds_a": [0, 1, 2, 3, 4]}
                   for (r, a), (d, lo, hi) in deltas.items()]
    return {"grid": {"regimes": {r: {} for r in regimes}, "arms": {a: [] for a in ARMS}}, "arm_info": info,
            "summaries": summaries, "comparisons": comparisons}


def _typical(best_delta=0.06, best_lo=0.02, vkd_full=(-0.002, -0.012, 0.008)) -> dict:
    means = {("testbed0.1", "image_only"): 0.60, ("testbed1", "image_only"): 0.70,
             ("testbed0.1", "text_only"): 0.80, ("testbed1", "text_only"): 0.80,
             ("testbed0.1", "labeller"): 0.60 + best_delta, ("testbed0.1", "kd"): 0.70,
             ("testbed0.1", "contrastive_pre"): 0.5, ("testbed0.1", "contrastive"): 0.62,
             ("testbed0.1", "vkd"): 0.61, ("testbed1", "vkd"): 0.70 + vkd_full[0]}
    # kd has the best test mean, the labeller the best validation: the verdict must choose on validation
    vals = {"labeller": 0.72, "kd": 0.70, "contrastive_pre": 0.9, "text_only": 0.95, "vkd": 0.6, "contrastive": 0.6}
    deltas = {("testbed0.1", "labeller"): (best_delta, best_lo, best_delta + 0.04),
              ("testbed0.1", "kd"): (0.10, 0.05, 0.15), ("testbed1", "vkd"): vkd_full}
    return _study(means, vals, deltas)


def test_candidates_leave_out_the_baseline_the_report_readers_and_other_arms_stages():
    assert candidates(_typical()) == ["labeller", "kd", "contrastive", "vkd"]


def test_the_best_arm_is_chosen_on_validation_and_its_gap_closure_is_computed():
    v = verdict(_typical(), "testbed0.1", "testbed1")
    assert v["best"]["arm"] == "labeller"  # kd tests higher but validates lower; contrastive_pre is a stage
    assert v["gap"] == pytest.approx(0.10)
    assert v["best"]["closed"] == pytest.approx(0.6)
    assert v["best"]["met"] is True
    assert v["default"]["met"] is True
    assert [r["arm"] for r in v["ranking"]["testbed1"]] == ["text_only", "image_only", "vkd"]


@pytest.mark.parametrize("delta,lo,met", [(0.059, 0.02, False),  # closes 59 % of the gap
                                          (0.06, -0.001, False),  # CI reaches 0
                                          (0.06, 0.001, True)])
def test_the_scarce_bar_needs_the_closure_and_a_ci_above_zero(delta, lo, met):
    assert verdict(_typical(best_delta=delta, best_lo=lo), "testbed0.1", "testbed1")["best"]["met"] is met


@pytest.mark.parametrize("vkd_full,met", [((-0.005, -0.015, 0.005), True), ((-0.006, -0.010, 0.0), False),
                                          ((0.0, -0.016, 0.016), False)])
def test_non_inferiority_of_the_default_at_its_margins(vkd_full, met):
    assert verdict(_typical(vkd_full=vkd_full), "testbed0.1", "testbed1")["default"]["met"] is met


def test_a_missing_comparison_or_regime_is_a_clear_error():
    study = _typical()
    study["comparisons"] = [c for c in study["comparisons"] if c["arm"] != "labeller"]
    with pytest.raises(VerdictError, match="no comparison of labeller with image_only in regime testbed0.1"):
        verdict(study, "testbed0.1", "testbed1")
    with pytest.raises(VerdictError, match="no regime labels0.1"):
        verdict(_typical(), "labels0.1", "testbed1")


def test_the_command_prints_the_bars_and_says_which_are_met(tmp_path, capsys):
    (tmp_path / "study.json").write_text(json.dumps(_typical(vkd_full=(-0.02, -0.03, -0.01))))
    assert main(["--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert text == markdown(verdict(_typical(vkd_full=(-0.02, -0.03, -0.01)), "testbed0.1", "testbed1")) + "\n"
    assert "the best arm on validation is labeller" in text and "closes 60 %" in text
    assert "Non-inferiority (delta >= -0.005, CI lower end >= -0.015): **not met**" in text
    assert main(["--out", str(tmp_path / "nowhere")]) == 2
    assert "study.json" in capsys.readouterr().err


def test_the_figures_page_reads_both_bars_off_the_study(tmp_path):
    from benchmarks.figures import read_verdict

    (tmp_path / "study.json").write_text(json.dumps(_typical(best_delta=0.05, vkd_full=(-0.02, -0.03, -0.01))))
    assert read_verdict(tmp_path)["value"] == (
        "testbed0.1 (5 seeds): labeller (best on validation) - image_only +0.050 [+0.020, +0.090], p = 0.01, 50 % "
        "of the gap to every label: bar not met; testbed1: vkd (the default) - image_only -0.020 [-0.030, -0.010], "
        "p = 0.01: non-inferiority not met")
