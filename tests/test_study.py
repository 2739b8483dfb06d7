"""benchmarks/study.py: a tiny study through the real command and the real trainer (configs/tiny.yaml, 2 steps,
one regime, 2 arms x 2 seeds), run in stages on one OUT: a cell that fails at run time (a checkpoint that does not
verify, planted in its run directory) is recorded and the others still run; the same command then retries it and
skips the rest; once more, it trains nothing; another grid in the same OUT is refused. And the grid's pieces,
in-process, without training.

The staged study launches the trainer 5 times (~12 s each, ~7 s of it imports) and loads the runs twice for the
comparison: 85-100 s on this 2-core VM. The grid tests take about a second."""

import json
import shutil
import subprocess
import sys
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
                                               "num_val": 400, "num_test": 1000, "image_size": 128, "seed": 0}
    assert list(full["arms"]) == list(study.ARMS) and full["seeds"] == [0, 1, 2, 3, 4]
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
