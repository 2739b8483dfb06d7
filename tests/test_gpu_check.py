"""What benchmarks/gpu_check.sh measures on a GPU, checked on the CPU: the SDPA attention path of the text
encoder, timm's fused ViT attention, the fused/foreach AdamW and its checkpoints, and the script's dry run."""

import copy
import gzip
import json
import os
import re
import subprocess

import pytest
import torch

from conftest import REPO


def _model_cfg(**extra):
    from vkd_dist.config import ModelConfig

    text = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    return ModelConfig(text_config=text, **extra)


def _padded_batch(vocab: int = 60):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padded reports of different lengths
    mask[3, 3:] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_sdpa_and_eager_text_encoders_agree(pooling):
    from vkd_dist.models.encoders import attention_implementation, build_text_encoder

    sdpa = build_text_encoder(_model_cfg(text_pooling=pooling), vocab_size=60).eval()
    eager = build_text_encoder(_model_cfg(text_pooling=pooling, attn_implementation="eager"), vocab_size=60).eval()
    assert attention_implementation(sdpa.model) == "sdpa" and attention_implementation(eager.model) == "eager"
    eager.load_state_dict(sdpa.state_dict())
    ids, mask = _padded_batch()
    torch.testing.assert_close(sdpa(ids, mask), eager(ids, mask), atol=1e-5, rtol=0)
    with torch.no_grad():  # every real token's hidden state, not only the pooled vector
        a = sdpa.model(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
        b = eager.model(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_sdpa_is_the_default_and_is_validated():
    from vkd_dist.config import ConfigError
    from vkd_dist.configure import load_config

    assert load_config().model.attn_implementation == "sdpa"
    with pytest.raises(ConfigError, match=r"model.attn_implementation='flash'.*allowed: sdpa, eager"):
        load_config(overrides=["model.attn_implementation=flash"])


def test_a_local_model_gets_sdpa_or_falls_back_to_eager(tmp_path, monkeypatch):
    from transformers import BertConfig, BertModel

    from vkd_dist.models.encoders import attention_implementation, build_text_encoder

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=60)).save_pretrained(tmp_path / "bert")
    cfg = _model_cfg(text_encoder=str(tmp_path / "bert"))
    assert attention_implementation(build_text_encoder(cfg, 60).model) == "sdpa"
    monkeypatch.setattr(BertModel, "_supports_sdpa", False)  # a model type without an SDPA path
    with pytest.warns(UserWarning, match="using eager"):
        enc = build_text_encoder(cfg, 60)
    assert attention_implementation(enc.model) == "eager"


def test_timm_vit_attention_is_fused():
    """timm's ViT attention calls F.scaled_dot_product_attention (fused_attn) unless TIMM_FUSED_ATTN=0."""
    import timm.layers

    from vkd_dist.models.encoders import ImageEncoder

    enc = ImageEncoder("vit_small_patch16_224", 32, kwargs={"depth": 2, "embed_dim": 48, "num_heads": 2})
    flags = [m.fused_attn for m in enc.modules() if hasattr(m, "fused_attn")]
    assert timm.layers.use_fused_attn() and len(flags) == 2 and all(flags)


def _tiny_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def _cfg():
    from vkd_dist.configure import load_config

    return load_config(overrides=["optim.lr=0.01", "optim.weight_decay=0.1"])


def test_adamw_implementations_take_the_same_step():
    from vkd_dist.optim import adamw_implementation
    from vkd_dist.optim import build_optimizer as _optimizer

    assert adamw_implementation("cuda") == "fused" and adamw_implementation("cpu") == "fused"
    assert adamw_implementation("meta") == "foreach"
    cfg, after = _cfg(), {}
    for impl in ("single_tensor", "foreach", "fused"):
        model = _tiny_model()
        opt = _optimizer(model, cfg, implementation=impl)
        assert opt.param_groups[0]["fused"] is (True if impl == "fused" else None)
        opt.step()
        after[impl] = [p.detach().clone() for p in model.parameters()]
    assert _optimizer(_tiny_model(), cfg).param_groups[0]["fused"] is True  # the default on the CPU
    for impl in ("foreach", "fused"):
        for a, b in zip(after[impl], after["single_tensor"]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("saved_impl", ["before", "fused", "foreach"])
def test_checkpoints_resume_across_adamw_implementations(saved_impl):
    """An optimizer state saved before this change (AdamW without flags) or by another implementation loads,
    keeps this optimizer's implementation, and takes the step the saving optimizer would have taken."""
    from vkd_dist.optim import build_optimizer as _optimizer

    cfg = _cfg()
    model = _tiny_model()
    if saved_impl == "before":  # exactly what train._optimizer built before
        groups = [{"params": [model[0].weight, model[2].weight], "weight_decay": 0.1},
                  {"params": [model[0].bias, model[1].weight, model[1].bias, model[2].bias], "weight_decay": 0.0}]
        saving = torch.optim.AdamW(groups, lr=0.01, betas=(0.9, 0.999))
    else:
        saving = _optimizer(model, cfg, implementation=saved_impl)
    saving.step()
    state = copy.deepcopy(saving.state_dict())
    resumed_model = copy.deepcopy(model)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        q.grad = p.grad.clone()
    saving.step()  # the reference: the saving optimizer's second step
    for impl in ("fused", "foreach", "single_tensor"):
        m = copy.deepcopy(resumed_model)
        for p, q in zip(resumed_model.parameters(), m.parameters()):
            q.grad = p.grad.clone()
        opt = _optimizer(m, cfg, implementation=impl)
        opt.load_state_dict(state)
        assert opt.param_groups[0]["fused"] is (True if impl == "fused" else None)
        assert opt.param_groups[0]["foreach"] is {"foreach": True, "single_tensor": False}.get(impl)
        opt.step()
        for a, b in zip(m.parameters(), model.parameters()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        assert set(opt.state_dict()["state"][0]) == set(state["state"][0])  # one format for all


@pytest.mark.timeout(240)
def test_gpu_check_dry_run(tmp_path):
    """The whole script on the CPU at tiny sizes. One step is made to fail: it is reported and the later steps
    still run (and eager's minutes are saved: the compiled step runs the same parts, uncompiled on a CPU)."""
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_FAIL_STEP="eager", TMPDIR=str(tmp_path))
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=230)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # the failed step
    summary = json.loads((out / "summary.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status == {"setup": "ok", "corpus": "ok", "eager": "failed (rc 1)", "compiled": "ok",
                      "scaling": "skipped (0 GPUs)"}, status
    assert "| compiled | ok |" in proc.stdout and "| trainer_vs_bare_loop |" in proc.stdout  # the summary table
    files = sorted(p.name for p in out.iterdir())
    assert files == ["compiled.json", "compiled.trace.json.gz", "gpu_check.log", "summary.json"], files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)  # what the device tool brings back
    res = json.loads((out / "compiled.json").read_text())
    assert not res.get("errors") and res["device"] == "cpu" and res["compile"] is False
    for key in ("mfu_model_step_samples_s", "trainer_samples_s", "end_to_end_samples_s", "flops_per_sample"):
        assert res[key] > 0, key
    prof = res["profile"]
    assert set(prof["components"]) >= {"image_encoder.fwd", "image_encoder.bwd", "text_encoder.fwd",
                                       "text_encoder.bwd", "heads_loss.fwd", "heads_loss.bwd", "optimizer.step"}
    with gzip.open(prof["trace"], "rt") as f:
        assert any(e.get("name") == "vkd/split/text_encoder.bwd" for e in json.load(f)["traceEvents"])
    assert summary["compiled"]["text_attn_implementation"] == "sdpa"
    assert summary["env"]["cuda_available"] is False and summary["env"]["webdataset"]
