"""Faults in the data: the skip-rate ceiling (vkd_dist/data/faults.py) and resuming a run exactly when corrupt
samples were skipped. The stream-level tests are in test_pipeline.py."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from test_pipeline import corrupt_copy
from test_train import StopAfter
from vkd_dist import checkpoint
from vkd_dist.config import ConfigError
from vkd_dist.configure import load_config
from vkd_dist.data.faults import WINDOW, SkipLedger, SkipRateError
from vkd_dist.train import train


def _fail(ledger, n, kind=None):
    for i in range(n):
        ledger.failed(kind or ValueError("the json has no 'labels' mapping"), f"k{i}", "shard-000000.tar")


def test_the_ceiling_counts_the_last_reads_and_treats_a_short_start_as_good():
    ledger = SkipLedger(0.05)  # more than 10 of the last 200
    _fail(ledger, 10)
    with pytest.raises(SkipRateError, match=r"11 of the last 11 .* \(11 of 11\): ValueError: the json has no "
                                            r"'labels' mapping; first at sample k0 in shard-000000.tar"):
        _fail(ledger, 1)

    ledger = SkipLedger(0.05)
    _fail(ledger, 10)
    for _ in range(WINDOW - 10):
        ledger.ok()
    _fail(ledger, 5)  # each pushes the oldest failure out of the window: still 10 in the last 200
    assert ledger.failures == 10 and ledger.count == 15
    for _ in range(WINDOW):  # every failure out of the window ...
        ledger.ok()
    _fail(ledger, 3)
    with pytest.raises(SkipRateError, match=r"\(8 of 11\): OSError: truncated; first at sample k0"):
        _fail(ledger, 8, OSError("truncated"))  # ... then 11 new ones of two kinds


@pytest.mark.parametrize("frac, stops_after", [(0.0, 1), (1.0, None)])
def test_the_ceiling_bounds(frac, stops_after):
    ledger = SkipLedger(frac)
    if stops_after is None:
        _fail(ledger, 3 * WINDOW)  # 1: never stops
    else:
        with pytest.raises(SkipRateError):
            _fail(ledger, stops_after)


@pytest.mark.parametrize("override, message", [
    ("data.max_skip_frac=1.5", r"data.max_skip_frac=1.5 must be in \[0, 1\]"),
    ("data.shared_group=no-such-group-vkd", r"data.shared_group='no-such-group-vkd': no such group on "),
])
def test_fault_settings_are_checked_up_front(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[f"run_dir={tmp_path}", override])


def _params(run):
    return load_file(checkpoint.latest(run) / "model.safetensors")


def test_a_run_resumed_after_skipping_corrupt_samples_equals_the_uninterrupted_run(tiny_data, tmp_path):
    """Two loader workers, corrupt samples early in their streams: the checkpoint holds each worker's raw position
    (train_state.json data_offsets), so the resumed run trains on exactly the batches the uninterrupted one did."""
    data = corrupt_copy(tiny_data, tmp_path / "data", lambda key: int(key.split("-")[1]) % 7 == 0)
    common = {"train.max_steps": 6, "train.ckpt_every": 6, "train.test_at_end": False, "data.num_workers": 2}
    train(load_config(overrides=tiny_overrides(data, tmp_path / "a", **common)))
    partial = train(load_config(overrides=tiny_overrides(data, tmp_path / "b", **common)), stop=StopAfter(3))
    assert partial.preempted and partial.step == 3
    state = json.loads((checkpoint.latest(tmp_path / "b") / "train_state.json").read_text())
    assert state["batch_in_epoch"] == 3 and len(state["data_offsets"]) == 1 and len(state["data_offsets"][0]) == 2
    assert sum(state["data_offsets"][0]) > 2 * 8  # the round's 2 batches of 8, and the corrupt samples read too
    # The same checkpoint as one written before data_offsets existed: it resumes, but on shifted batches.
    shutil.copytree(tmp_path / "b", tmp_path / "old")
    old_state = checkpoint.latest(tmp_path / "old") / "train_state.json"
    old_state.write_text(json.dumps({k: v for k, v in state.items() if k != "data_offsets"}))
    checkpoint.write_manifest(old_state.parent)  # as saved: the resume verifies the files against it
    for run in ("b", "old"):
        resumed = train(load_config(overrides=tiny_overrides(data, tmp_path / run, resume="latest", **common)))
        assert resumed.step == 6
    a, b, old = _params(tmp_path / "a"), _params(tmp_path / "b"), _params(tmp_path / "old")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], old[k]) for k in a)
