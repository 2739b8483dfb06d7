"""benchmarks/vkd_diagnostics.py on a real (tiny) vkd run: its image path is the deployed model, so on the test
split it must give the trainer's own test macro AUROC (final/ = the last checkpoint)."""

import json
import sys

import pytest

from conftest import REPO, tiny_overrides
from vkd_dist.configure import load_config
from vkd_dist.train import train

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import vkd_diagnostics  # noqa: E402


@pytest.mark.parametrize("image_head", ["shared", "separate"])
def test_diagnostics_of_a_vkd_run(tiny_data, tmp_path, capsys, image_head):
    run = tmp_path / "vkd"
    result = train(load_config(overrides=tiny_overrides(tiny_data, run, **{"train.max_steps": 4,
                                                                             "model.image_head": image_head})))
    row = vkd_diagnostics.diagnose(run, split="test")
    assert row["checkpoint"] == "step-00000004"
    assert row["image_macro_auroc"] == pytest.approx(result.test["macro_auroc"], abs=1e-6)
    assert row["report_macro_auroc"] is not None and row["report_macro_auroc"] != row["image_macro_auroc"]
    assert row["latent_dim"] == 16 and 0 <= row["active_dims"] <= 16
    assert row["kl_nats"] > 0 and row["sigma_q"] > 0 and row["sigma_p"] > 0 and row["r2_prior_to_posterior"] <= 1
    assert row["prior_snr"] > 0 and 0 <= row["snr_dims"] <= 16 and row["image_head"] == image_head
    assert row["probe_r2_features_to_posterior"] <= 1
    out = tmp_path / "diag.json"
    assert vkd_diagnostics.main([str(run), "--split", "test", "--out", str(out)]) == 0
    assert json.loads(out.read_text())[0]["kl_nats"] == pytest.approx(row["kl_nats"])
    assert f"| {run} | {row['image_macro_auroc']:.3f} |" in capsys.readouterr().out


def test_a_run_with_one_path_is_refused(tiny_data, tmp_path, capsys):
    run = tmp_path / "image_only"
    overrides = tiny_overrides(tiny_data, run, objective="image_only",
                               **{"train.max_steps": 2, "train.test_at_end": False})
    train(load_config(overrides=overrides))
    assert vkd_diagnostics.main([str(run)]) == 2
    assert "objective image_only trains one path" in capsys.readouterr().err


def test_the_linear_probe_holds_out_each_patient():
    """The probe predicts each sample from a ridge fit without its patient: a linear target is recovered (R2 near
    1), noise is not (R2 near or below 0)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(60, 5)))
    patients = [i // 2 for i in range(60)]
    linear = x @ torch.from_numpy(rng.normal(size=(5, 3)))
    assert vkd_diagnostics.probe_r2(x, linear, patients) > 0.99
    assert vkd_diagnostics.probe_r2(x, torch.from_numpy(rng.normal(size=(60, 3))), patients) < 0.1
    assert vkd_diagnostics.probe_r2(x, linear, [0] * 60) is None  # one patient: no held-out fold

