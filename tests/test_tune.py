"""benchmarks/study/tune.py, the tuning pilot: each arm's trials (the same number for every arm, seeded, distinct,
real config keys), the pilot run as a study with the training stubbed (which cells, with what settings, scored on
validation only), tuned.json's choice, and the table study reading it (`--tuned`): the best settings reach the
cells, and the pilot's seed or an unfinished pilot is refused."""

import json
import sys

import pytest

from conftest import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import study  # noqa: E402
from benchmarks.study import cells, cli, tune  # noqa: E402

ARMS = ["image_only", "kd", "contrastive"]


@pytest.mark.parametrize("arm", list(tune.SPACES))
def test_every_arm_gets_the_same_number_of_distinct_trials_of_real_keys(arm):
    from vkd_dist.config import read_config

    trials = tune.trials_of(arm, tune.TRIALS, [])
    assert len(trials) == tune.TRIALS and trials[0] == [] and trials == tune.trials_of(arm, tune.TRIALS, [])
    assert len({tuple(t) for t in trials}) == tune.TRIALS  # distinct
    own = [i for i in study.ARMS[arm] if "=@" not in i]  # KEY=@ARM: another run's path, set per cell
    keys = list(tune.SPACES[arm])

    def values(cfg):
        return [eval(f"cfg.{k}", {"cfg": cfg}) for k in keys]  # noqa: S307 (dotted config keys, ours)

    defined = values(read_config(None, own, checks=()))  # schema defaults and configs/default.yaml
    for trial in trials[1:]:
        assert [t.partition("=")[0] for t in trial] == keys
        assert values(read_config(None, [*own, *trial], checks=())) != defined  # none repeats the arm as defined


def test_every_trial_differs_from_the_arm_as_defined_however_many_there_are():
    space = tune.space_of("pseudo")
    n = 1
    for values in space.values():
        n *= len(values)
    trials = tune.trials_of("pseudo", n, [])  # the whole space but the defined point, besides trial 0
    assert len({tuple(t) for t in trials}) == n
    assert ["optim.lr=0.001", "optim.weight_decay=0.05", "data.labelled_share=0.5"] not in trials
    with pytest.raises(study.StudyError, match=f"fewer than --trials {n + 1} - 1"):
        tune.trials_of("pseudo", n + 1, [])
    assert "data.labelled_share" not in tune.space_of("kd", every_label=True)  # no batch is composed there


def test_a_space_smaller_than_the_trials_is_refused(monkeypatch):
    monkeypatch.setitem(tune.SPACES, "image_only", {"optim.lr": [1e-3, 2e-3]})
    with pytest.raises(study.StudyError, match="holds 1 settings besides the arm as defined, fewer than --trials 8"):
        tune.trials_of("image_only", 8, [])


@pytest.fixture
def pilot(tmp_path, monkeypatch):
    """The pilot of three arms, 3 trials each, with training stubbed: a trial's validation score is read off its
    settings (lr 2e-3 scores best), and every cell's overrides are kept."""
    seen = {}

    def fake_run_cell(grid, out, regime, arm, seed):
        items = study.cell_overrides(grid, out, regime, arm, seed)
        seen[arm] = items
        val = 0.6 + (0.1 if "optim.lr=0.002" in items else 0.0) + 0.001 * len(items)
        return {"status": "ok", "exit_code": 0, "seconds": 0.0, "error": None, "test_macro_auroc": None,
                "best_val_macro_auroc": val, "best_step": 300}

    monkeypatch.setattr(cells, "run_cell", fake_run_cell)
    monkeypatch.setattr(cli, "build_corpora", lambda grid, out: None)
    argv = ["--out", str(tmp_path / "pilot"), "--regime", "testbed0.1", "--arms", ",".join(ARMS), "--trials", "3",
            "--seed", "100", "--set", "train.max_steps=300"]
    return tmp_path, argv, seen


def test_the_pilot_trains_each_trial_on_its_own_seed_and_subset_without_the_test_split(pilot):
    tmp_path, argv, seen = pilot
    assert tune.main(argv) == 0
    tuned = json.loads((tmp_path / "pilot" / "tuned.json").read_text())
    # the trials, and the teacher and pre-training run they read, each once
    assert sorted(seen) == sorted([f"{a}.t{k}" for a in ARMS for k in range(3)] + ["text_only", "contrastive_pre"])
    for items in seen.values():
        assert "train.test_at_end=false" in items and "train.seed=100" in items
        assert "data.synthetic.label_seed=100" in items or "-labeller" in next(i for i in items if "data.path" in i)
    kd_trial = seen["kd.t1"]
    assert f"objective.kd_teacher={(tmp_path / 'pilot' / 'runs/testbed0.1/text_only/seed100').resolve()}" in kd_trial
    assert tuned["seeds"] == [100] and tuned["regime"] == "testbed0.1" and tuned["trials"] == 3
    for arm in ARMS:
        entry = tuned["arms"][arm]
        assert entry["complete"] and len(entry["trials"]) == 3
        best = max(entry["trials"], key=lambda r: r["val_macro_auroc"])
        assert entry["best"] == best and entry["best"]["overrides"] == tune.trials_of(arm, 3, [
            "train.max_steps=300", "train.test_at_end=false"])[best["trial"]]
    assert "| kd |" in (tmp_path / "pilot" / "tuned.md").read_text()
    assert tune.main(argv) == 0  # again: nothing trains twice
    assert json.loads((tmp_path / "pilot" / "tuned.json").read_text())["arms"] == tuned["arms"]


def test_the_table_runs_each_arm_at_its_best_trial_and_never_on_the_pilot_seed(pilot):
    tmp_path, argv, _ = pilot
    assert tune.main(argv) == 0
    path = tmp_path / "pilot" / "tuned.json"
    best = json.loads(path.read_text())["arms"]
    grid = study.build_grid(study.parse_args(["--regimes", "testbed0.1", "--arms", "image_only,kd,contrastive",
                                              "--seeds", "2", "--set", "train.max_steps=300", "--tuned", str(path)]))
    assert grid["arms"]["kd"] == [*study.ARMS["kd"], *best["kd"]["best"]["overrides"]]
    assert grid["arms"]["text_only"] == study.ARMS["text_only"]  # the teachers run as defined
    assert grid["arms"]["contrastive_pre"] == study.ARMS["contrastive_pre"]
    assert grid["tuned"]["arms"]["image_only"] == best["image_only"]["best"]["overrides"]
    with pytest.raises(study.StudyError, match="the pilot trained seed 100"):
        study.build_grid(study.parse_args(["--regimes", "testbed0.1", "--arms", "kd", "--seeds", "2", "--set",
                                           "train.max_steps=300", "--first-seed", "99", "--tuned", str(path)]))
    with pytest.raises(study.StudyError, match="the pilot trained at train.max_steps=300, this study at 600"):
        study.build_grid(study.parse_args(["--regimes", "testbed0.1", "--arms", "kd", "--tuned", str(path)]))
    with pytest.raises(study.StudyError, match="arm vkd has a search space .* but the pilot did not tune it"):
        study.build_grid(study.parse_args(["--regimes", "testbed0.1", "--arms", "kd,vkd", "--set",
                                           "train.max_steps=300", "--tuned", str(path)]))
    unfinished = json.loads(path.read_text())
    unfinished["arms"]["kd"]["complete"] = False
    path.write_text(json.dumps(unfinished))
    with pytest.raises(study.StudyError, match="the pilot of kd has not finished every trial"):
        study.build_grid(study.parse_args(["--regimes", "testbed0.1", "--arms", "kd", "--set", "train.max_steps=300",
                                           "--tuned", str(path)]))
    path.write_text("{}")
    with pytest.raises(study.StudyError, match="not a tuning result"):
        study.build_grid(study.parse_args(["--regimes", "testbed0.1", "--arms", "kd", "--tuned", str(path)]))


def test_a_pilot_arm_without_a_space_is_refused(tmp_path, capsys):
    assert tune.main(["--out", str(tmp_path), "--regime", "testbed0.1", "--arms", "vkd_paper"]) == 2
    assert "no search space for 'vkd_paper'" in capsys.readouterr().err
