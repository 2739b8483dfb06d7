"""Smoke test of benchmarks/throughput.py in --quick mode: every part runs and the JSON holds every figure.

No timing asserts: this machine is shared and noisy; the figures themselves live in the README."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "throughput.py"
PARTS = "decode,pipeline,open_clip,model_step,trainer,end_to_end,mfu,frozen_text"
RATES = ["decode_img_s_per_core", "pipeline_samples_s_per_worker", "pipeline_samples_s_per_worker_epoch2", "pipeline_samples_s_n_workers",
         "open_clip_samples_s_per_worker", "open_clip_no_augment_samples_s_per_worker", "token_table_reports_s",
         "pipeline_no_token_table_samples_s_per_worker", "model_step_samples_s", "bare_loop_samples_s", "trainer_samples_s",
         "trainer_bare_loop_samples_s", "end_to_end_samples_s", "end_to_end_model_step_samples_s",
         "flops_per_sample", "matmul_flop_s", "mfu_model_step_samples_s", "live_trainable_samples_s", "live_frozen_samples_s",
         "fast_path_samples_s"]
RATIOS = ["pipeline_vs_decode", "pipeline_epoch2_vs_decode", "trainer_vs_bare_loop", "end_to_end_vs_model_step", "pipeline_vs_open_clip",
          "pipeline_vs_open_clip_no_augment", "mfu", "mfu_model_step", "pipeline_n_workers_vs_one", "frozen_text_vs_live", "frozen_text_vs_live_trainable"]


def _run(tmp_path, only: str, timeout: int):
    out = tmp_path / "bench.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--only", only, "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| **ratio** |" in proc.stdout  # the markdown table is printed
    return json.loads(out.read_text())


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.timeout(180)
def test_throughput_quick_has_every_figure(tmp_path):
    res = _run(tmp_path, PARTS, 170)
    for key in RATES:
        assert _positive(res.get(key)), (key, res.get(key))
    for key in RATIOS:
        assert _positive(res["ratios"].get(key)), (key, res["ratios"].get(key))
    assert 0 <= res["end_to_end_data_wait_frac"] <= 1
    assert 0 < res["ratios"]["mfu"] < 1 and 0 < res["ratios"]["mfu_model_step"] < 1
    assert res["pipeline_workers"] >= 1 and res["quick"] is True
    assert set(res["breakdown_ms_per_sample"]) >= {"decode", "collate, token table", "collate, no table, tokenising"}
    assert any(k.startswith("batch augment on cpu") for k in res["breakdown_ms_per_sample"])
    assert res["open_clip_version"] == "3.3.0"
    assert res["machine"]["torch"] and res["seconds"]["total"] > 0


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_throughput_quick_scaling(tmp_path):
    """1 vs 2 processes (DDP over gloo) through torchrun; DeepSpeed stages only run outside --quick."""
    res = _run(tmp_path, "scaling", 280)
    for name, nproc in (("1proc", 1), ("ddp_2proc", 2)):
        run = res["scaling"][name]
        assert "error" not in run, run.get("error")
        assert run["processes"] == nproc and _positive(run["samples_s"]) and _positive(run["step_ms"])
        assert len(run["peak_rss_mb_per_rank"]) == nproc and all(_positive(m) for m in run["peak_rss_mb_per_rank"])
    assert _positive(res["ratios"]["weak_scaling_efficiency_2proc"])
