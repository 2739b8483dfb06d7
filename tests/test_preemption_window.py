"""A stop saves first (issue 20): a stop that lands on an evaluation step writes the checkpoint before any
validation and leaves the validation to the resumed attempt, which ends bit-identical to an uninterrupted run; a
notice during `finish` (the final export and test) ends the attempt as preempted, and the requeued attempt
finishes the test."""

import json

import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from vkd_dist import actions
from vkd_dist.configure import load_config
from vkd_dist.train import StopRequest, train


class StopAt(StopRequest):
    """A preemption notice that every rank sees at its `at`-th question (the loop asks once per step)."""

    def __init__(self, at: int):
        super().__init__(install=False)
        self.at, self.asked = at, 0

    def agreed(self, accelerator) -> bool:
        self.asked += 1
        return self.asked >= self.at


def _cfg(data, run, **extra):
    return load_config(overrides=tiny_overrides(data, run, **{"train.max_steps": 6, "train.eval_every": 2,
                                                               "train.ckpt_every": 100, **extra}))


def test_a_stop_on_an_evaluation_step_checkpoints_before_validating(tiny_data, tmp_path, monkeypatch):
    order = []
    real_evaluate, real_save = actions.evaluate, actions.checkpoint.save
    monkeypatch.setattr(actions, "evaluate", lambda *a, **k: order.append(("val", k.get("checkpoint_name")))
                        or real_evaluate(*a, **k))
    monkeypatch.setattr(actions.checkpoint, "save", lambda acc, run_dir, step, *a, **k: order.append(("save", step))
                        or real_save(acc, run_dir, step, *a))

    whole = train(_cfg(tiny_data, tmp_path / "whole"))
    order.clear()
    run = tmp_path / "stopped"
    first = train(_cfg(tiny_data, run), stop=StopAt(4))  # the notice at step 4, an evaluation step
    assert first.preempted and first.step == 4
    assert order == [("val", "step-00000002"), ("save", 4)]  # step 4: the checkpoint, no validation
    assert json.loads((run / "checkpoints" / "step-00000004" / "train_state.json").read_text())["deferred"] == \
        ["Validate"]
    order.clear()
    second = train(_cfg(tiny_data, run, resume="latest"), stop=StopRequest(install=False))
    assert order[0] == ("val", "step-00000004")  # the deferred validation, first
    assert second.step == 6 and second.val["macro_auroc"] == whole.val["macro_auroc"]
    a, b = load_file(tmp_path / "whole" / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical to the uninterrupted run
    assert second.test == whole.test


def test_a_notice_during_finish_is_a_preemption_and_the_requeue_finishes(tiny_data, tmp_path):
    run = tmp_path / "run"
    first = train(_cfg(tiny_data, run), stop=StopAt(7))  # 6 steps ask 6 times; the 7th question is in finish
    assert first.preempted and first.step == 6 and first.test is None
    assert (run / "final" / "model.safetensors").is_file() and not (run / "test_metrics.json").exists()
    assert (run / "checkpoints" / "step-00000006").is_dir()
    second = train(_cfg(tiny_data, run, resume="latest"), stop=StopRequest(install=False))
    assert not second.preempted and second.step == 6 and second.test is not None
    assert json.loads((run / "test_metrics.json").read_text())["macro_auroc"] == second.test["macro_auroc"]
