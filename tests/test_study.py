"""benchmarks/study/: a tiny study through the real command and the real trainer (configs/tiny.yaml, 2 steps,
one regime, 2 arms x 2 seeds), run in stages on one OUT: a cell that fails at run time (a checkpoint that does not
verify, planted in its run directory) is recorded and the others still run; the same command then retries it and
skips the rest; once more, it trains nothing; another grid in the same OUT is refused. And the grid's pieces,
in-process, without training: regimes (labels<F> too), presets, the one-label-policy rule, arms that read another
arm's run (kd, vkd_reg_init), and the report and plots from fake cells.

The staged study launches the trainer 5 times (~12 s each, ~7 s of it imports) and loads the runs twice for the
comparison: 85-100 s on this 2-core VM. The grid tests take about a second."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, TINY_CONFIG

if str(REPO) not in sys.path:  # the benchmarks package, as `python -m benchmarks.study` sees it
    sys.path.insert(0, str(REPO))

from benchmarks import study  # noqa: E402

GRID = ["--regimes", "n64", "--arms", "image_only,vkd", "--seeds", "2", "--corpus", "num_val=32",
        "--corpus", "num_test=80", "--corpus", "image_size=64", "--bootstrap", "200"]
CELLS = [f"n64/{arm}/seed{seed}" for seed in (0, 1) for arm in ("image_only", "vkd")]
BROKEN = "n64/vkd/seed0"  # the 2nd of 4 cells: two run after it


def _tiny_set() -> list[str]:
    from vkd_dist.config import overrides_from_yaml

    fast = ["train.max_steps=2", "logging.tensorboard=false", "train.bootstrap_resamples=200"]
    return [arg for item in [*overrides_from_yaml(TINY_CONFIG), *fast] for arg in ("--set", item)]


def _study(out, *extra: str):
    cmd = [sys.executable, "-m", "benchmarks.study", "--out", str(out), *GRID, *_tiny_set(), *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def _log_times(out) -> dict:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.glob("runs/*/*/*/train.log")}


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    bad = out / "runs" / BROKEN / "checkpoints" / "step-00000099"
    bad.mkdir(parents=True)
    (bad / "train_state.json").write_text("{}")  # no manifest: resume=latest refuses to start afresh
    first = _study(out)
    first_json = json.loads((out / "study.json").read_text())
    shutil.rmtree(bad.parent)
    logs_first = _log_times(out)
    second = _study(out)
    logs_second = _log_times(out)
    second_json = json.loads((out / "study.json").read_text())
    third = _study(out)
    return SimpleNamespace(out=out, first=first, first_json=first_json, second=second, second_json=second_json,
                           third=third, logs_first=logs_first, logs_second=logs_second, logs_third=_log_times(out))


@pytest.mark.slow  # the staged study: 5 trainer launches, ~90 s
@pytest.mark.timeout(600)
def test_a_failing_cell_is_recorded_and_the_others_run(staged):
    r, cells = staged.first, staged.first_json["cells"]
    assert r.returncode == 1, r.stderr[-3000:]
    assert set(cells) == set(CELLS)
    broken = cells[BROKEN]
    assert broken["status"] == "failed" and broken["exit_code"] == 1
    assert "none of the 1 checkpoints" in broken["error"]  # the trainer's own message, from the log's tail
    assert all(cells[k]["status"] == "ok" for k in CELLS if k != BROKEN)
    assert f"2/4 {BROKEN}: failed, exit code 1" in r.stdout and BROKEN in r.stderr
    assert "4/4 n64/vkd/seed1: test macro AUROC" in r.stdout  # the study went on


@pytest.mark.slow  # the staged study: 5 trainer launches, ~90 s
@pytest.mark.timeout(600)
def test_a_rerun_retries_the_failed_cell_only(staged):
    r, cells = staged.second, staged.second_json["cells"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{BROKEN}: training (retrying)" in r.stdout
    assert cells[BROKEN]["status"] == "ok" and cells[BROKEN]["attempts"] == 2
    done = [k for k in CELLS if k != BROKEN]
    assert all(f"{k}: skipped" in r.stdout for k in done)
    changed = {k for k in staged.logs_second if staged.logs_second[k] != staged.logs_first.get(k)}
    assert changed == {f"runs/{BROKEN}/train.log"}
    assert all(cells[k]["attempts"] == 1 for k in done)


@pytest.mark.slow  # the staged study: 5 trainer launches, ~90 s
@pytest.mark.timeout(600)
def test_the_study_reports_summaries_a_paired_comparison_a_table_and_a_plot(staged):
    s, out = staged.second_json, staged.out
    assert all(c["status"] == "ok" and 0 <= c["test_macro_auroc"] <= 1 for c in s["cells"].values())
    assert s["budget"] == {"max_steps": 2, "batch_size": 8, "grad_accum": 1, "samples_per_cell": 16}
    rows = {(r["regime"], r["arm"]): r for r in s["summaries"]}
    assert set(rows) == {("n64", "image_only"), ("n64", "vkd")}
    for row in rows.values():
        lo, hi = row["ci95"]
        assert row["n_ok"] == 2 and lo <= row["mean"] <= hi and row["sd"] >= 0
    (cmp,) = s["comparisons"]
    assert cmp["arm"] == "vkd" and cmp["baseline"] == "image_only" and cmp["seeds_a"] == [0, 1]
    assert cmp["ci"][0] <= cmp["delta"] <= cmp["ci"][1] and 0 < cmp["p_value"] <= 1
    # the comparison scored the very models the summaries did (final/, RUN/test_metrics.json)
    assert cmp["macro_auroc_a"] == pytest.approx(rows[("n64", "vkd")]["test_macro_auroc"])
    md = (out / "study.md").read_text()
    assert "| n64 | image_only |" in md and "| n64 | vkd |" in md and "2 steps x batch 8 = 16" in md
    assert "| n64 | vkd |" in staged.second.stdout  # the table is printed at the end
    from matplotlib.image import imread

    img = imread(out / "auroc_vs_train_size.png")
    assert img.shape[0] > 0 and img.shape[1] > 0


@pytest.mark.slow  # the staged study: 5 trainer launches, ~90 s
@pytest.mark.timeout(600)
def test_the_same_command_again_trains_nothing(staged):
    r = staged.third
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(f"{k}: skipped" in r.stdout for k in CELLS) and ": training" not in r.stdout
    assert staged.logs_third == staged.logs_second
    assert json.loads((staged.out / "study.json").read_text())["cells"] == staged.second_json["cells"]


@pytest.mark.slow  # the staged study: 5 trainer launches, ~90 s
@pytest.mark.timeout(600)
def test_another_grid_in_the_same_out_is_refused(staged):
    before = (staged.out / "study.json").read_bytes()
    r = _study(staged.out, "--seeds", "3", "--arm", "beta1=objective.beta=1.0,objective.beta_schedule=constant")
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"study: {staged.out / 'study.json'} holds another grid: ")
    assert "arms: beta1 added" in line and "seeds 2 != 3" in line and line.endswith("start another --out")
    assert (staged.out / "study.json").read_bytes() == before


# ------------------------------------------------------------------------------------ the grid, in-process
def _grid(*argv: str) -> dict:
    return study.build_grid(study.parse_args(list(argv)))


def test_the_full_and_quick_grids():
    full = _grid()
    assert list(full["regimes"]) == ["n500", "n2000", "n8000", "noise0.2", "contrast0.5", "contrast0.25"]
    assert full["regimes"]["contrast0.25"] == {"num_train": 2000, "label_noise": 0.05, "lesion_contrast": 0.25,
                                               "label_fraction": 1.0, "num_val": 400, "num_test": 1000,
                                               "image_size": 128, "seed": 0}
    assert list(full["arms"]) == study.DEFAULT_ARMS and full["seeds"] == [0, 1, 2, 3, 4]
    assert full["policy_control"] == [] and all(k["label_fraction"] == 1.0 for k in full["regimes"].values())
    assert len(study.cells_of(full)) == 6 * 5 * 5
    quick = _grid("--quick")
    assert quick["regimes"] == {"contrast0.5": {**full["regimes"]["n2000"], "lesion_contrast": 0.5}}
    assert list(quick["arms"]) == ["vkd", "image_only"] and len(study.cells_of(quick)) == 6
    assert quick["seeds"] == [0, 1, 2] and "train.max_steps=300" in quick["set"]
    with_kd = _grid("--quick", "--arms", "vkd,kd")
    assert list(with_kd["arms"]) == ["vkd", "text_only", "kd"]  # kd's teacher added, before it


def test_kd_distils_from_the_text_only_run_of_its_regime_and_seed(tmp_path):
    grid = _grid("--arms", "kd,image_only", "--regimes", "noise0.2", "--seeds", "2")
    items = study.cell_overrides(grid, tmp_path, "noise0.2", "kd", 1)
    assert f"objective.kd_teacher={tmp_path.resolve()}/runs/noise0.2/text_only/seed1" in items
    assert "train.seed=1" in items and "resume=latest" in items and "data.synthetic.label_noise=0.2" in items
    assert items.index("objective.name=kd") < items.index("train.seed=1")  # the study's own keys come last


@pytest.mark.parametrize("argv, message", [
    (["--set", "train.seed=3"], "the study's to set"),
    (["--set", "data.synthetic.num_train=10"], "the study's to set"),
    (["--set", "data.build_synthetic=true"], "sets data.build_synthetic=false"),
    (["--arm", "long=train.max_steps=900"], "the same for every arm"),
    (["--arm", "vkd=objective.beta=1"], "a built-in arm"),
    (["--regimes", "big"], "expected n<train size>"),
    (["--arms", "vkdd"], "unknown arm"),
])
def test_what_the_grid_refuses(argv, message):
    with pytest.raises(study.StudyError, match=message):
        _grid(*argv)


def test_regime_names_and_arm_definitions():
    assert study.parse_regime("contrast0.50", {"lesion_contrast": 1.0}) == ("contrast0.5", {"lesion_contrast": 0.5})
    assert study.parse_regime("n500", {"num_train": 2000}) == ("n500", {"num_train": 500})
    mapping = "model.text_config={hidden_size: 64, num_hidden_layers: 2}"  # its commas do not split it
    assert study.parse_arm(f"small={mapping},objective.beta=1") == ("small", [mapping, "objective.beta=1"])
    grid = _grid("--arm", "small=objective.beta=1", "--arms", "image_only")
    assert grid["arms"] == {"image_only": ["objective.name=image_only"], "small": ["objective.beta=1"]}


def test_the_t_interval_over_seeds():
    mean, sd, (lo, hi) = study.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and sd == 1.0
    assert hi - mean == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-6)  # t(0.975, df 2)
    assert study.t_interval([0.7]) == (0.7, None, None) and study.t_interval([]) == (None, None, None)


# ------------------------------------------------------------------------ label scarcity, policy, VKD variants
@pytest.mark.parametrize("name, canonical, fraction", [
    ("labels0.1", "labels0.1", 0.1), ("labels0.10", "labels0.1", 0.1), ("labels.05", "labels0.05", 0.05),
    ("labels1", "labels1", 1.0),
])
def test_labels_regimes(name, canonical, fraction):
    base = study.parse_corpus([])
    assert study.parse_regime(name, base) == (canonical, {**base, "label_fraction": fraction})
    assert study.regime_name("label_fraction", fraction) == canonical


@pytest.mark.parametrize("name, message", [
    ("labels0", r"label_fraction .* must be in \(0, 1\]"), ("labels1.5", r"must be in \(0, 1\]"),
    ("labelsx", "'x' is not a number"), ("labels-0.1", "'-0.1' is not a number"), ("labels", "'' is not a number"),
    ("labelz0.1", "expected n<train size>.*labels<labelled fraction>"),
])
def test_labels_regimes_refused(name, message):
    with pytest.raises(study.StudyError, match=message):
        study.parse_regime(name, study.parse_corpus([]))


def test_a_regime_under_two_names_is_refused():
    with pytest.raises(study.StudyError, match="regimes n2000 and labels1 are the same corpus"):
        _grid("--regimes", "n2000,labels1", "--arms", "image_only")
    assert _grid("--corpus", "label_fraction=0.5", "--regimes", "labels1", "--arms", "vkd")["regimes"]["labels1"][
        "label_fraction"] == 1.0  # off a base that --corpus moved, labels1 is a regime of its own


def test_the_label_fraction_reaches_the_cells_and_each_seed_has_its_own_labelled_subset(tmp_path, monkeypatch):
    grid = _grid("--regimes", "labels0.25,n2000", "--arms", "image_only", "--seeds", "2")
    items = study.cell_overrides(grid, tmp_path, "labels0.25", "image_only", 1)
    assert "data.synthetic.label_fraction=0.25" in items and "data.synthetic.num_train=2000" in items
    assert "data.synthetic.label_seed=1" in items and f"data.path={tmp_path.resolve()}/data/labels0.25-subset1" in items
    full = study.cell_overrides(grid, tmp_path, "n2000", "image_only", 1)  # every label: one corpus for all seeds
    assert "data.synthetic.label_fraction=1.0" in full and not any("label_seed" in i for i in full)
    assert f"data.path={tmp_path.resolve()}/data/n2000" in full
    calls = {}

    def fake_build(out, num_train, num_val, num_test, **kw):
        calls[out.name] = (num_train, num_val, num_test, kw)

    import vkd_dist.data.synthetic

    monkeypatch.setattr(vkd_dist.data.synthetic, "build_synthetic", fake_build)
    study.build_corpora(grid, tmp_path)
    assert sorted(calls) == ["labels0.25-subset0", "labels0.25-subset1", "n2000"]
    assert calls["labels0.25-subset1"] == (2000, 400, 1000, {
        "image_size": 128, "seed": 0, "lesion_contrast": 1.0, "label_noise": 0.05, "label_fraction": 0.25,
        "label_seed": 1, "progress": False})
    assert calls["n2000"][3]["label_fraction"] == 1.0 and "label_seed" not in calls["n2000"][3]
    later = _grid("--regimes", "labels0.25", "--arms", "image_only", "--seeds", "2", "--first-seed", "100")
    assert later["seeds"] == [100, 101]
    assert "data.synthetic.label_seed=101" in study.cell_overrides(later, tmp_path, "labels0.25", "image_only", 101)


def test_a_study_begun_with_one_shared_labelled_subset_keeps_it(tmp_path):
    grid = _grid("--regimes", "labels0.25", "--arms", "image_only", "--seeds", "2")
    old = json.loads(json.dumps(grid))
    del old["label_subsets"]  # a study.json from before per-seed subsets
    (tmp_path / "study.json").write_text(json.dumps({"grid": old, "cells": {}}))
    held = study.load_study(tmp_path / "study.json")["grid"]
    assert held["label_subsets"] == "shared"
    items = study.cell_overrides(held, tmp_path, "labels0.25", "image_only", 1)
    assert f"data.path={tmp_path.resolve()}/data/labels0.25" in items and not any("label_seed" in i for i in items)


NEG = "neg=data.missing=negative"


@pytest.mark.parametrize("argv", [
    ["--arm", NEG, "--arms", "image_only"],
    ["--arm", NEG, "--arms", "image_only", "--set", "data.missing=null"],  # what the others train under, said
    ["--arm", NEG, "--arm", "ones=data.missing=negative,data.uncertain=ones", "--arms", "image_only",
     "--set", "data.missing=negative"],
])
def test_an_arm_under_another_label_policy_is_refused(argv, tmp_path, capsys):
    with pytest.raises(study.StudyError) as info:
        _grid(*argv)
    line = str(info.value)
    assert "\n" not in line and "--policy-control" in line
    assert line.startswith("arm neg: data.missing=negative, where the other arms train under data.missing=null "
                           "(the data set's training policy)") or line.startswith(
        "arm ones: data.uncertain=ones, where the other arms train under data.uncertain=null")
    assert study.main(["--out", str(tmp_path), *argv]) == 2  # exit 2, one line, before anything is written
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err == f"study: {line}" and not (tmp_path / "study.json").exists()


def test_a_policy_control_may_train_under_another_policy():
    grid = _grid("--arm", NEG, "--arms", "image_only,vkd", "--policy-control", "neg")
    assert list(grid["arms"]) == ["image_only", "vkd", "neg"] and grid["policy_control"] == ["neg"]
    same = _grid("--arm", NEG, "--arms", "image_only", "--set", "data.missing=negative")  # every arm: one policy
    assert same["policy_control"] == []
    with pytest.raises(study.StudyError, match="--policy-control vkd: not an arm of this grid"):
        _grid("--arms", "image_only", "--policy-control", "vkd")
    diff = study.grid_difference(grid, _grid("--arm", NEG, "--arms", "image_only,vkd", "--policy-control", "neg",
                                             "--policy-control", "vkd"))
    assert diff == ["--policy-control neg vs vkd neg"]  # the grid's arm order


def test_a_study_from_before_label_fraction_and_policy_controls_resumes(tmp_path):
    grid = _grid("--quick")
    old = json.loads(json.dumps(grid))
    del old["policy_control"]
    for knobs in [old["base"], *old["regimes"].values()]:
        del knobs["label_fraction"]
    (tmp_path / "study.json").write_text(json.dumps({"grid": old, "cells": {}}))
    assert study.grid_difference(study.load_study(tmp_path / "study.json")["grid"], grid) == []


def test_the_evidence_preset():
    ev = _grid("--evidence")
    base = study.parse_corpus([])
    assert ev["regimes"] == {"labels0.1": {**base, "label_fraction": 0.1}, "n2000": base}
    assert list(ev["arms"]) == ["image_only", "text_only", "kd", "vkd", "vkd_distil"]  # kd's teacher before it
    assert ev["seeds"] == [0, 1, 2, 3, 4] and len(study.cells_of(ev)) == 2 * 5 * 5
    assert ev["set"] == ["train.max_steps=300", "train.eval_every=100", "train.ckpt_every=300"]
    assert study.parse_args(["--evidence"]).out == Path("runs/study-evidence")
    mine = _grid("--evidence", "--seeds", "2", "--arms", "vkd_sep,image_only", "--set", "train.max_steps=50")
    assert mine["seeds"] == [0, 1] and list(mine["arms"]) == ["vkd_sep", "image_only"]  # explicit flags win
    assert mine["set"][-1] == "train.max_steps=50" and list(mine["regimes"]) == ["labels0.1", "n2000"]
    with pytest.raises(SystemExit):
        study.parse_args(["--evidence", "--quick"])


def test_the_vkd_variant_arms():
    assert study.ARMS["vkd_mean"] == ["objective.image_bce=mean"]
    assert study.ARMS["vkd_sep"] == ["model.image_head=separate", "objective.image_bce=mean"]
    assert study.ARMS["vkd_reg"] == ["objective.detach_posterior=true", "objective.image_bce=mean",
                                     "objective.free_bits=0.1"]
    assert study.ARMS["vkd_reg_init"] == [*study.ARMS["vkd_reg"], "objective.text_init=@text_only"]
    assert not set(study.DEFAULT_ARMS) & {"vkd_mean", "vkd_sep", "vkd_reg", "vkd_reg_init"}


def test_vkd_reg_init_starts_from_the_text_only_run_of_its_regime_and_seed(tmp_path):
    grid = _grid("--arms", "vkd_reg_init,image_only", "--regimes", "labels0.1,n500", "--seeds", "2")
    assert list(grid["arms"]) == ["text_only", "vkd_reg_init", "image_only"]
    order = study.cells_of(grid)
    for regime in ("labels0.1", "n500"):
        for seed in (0, 1):
            assert order.index((regime, "text_only", seed)) < order.index((regime, "vkd_reg_init", seed))
            items = study.cell_overrides(grid, tmp_path, regime, "vkd_reg_init", seed)
            init = [i for i in items if i.startswith("objective.text_init=")]
            assert init == [f"objective.text_init={tmp_path.resolve()}/runs/{regime}/text_only/seed{seed}"]
            assert "objective.free_bits=0.1" in items and not any("@" in i for i in items)
            assert not any(i.startswith("objective.kd_teacher") for i in items)
    kd = study.cell_overrides(_grid("--arms", "kd"), tmp_path, "n2000", "kd", 3)
    assert f"objective.kd_teacher={tmp_path.resolve()}/runs/n2000/text_only/seed3" in kd


def test_the_label_scarce_arms_read_their_teachers_and_pretraining_runs(tmp_path):
    grid = _grid("--arms", "pseudo,kd_u,contrastive,contrastive_probe,image_only", "--regimes", "labels0.1",
                 "--seeds", "1")
    assert list(grid["arms"]) == ["text_only", "pseudo", "kd_u", "contrastive_pre", "contrastive",
                                  "contrastive_probe", "image_only"]
    root = f"{tmp_path.resolve()}/runs/labels0.1"
    pseudo = study.cell_overrides(grid, tmp_path, "labels0.1", "pseudo", 0)
    assert f"objective.kd_teacher={root}/text_only/seed0" in pseudo and "objective.distil_on=unlabelled" in pseudo
    for arm in ("contrastive", "contrastive_probe"):
        items = study.cell_overrides(grid, tmp_path, "labels0.1", arm, 0)
        assert f"model.init_from={root}/contrastive_pre/seed0" in items and "objective.name=image_only" in items
    # pre-training plus fine-tuning: two runs of the shared budget, as text_only plus a student
    from benchmarks.study.grid import runs_of

    assert runs_of(grid, grid["arms"]["contrastive"]) == {"model.init_from": "contrastive_pre"}


@pytest.mark.parametrize("argv, message", [
    (["--arm", "x=objective.text_init=@nope", "--arms", "vkd"], "arm x: objective.text_init=@nope: no arm 'nope'"),
    (["--arm", "x=objective.text_init=@x"], r"arm x reads its own run \(x -> x\)"),
    (["--arm", "a=objective.text_init=@b", "--arm", "b=objective.text_init=@a"], r"\(a -> b -> a\)"),
])
def test_run_references_that_cannot_be_met(argv, message):
    with pytest.raises(study.StudyError, match=message):
        _grid(*argv)


def test_a_cell_whose_source_run_failed_fails_without_training(tmp_path, monkeypatch):
    grid = _grid("--arms", "vkd_reg_init", "--regimes", "labels0.1", "--seeds", "1")
    trained = []

    def fake_run_cell(grid, out, regime, arm, seed):
        trained.append(arm)
        return {"status": "failed", "exit_code": 1, "seconds": 1.0, "error": "exit code 1"}

    monkeypatch.setattr(study.cells, "run_cell", fake_run_cell)
    record = {"grid": grid, "cells": {}}
    assert study.run_cells(grid, tmp_path, record)
    assert trained == ["text_only"]
    cell = record["cells"]["labels0.1/vkd_reg_init/seed0"]
    assert cell["status"] == "failed" and "labels0.1/text_only/seed0 (objective.text_init)" in cell["error"]


def test_the_label_fraction_plot_and_table_from_fake_cells(tmp_path, monkeypatch):
    import matplotlib.figure
    import numpy as np

    grid = _grid("--evidence", "--seeds", "3", "--arms", "image_only,vkd_reg_init")
    values = {(r, a): [0.6 + 0.01 * i + (0.1 if r == "n2000" else 0) + 0.02 * s for s in grid["seeds"]]
              for i, a in enumerate(grid["arms"]) for r in grid["regimes"]}
    cells = {study.cell_key(r, a, s): {"regime": r, "arm": a, "seed": s, "status": "ok", "seconds": 10.0,
                                       "run_dir": study.run_rel(r, a, s), "test_macro_auroc": v[s],
                                       "best_val_macro_auroc": None}
             for (r, a), v in values.items() for s in grid["seeds"]}
    fake = {"grid": grid, "cells": cells, "budget": {"max_steps": 300, "batch_size": 32, "grad_accum": 1,
                                                     "samples_per_cell": 9600},
            "arm_info": {a: {"objective": study.arm_objective(grid, grid["arms"][a]), "reads_report": a == "text_only"}
                         for a in grid["arms"]}}
    monkeypatch.setattr(study.results, "comparisons", lambda *a, **k: [])
    figures = {}
    save = matplotlib.figure.Figure.savefig

    def spy(fig, path, *a, **k):
        figures[Path(path).name] = fig
        return save(fig, path, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    study.report(fake, tmp_path, 200, force=False)
    assert "auroc_vs_label_fraction.png" in fake["plots"]
    png = tmp_path / "auroc_vs_label_fraction.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = figures["auroc_vs_label_fraction.png"].axes
    assert ax.get_xscale() == "log" and list(ax.get_xticks()) == [0.1, 1.0]
    lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in lines] == ["image_only", "text_only (reads the report)", "vkd_reg_init"]
    rows = {(s["regime"], s["arm"]): s for s in fake["summaries"]}
    for line, band, arm in zip(lines, ax.collections, grid["arms"]):
        xs, ys = line.get_xydata().T
        assert list(xs) == [0.1, 1.0]  # labels0.1, then the fully labelled base n2000
        assert ys == pytest.approx([np.mean(values[("labels0.1", arm)]), np.mean(values[("n2000", arm)])])
        lo, hi = zip(rows[("labels0.1", arm)]["ci95"], rows[("n2000", arm)]["ci95"])
        edge = band.get_paths()[0].vertices[:, 1]
        assert edge.min() == pytest.approx(min(lo)) and edge.max() == pytest.approx(max(hi))
    md = (tmp_path / "study.md").read_text()
    assert "labels0.1 (num_train 2000, label_noise 0.05, lesion_contrast 1, label_fraction 0.1)" in md
    assert "vkd_reg_init: objective.detach_posterior=true objective.image_bce=mean objective.free_bits=0.1 " \
           "objective.text_init=<text_only run, same regime and seed>" in md
    assert "**Label policy** (training): data.missing null (the data set's training policy)" in md
    assert "![auroc_vs_label_fraction.png](auroc_vs_label_fraction.png)" in md


def test_the_table_shows_the_seed_aware_delta_and_the_test_noise_only_one(tmp_path, monkeypatch):
    """The study's comparisons go through vkd_dist.compare (its runs' predictions stand-ins here: vkd's seeds
    disagree in sign against image_only), and study.md shows the headline over seeds and test patients next to
    the test-set-noise-only interval; a comparison recorded before the seed-aware headline is computed again."""
    import numpy as np

    import vkd_dist.compare as compare_module
    from vkd_dist.data.schema import SCHEMA_VERSION
    from vkd_dist.metrics import Predictions

    grid = _grid("--regimes", "labels0.1", "--arms", "image_only,vkd", "--seeds", "3")
    (tmp_path / "data" / "labels0.1-subset0").mkdir(parents=True)  # the first seed's: what the comparison reads
    (tmp_path / "data" / "labels0.1-subset0" / "dataset.json").write_text(json.dumps(
        {"schema_version": SCHEMA_VERSION, "labels": ["L0", "L1"], "splits": {"test": {}}}))
    rng = np.random.default_rng(0)
    y = (rng.random((1500, 2)) < 0.3).astype(np.float32)
    keys = [f"k{i:04d}" for i in range(1500)]
    signal = {("vkd", 0): 1.6, ("vkd", 1): 0.7, ("vkd", 2): 1.5}
    preds = {(arm, s): Predictions((signal.get((arm, s), 1.0) * y + rng.normal(size=y.shape)).astype(np.float32),
                                   y, np.ones_like(y, dtype=bool), keys, keys)
             for arm in ("vkd", "image_only") for s in range(3)}
    arm_seed = lambda run: (Path(run).parent.name, int(Path(run).name.removeprefix("seed")))  # noqa: E731
    monkeypatch.setattr(compare_module, "_predictions", lambda run, *_: preds[arm_seed(run)])
    monkeypatch.setattr(compare_module, "_seeds", lambda runs: [arm_seed(r)[1] for r in runs])
    cells = {study.cell_key("labels0.1", a, s): {"regime": "labels0.1", "arm": a, "seed": s, "status": "ok",
                                                 "seconds": 1.0, "run_dir": study.run_rel("labels0.1", a, s),
                                                 "test_macro_auroc": 0.7, "best_val_macro_auroc": None}
             for a in grid["arms"] for s in grid["seeds"]}
    fake = {"grid": grid, "cells": cells, "budget": {"max_steps": 3, "batch_size": 8, "grad_accum": 1,
                                                     "samples_per_cell": 24},
            "arm_info": {a: {"objective": study.arm_objective(grid, grid["arms"][a]), "reads_report": False}
                         for a in grid["arms"]}}
    study.report(fake, tmp_path, 200, force=False)
    (cmp,) = fake["comparisons"]
    assert cmp["interval"] == "seeds and test patients" and cmp["seeds_paired"] and cmp["seeds_a"] == [0, 1, 2]
    assert cmp["ci"][0] < 0 < cmp["ci"][1] and 0 < cmp["test_noise_only"]["ci"][0]
    md = (tmp_path / "study.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| labels0.1 | vkd |"))
    headline, noise = row.split(" | ")[-2:]
    assert headline == f"{cmp['delta']:+.3f} [{cmp['ci'][0]:+.3f}, {cmp['ci'][1]:+.3f}], p = {cmp['p_value']:.3g}"
    assert noise == f"{cmp['delta']:+.3f} [{cmp['test_noise_only']['ci'][0]:+.3f}, " \
        f"{cmp['test_noise_only']['ci'][1]:+.3f}], p < {2 / 201:.3g} |"
    assert "test-set noise only" in md and "over seeds and test patients" in md.replace("\n", " ")
    old = {k: v for k, v in cmp.items() if k not in ("test_noise_only", "interval")}  # from before the headline
    fake["comparisons"] = [old]
    monkeypatch.setattr(compare_module, "_seeds", lambda runs: pytest.fail("cached: not compared again"))
    study.report({**fake, "comparisons": [cmp]}, tmp_path, 200, force=False)  # the same entry: reused
    monkeypatch.setattr(compare_module, "_seeds", lambda runs: [arm_seed(r)[1] for r in runs])
    study.report(fake, tmp_path, 200, force=False)
    assert fake["comparisons"][0]["interval"] == "seeds and test patients"


def test_seed_stats_rederives_the_published_comparisons():
    """benchmarks/study/seed_stats.py, the seed-level figures of docs/evidence.md: vkd_distil - kd from its
    published per-seed deltas is the paired t over seeds computed by hand ([-0.011, +0.044], p 0.17), and every
    headline holds its seeds-only interval and is wider than the test-set-noise-only one it started from."""
    from benchmarks.study import seed_stats

    rows = {(c.regime, c.a, c.b): seed_stats.derive(c) for c in seed_stats.PUBLISHED}
    distil_kd = rows[("labels0.1", "vkd_distil", "kd")]
    assert distil_kd["seeds_only"]["ci"] == pytest.approx((-0.0111, 0.0439), abs=5e-4)
    assert distil_kd["seeds_only"]["p_value"] == pytest.approx(0.17, abs=0.01)
    assert distil_kd["headline"]["ci"][0] < 0 < distil_kd["headline"]["ci"][1]
    for c in seed_stats.PUBLISHED:
        head, seeds = rows[(c.regime, c.a, c.b)]["headline"]["ci"], rows[(c.regime, c.a, c.b)]["seeds_only"]["ci"]
        assert head[0] <= seeds[0] and seeds[1] <= head[1]
        assert head[1] - head[0] > c.noise_ci[1] - c.noise_ci[0]
    assert seed_stats.table().count("\n") == len(seed_stats.PUBLISHED) + 1

def test_the_testbed_regimes_and_the_labeller_arm_reach_the_cells_and_the_corpora(tmp_path, monkeypatch):
    from vkd_dist.config import read_config

    grid = _grid("--regimes", "testbed0.1,testbed1,labels0.1", "--arms", "labeller,image_only", "--seeds", "1")
    assert grid["regimes"]["testbed0.1"] == {**grid["regimes"]["labels0.1"], "testbed": True}
    items = study.cell_overrides(grid, tmp_path, "testbed0.1", "labeller", 0)
    assert f"data.path={tmp_path.resolve()}/data/testbed0.1-labeller" in items and "objective.name=image_only" in items
    assert "data.synthetic.testbed=True" in items and "data.synthetic.label_fraction=0.1" in items
    assert f"data.path={tmp_path.resolve()}/data/labels0.1-subset0" in study.cell_overrides(grid, tmp_path,
                                                                                           "labels0.1", "image_only", 0)
    assert read_config(None, items, checks=()).data.synthetic.testbed is True  # each key is a config key, typed
    gold = _grid("--regimes", "testbed0.1", "--arms", "image_only", "--corpus", "gold_fraction=1")
    assert "data.synthetic.gold_fraction=1.0" in study.cell_overrides(gold, tmp_path, "testbed0.1", "image_only", 0)
    with pytest.raises(study.StudyError, match=r"--corpus miss_rate=0.7: testbed miss_rate 0.7 must be in \[0, 0.5\]"):
        _grid("--regimes", "testbed0.1", "--arms", "image_only", "--corpus", "miss_rate=0.7")
    built, labelled = [], []
    import vkd_dist.data.relabel
    import vkd_dist.data.testbed

    monkeypatch.setattr(vkd_dist.data.testbed, "build_corpus", lambda out, knobs: built.append((out.name, knobs))
                        or {"params": {"testbed": {"miss_rate": 0.1, "false_rate": 0.02, "hedge_rate": 0.15},
                                       "labeller_vs_truth": {"missed": 0.1, "false": 0.02, "hedged": 0.15,
                                                             "present": 1, "absent": 1, "mentioned": 1}}})
    monkeypatch.setattr(vkd_dist.data.relabel, "label_corpus", lambda src, out: labelled.append((src.name, out.name)))
    study.build_corpora(grid, tmp_path)
    assert [name for name, _ in built] == ["testbed0.1-subset0", "testbed1", "labels0.1-subset0"]
    assert built[0][1]["label_seed"] == 0 and "label_seed" not in built[1][1]
    sources = {"testbed0.1": "testbed0.1-subset0", "testbed1": "testbed1", "labels0.1": "labels0.1-subset0"}
    assert labelled == [(source, f"{regime}-labeller") for regime, source in sources.items()]


def test_a_testbed_regime_is_not_a_point_of_the_label_fraction_plot(tmp_path, monkeypatch):
    import matplotlib.figure

    grid = _grid("--regimes", "labels0.1,n2000,testbed0.1", "--arms", "image_only", "--seeds", "1")
    summaries = [{"regime": r, "arm": "image_only", "mean": 0.7, "ci95": [0.6, 0.8], "reads_report": False}
                 for r in grid["regimes"]]
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    assert study.plot_knob({"grid": grid, "summaries": summaries}, tmp_path, "label_fraction", "t")
    xs = [list(line.get_xdata()) for line in figures[0].axes[0].get_lines() if line.get_label() == "image_only"]
    assert xs == [[0.1, 1.0]]  # labels0.1 and n2000; testbed0.1 is another corpus
