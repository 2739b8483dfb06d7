"""The benchmarks package: a smoke test of benchmarks/throughput.py in --quick mode (every part runs and the JSON
holds every figure), its profile helpers, and the tiny configuration it shares with the tests (configs/tiny.yaml).

No timing asserts: this machine is shared and noisy; the figures themselves live in docs/performance.md."""

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, TINY_CONFIG, tiny_overrides

if str(REPO) not in sys.path:  # the benchmarks package, as `python -m benchmarks` sees it
    sys.path.insert(0, str(REPO))

SCRIPT = REPO / "benchmarks" / "throughput.py"
PARTS = "decode,pipeline,open_clip,model_step,trainer,end_to_end,mfu,frozen_text"
RATES = ["decode_img_s_per_core", "pipeline_samples_s_per_worker", "pipeline_samples_s_per_worker_epoch2",
         "pipeline_samples_s_n_workers", "open_clip_samples_s_per_worker", "open_clip_no_augment_samples_s_per_worker",
         "token_table_reports_s", "pipeline_no_token_table_samples_s_per_worker", "model_step_samples_s",
         "bare_loop_samples_s", "trainer_samples_s", "trainer_bare_loop_samples_s", "end_to_end_samples_s",
         "end_to_end_model_step_samples_s", "flops_per_sample", "matmul_flop_s", "mfu_model_step_samples_s",
         "live_trainable_samples_s", "live_frozen_samples_s", "fast_path_samples_s"]
RATIOS = ["pipeline_vs_decode", "pipeline_epoch2_vs_decode", "trainer_vs_bare_loop", "end_to_end_vs_model_step",
          "pipeline_vs_open_clip", "pipeline_vs_open_clip_no_augment", "mfu", "mfu_model_step",
          "pipeline_n_workers_vs_one", "frozen_text_vs_live", "frozen_text_vs_live_trainable"]


def _run(tmp_path, only: str, timeout: int):
    out = tmp_path / "bench.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--only", only, "--json",
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
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
    tiny = yaml.safe_load(TINY_CONFIG.read_text())["model"]  # --quick is the tests' tiny model
    assert res["model"]["text_config"] == tiny["text_config"] and res["image_size"] == 64


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


@pytest.mark.timeout(120)
def test_profile_part_breaks_the_step_down(tmp_path):
    """The profile part: every component timed and counted, the components' FLOPs add up to the mfu part's
    FLOPs of one step, busy + host = wall, and the trace it names holds the component ranges."""
    import gzip

    res = _run(tmp_path, "mfu,profile", 110)
    p = res["profile"]
    comps = p["components"]
    assert list(comps) == ["augment", "image_encoder.fwd", "text_encoder.fwd", "heads_loss.fwd", "heads_loss.bwd",
                           "text_encoder.bwd", "image_encoder.bwd", "grad_clip", "optimizer.step"]
    for name, c in comps.items():
        assert _positive(c["wall_ms"]) and 0 <= c["busy_ms"] <= c["wall_ms"] + 1e-3, (name, c)
        assert c["host_ms"] == pytest.approx(c["wall_ms"] - c["busy_ms"], abs=2e-3)
    for name in ("image_encoder.fwd", "image_encoder.bwd", "text_encoder.fwd", "text_encoder.bwd", "heads_loss.fwd"):
        assert comps[name]["flops"] > 0 and 0 < comps[name]["mfu_vs_matmul"] < 1, name
    assert "mfu_vs_peak" not in comps["image_encoder.fwd"] and p["peak_flop_s"] is None  # no datasheet peak on a CPU
    assert p["flops_per_sample"] == pytest.approx(res["flops_per_sample"], rel=1e-3)
    assert p["text_attn_implementation"] == "sdpa" and p["image_attention"].startswith("fused")
    assert set(p["optimizer_impl_ms"]) == {"fused", "foreach", "single_tensor"}
    assert set(p["text_fwd_bwd_ms_by_attention"]) == {"sdpa", "eager"}
    assert p["trace"] == str(tmp_path / "bench.trace.json.gz")
    with gzip.open(p["trace"], "rt") as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    assert {f"vkd/split/{c}" for c in comps} | {"vkd/step"} <= names


def test_profile_helpers_peaks_intervals_and_cpu_sdpa_flops():
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertConfig, BertModel

    from benchmarks import profile_tools

    assert profile_tools.datasheet_peak("NVIDIA H200")[0] == 989e12
    assert profile_tools.datasheet_peak("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert profile_tools.datasheet_peak("NVIDIA H100 PCIe")[0] == 756e12
    assert profile_tools.datasheet_peak("NVIDIA H200 NVL")[0] == 835e12
    assert profile_tools.datasheet_peak("NVIDIA H200", 500)[0] == 500e12
    assert profile_tools.datasheet_peak("Some GPU")[0] is None
    # [0,10) and [5,20) overlap, [30,40) is clipped to [30,35): 20 + 5 us
    assert profile_tools.union_ms([(0, 10), (5, 20), (30, 40), (50, 60)], 0, 35) == pytest.approx(0.025)
    # SDPA without dropout runs torch's CPU flash kernel, which flop_counter does not count by itself
    profile_tools.register_cpu_sdpa_flops()
    flops = {}
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)
        bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    vocab_size=50, attn_implementation=impl), add_pooling_layer=False).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            bert(input_ids=torch.randint(5, 50, (2, 16)), attention_mask=torch.ones(2, 16, dtype=torch.long))
        flops[impl] = counter.get_total_flops()
    assert flops["sdpa"] == flops["eager"] > 0


# The old literal of tests/conftest.py tiny_overrides, before configs/tiny.yaml: the file must give the same config.
OLD_TINY = {
    "data.build_synthetic": False, "data.image_size": 64, "data.batch_size": 8, "data.eval_batch_size": 32,
    "data.num_workers": 0, "data.shuffle_buffer": 16, "model.image_encoder": "vit_small_patch16_224",
    "model.image_encoder_kwargs": "{depth: 2, embed_dim: 48, num_heads: 2, patch_size: 16}",
    "model.text_config": "{hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 128}",
    "model.vocab_size": 400, "model.latent_dim": 16, "model.hidden_dim": 32, "model.num_samples": 2,
    "train.max_steps": 6, "train.eval_every": 100, "train.ckpt_every": 100, "logging.log_every": 2,
    "logging.progress": False, "optim.warmup_steps": 2,
}


@pytest.mark.parametrize("extra", [{}, {"objective": "image_only", "data.image_size": 48, "train.max_steps": 3,
                                        "model.text_config.hidden_size": 32}])
def test_tiny_overrides_give_the_config_of_the_old_literal(tmp_path, extra):
    from vkd_dist.configure import load_config

    (tmp_path / "dataset.json").write_text("{}")  # what validation looks for at data.path
    old = {"run_dir": str(tmp_path / "run"), "data.path": str(tmp_path), **OLD_TINY}
    old.update(extra)  # the old function's dict update: an extra key replaced the base one in place
    want = load_config(overrides=[f"{k}={v}" for k, v in old.items()])
    got = load_config(overrides=tiny_overrides(tmp_path, tmp_path / "run", **extra))
    assert got == want
    assert got.model.image_encoder_kwargs == {"depth": 2, "embed_dim": 48, "num_heads": 2, "patch_size": 16}


def test_an_overlay_as_overrides_is_the_overlay_as_a_config_file(tmp_path):
    """overrides_from_yaml on top of the default config = the same YAML as a config file including the default:
    scalars keep their type (a quoted "yes", 1.0e-5, null), free-form mappings replace rather than merge."""
    from vkd_dist.config import DEFAULT_CONFIG, overrides_from_yaml
    from vkd_dist.configure import load_config

    overlay = ("optim: {lr: 1.0e-5, betas: [0.8, 0.9]}\n"
               "model: {tokenizer: null, text_config: {hidden_size: 32}, image_encoder_kwargs: {drop_rate: 0.1}}\n"
               "objective: {name: image_only}\nrun_dir: 'runs/a=b: c'\ntrain: {seed: 7, compile: false}\n"
               "data: {val_split: 'yes'}\n")
    (tmp_path / "overlay.yaml").write_text(overlay)
    (tmp_path / "full.yaml").write_text(f"include: [{DEFAULT_CONFIG}]\n" + overlay)
    got = load_config(overrides=overrides_from_yaml(tmp_path / "overlay.yaml"))
    assert got == load_config(tmp_path / "full.yaml")
    assert got.model.text_config == {"hidden_size": 32} and got.optim.lr == 1e-5 and got.run_dir == "runs/a=b: c"
    assert got.objective.name == "image_only" and got.data.val_split == "yes"


def test_memory_stream_serves_its_batches_every_epoch_from_skip():
    from benchmarks._trainer_runs import MemoryStream, take_batches

    stream = MemoryStream(["a", "b", "c"])
    assert stream.batches_per_epoch == 3
    assert list(stream.epoch(0, 0)) == ["a", "b", "c"] and list(stream.epoch(5, 2)) == ["c"]
    assert take_batches(stream, 5) == ["a", "b", "c", "a", "b"]
