import math

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from vkd_dist.config import ObjectiveConfig
from vkd_dist.data.pipeline import Batch
from vkd_dist.models.vkd import Gaussian, VKDModel, kl_diag_gaussians, kl_per_dim
from vkd_dist.objectives import beta_at, build_objective, masked_bce


def _gauss(b=5, d=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Gaussian(torch.randn(b, d, generator=g), torch.randn(b, d, generator=g))


def test_kl_matches_torch_distributions_in_the_right_direction():
    q, p = _gauss(seed=1), _gauss(seed=2)
    ours = kl_diag_gaussians(q, p)
    dist = lambda g: Independent(Normal(g.mu, torch.exp(0.5 * g.logvar)), 1)  # noqa: E731  (std = exp(logvar/2))
    ref = kl_divergence(dist(q), dist(p))
    assert torch.allclose(ours, ref, atol=1e-5)
    assert not torch.allclose(ours, kl_divergence(dist(p), dist(q)), atol=1e-3)  # KL(p||q) differs
    assert torch.allclose(kl_diag_gaussians(q, q), torch.zeros(5), atol=1e-6)
    per_dim = kl_per_dim(q, p)  # what vkd_diagnostics counts active dimensions with
    assert torch.allclose(per_dim, kl_divergence(Normal(q.mu, torch.exp(0.5 * q.logvar)),
                                                 Normal(p.mu, torch.exp(0.5 * p.logvar))), atol=1e-5)


def test_reparameterised_samples_have_the_right_moments():
    torch.manual_seed(0)
    g = Gaussian(torch.tensor([[1.0, -2.0]]), torch.log(torch.tensor([[0.25, 4.0]])))
    z = g.sample(20000)
    assert z.shape == (20000, 1, 2)
    assert torch.allclose(z.mean(0), g.mu, atol=0.05)
    assert torch.allclose(z.std(0), torch.tensor([[0.5, 2.0]]), atol=0.05)  # sigma = exp(logvar / 2)


def test_masked_bce_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    mask = torch.tensor([[True, False, True], [True, True, False]])
    def bce(x, y):
        return -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))
    hand = (bce(2.0, 1) + bce(0.5, 1) + bce(0.0, 0) + bce(3.0, 1)) / 2  # summed over labels, mean over 2 studies
    assert masked_bce(logits, targets, mask).item() == pytest.approx(hand, rel=1e-6)
    pw = torch.tensor([2.0, 1.0, 3.0])
    hand_pw = (2 * -math.log(1 / (1 + math.exp(-2.0))) + 3 * -math.log(1 / (1 + math.exp(-0.5))) + bce(0.0, 0)
               + bce(3.0, 1)) / 2
    assert masked_bce(logits, targets, mask, pw).item() == pytest.approx(hand_pw, rel=1e-6)


def test_k_sample_likelihood_is_the_mean_of_log_likelihoods():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 14)
    targets = (torch.rand(3, 14) > 0.5).float()
    mask = torch.rand(3, 14) > 0.3
    per_sample = torch.stack([masked_bce(logits[k], targets, mask) for k in range(4)])
    assert masked_bce(logits, targets, mask).item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    # ... which is not the likelihood of the mean logit
    of_mean_logit = masked_bce(logits.mean(0), targets, mask).item()
    assert masked_bce(logits, targets, mask).item() != pytest.approx(of_mean_logit, rel=1e-3)


def test_beta_schedules():
    warm = ObjectiveConfig(beta=2.0, beta_schedule="warmup", beta_warmup_steps=10)
    assert [beta_at(s, warm) for s in (0, 5, 10, 50)] == [0.0, 1.0, 2.0, 2.0]
    cyc = ObjectiveConfig(beta=1.0, beta_schedule="cyclical", beta_cycle_steps=10, beta_cycle_ramp=0.5)
    assert [beta_at(s, cyc) for s in (0, 2, 5, 9, 10, 12)] == pytest.approx([0, 0.4, 1, 1, 0, 0.4])
    assert beta_at(123, ObjectiveConfig(beta=0.3, beta_schedule="constant")) == 0.3


class _Encoder(torch.nn.Module):
    def __init__(self, dim, text=False):
        super().__init__()
        self.out_dim, self.text = dim, text
        self.proj = torch.nn.Linear(16 if not text else 5, dim)

    def forward(self, x, mask=None):
        if self.text:
            return self.proj(torch.nn.functional.one_hot(x % 5, 5).float().mean(1))
        return self.proj(x.float().flatten(1)[:, :16])


class _Exploding(torch.nn.Module):
    out_dim = 8

    def forward(self, *a, **k):
        raise AssertionError("the text encoder must not run at inference")


def _batch(b=6, seed=0, size=4):
    g = torch.Generator().manual_seed(seed)
    return Batch(image=torch.randint(0, 255, (b, 1, size, size), dtype=torch.uint8, generator=g),
                 input_ids=torch.randint(0, 50, (b, 9), generator=g),
                 attention_mask=torch.ones(b, 9, dtype=torch.long),
                 targets=(torch.rand(b, 14, generator=g) > 0.5).float(),
                 target_mask=torch.rand(b, 14, generator=g) > 0.2)


def test_image_only_inference_never_touches_text():
    torch.manual_seed(0)
    model = VKDModel(_Encoder(8), _Exploding(), latent_dim=4, hidden_dim=8).eval()
    batch = _batch()
    probs, spread = model.predict(batch.image)
    assert probs.shape == (6, 14) and spread is None
    probs_mc, spread_mc = model.predict(batch.image, mode="mc", num_samples=32)
    assert spread_mc.shape == (6, 14) and (spread_mc >= 0).all()
    assert torch.allclose(probs_mc, probs, atol=0.1)
    with pytest.raises(AssertionError, match="must not run"):
        model(batch, mode="both")  # training does use the report
    model.text_encoder = None  # and the deployed model has no text path at all
    assert torch.equal(model.predict(batch.image)[0], probs)


def test_vkd_loss_terms_are_assembled_as_documented():
    torch.manual_seed(0)
    model = VKDModel(_Encoder(8), _Encoder(8, text=True), latent_dim=4, hidden_dim=8, dropout=0.0)
    cfg = ObjectiveConfig(beta=0.5, beta_schedule="constant", prior_bce_weight=0.7)
    batch = _batch()
    torch.manual_seed(1)
    terms = build_objective(cfg, num_samples=3)(model, batch, step=0)
    torch.manual_seed(1)
    out = model(batch, mode="both", num_samples=3)
    assert out.post_logits.shape == (3, 6, 14) and out.prior_logits.shape == (3, 6, 14)
    bce = masked_bce(out.post_logits, batch.targets, batch.target_mask)
    prior_bce = masked_bce(out.prior_logits, batch.targets, batch.target_mask)
    kl = kl_diag_gaussians(out.posterior, out.prior).mean()
    assert terms["loss"].item() == pytest.approx((bce + 0.5 * kl + 0.7 * prior_bce).item(), rel=1e-5)
    assert terms["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    terms["loss"].backward()
    assert model.posterior_head.mu.weight.grad is not None and model.prior_head.logvar.weight.grad is not None


def test_image_text_posterior_uses_both():
    model = VKDModel(_Encoder(8), _Encoder(8, text=True), latent_dim=4, hidden_dim=8, posterior="image_text")
    assert model.posterior_head.net[1].in_features == 16
    out = model(_batch(), mode="both", num_samples=2)
    assert out.posterior.mu.shape == (6, 4)


def test_a_frozen_text_encoder_stays_deterministic_in_training_mode():
    from vkd_dist.config import ModelConfig
    from vkd_dist.models.encoders import build_text_encoder

    cfg = ModelConfig(text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                   "intermediate_size": 64}, freeze_text=True)
    enc = build_text_encoder(cfg, vocab_size=50).train()
    ids = torch.randint(5, 50, (3, 7))
    mask = torch.ones_like(ids)
    assert not any(p.requires_grad for p in enc.parameters())
    assert torch.equal(enc(ids, mask), enc(ids, mask))  # no dropout noise
    partly = build_text_encoder(ModelConfig(text_config=cfg.text_config, text_trainable_layers=1), 50).train()
    assert partly.model.training and any(p.requires_grad for p in partly.parameters())


def test_gradient_checkpointing_recomputes_blocks_and_keeps_the_gradients():
    """model.gradient_checkpointing: the ViT blocks and BERT layers run again in backward (memory traded for
    compute), and the loss and every gradient are those of the plain model."""
    from vkd_dist.build import build_model
    from vkd_dist.configure import load_config

    def run(checkpointing: bool):
        cfg = load_config(overrides=[
            "data.image_size=32", "model.image_encoder=vit_small_patch16_224",
            "model.image_encoder_kwargs={depth: 2, embed_dim: 32, num_heads: 2, patch_size: 16}",
            "model.text_config={hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64}",
            "model.latent_dim=4", "model.hidden_dim=8", f"model.gradient_checkpointing={checkpointing}"])
        torch.manual_seed(0)
        model = build_model(cfg, 50).train()
        calls = {"vit": 0, "bert": 0}

        def counted(kind, forward):  # not a forward hook: torch's non-reentrant recompute skips those
            def run(*args, **kwargs):
                calls[kind] += 1
                return forward(*args, **kwargs)
            return run

        for block in model.image_encoder.backbone.blocks:
            block.forward = counted("vit", block.forward)
        for layer in model.text_encoder.model.encoder.layer:  # transformers replays the layer's class forward
            layer.attention.forward = counted("bert", layer.attention.forward)
        batch = _batch(3, seed=1, size=32)
        torch.manual_seed(2)  # dropout and latent samples: checkpointing replays the same random state
        loss = build_objective(cfg.objective, num_samples=2)(model, batch, step=0)["loss"]
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, calls

    loss, grads, calls = run(False)
    loss_ckpt, grads_ckpt, calls_ckpt = run(True)
    assert calls == {"vit": 2, "bert": 2} and calls_ckpt == {"vit": 4, "bert": 4}
    assert torch.allclose(loss, loss_ckpt) and grads.keys() == grads_ckpt.keys()
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], atol=1e-6), name


def test_a_three_channel_stem_sees_the_grayscale_image_in_every_channel():
    """model.in_chans=3 (RGB-pretrained stems): the gray image is repeated, so the 3-channel stem equals a 1-channel
    stem whose kernel is the sum of the three."""
    from vkd_dist.models.encoders import ImageEncoder

    kwargs = {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 16}
    torch.manual_seed(0)
    rgb = ImageEncoder("vit_small_patch16_224", 32, in_chans=3, kwargs=kwargs).eval()
    gray = ImageEncoder("vit_small_patch16_224", 32, in_chans=1, kwargs=kwargs).eval()
    state = rgb.state_dict()
    state["backbone.patch_embed.proj.weight"] = state["backbone.patch_embed.proj.weight"].sum(1, keepdim=True)
    gray.load_state_dict(state)
    image = _batch(2, size=32).image
    assert torch.allclose(rgb(image), gray(image), atol=1e-5)


@pytest.mark.parametrize("mode", ["image", "text"])
def test_the_baseline_modes_use_the_mean_and_never_run_logvar(mode):
    """image/text modes classify the mean; running logvar there (output unused) breaks ZeRO-3's backward hooks."""
    model = VKDModel(_Encoder(8), _Encoder(8, text=True), latent_dim=4, hidden_dim=8, dropout=0.0)
    ran = []
    for head in (model.prior_head, model.posterior_head):
        head.logvar.register_forward_hook(lambda *_: ran.append(1))
    batch = _batch()
    out = model(batch, mode=mode)
    logits = out.prior_logits if mode == "image" else out.post_logits
    if mode == "image":
        head, encoder = model.prior_head, model.image_encoder
    else:
        head, encoder = model.posterior_head, model.text_encoder
    feats = encoder(batch.image) if mode == "image" else encoder(batch.input_ids, batch.attention_mask)
    assert torch.allclose(logits[0], model.classify(head(feats).mu))  # the same as the full head's mean
    assert len(ran) == 1  # only the reference call above ran logvar


# -- model.image_head, objective.image_bce / detach_posterior / free_bits, unlabelled studies --------------------
def _model(**kwargs):
    torch.manual_seed(0)
    return VKDModel(_Encoder(8), _Encoder(8, text=True), latent_dim=4, hidden_dim=8, dropout=0.0, **kwargs)


def _vkd(**knobs):
    settings = {"beta": 0.5, "beta_schedule": "constant", "prior_bce_weight": 0.7, **knobs}
    return build_objective(ObjectiveConfig(**settings), num_samples=3)


def _grads(objective, model, batch, seed=1) -> dict:
    model.zero_grad()
    torch.manual_seed(seed)  # the same latent samples in every call
    objective(model, batch, step=0)["loss"].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_free_bits_floor_each_dimensions_batch_mean_kl():
    q, p = _gauss(b=5, d=7, seed=1), _gauss(b=5, d=7, seed=2)
    q.mu.requires_grad_(True)
    std = lambda g: torch.exp(0.5 * g.logvar)  # noqa: E731
    per_dim = kl_divergence(Normal(q.mu, std(q)), Normal(p.mu, std(p))).detach()  # [B, D]
    batch_mean = per_dim.mean(0).sort().values
    floor = float(batch_mean[3] + batch_mean[4]) / 2  # three dimensions under it, four over
    term, raw = _vkd(free_bits=floor).kl_term(q, p)
    assert term.item() == pytest.approx(sum(max(float(k), floor) for k in per_dim.mean(0)), rel=1e-5)
    assert raw.item() == pytest.approx(float(per_dim.sum(-1).mean()), rel=1e-5)  # the logged KL stays the raw one
    term.backward()
    under = per_dim.mean(0) < floor
    assert (q.mu.grad[:, under] == 0).all() and (q.mu.grad[:, ~under] != 0).all()
    off, raw_off = _vkd().kl_term(q, p)  # free_bits=0: exactly today's term
    assert torch.equal(off, raw_off) and torch.equal(off, kl_diag_gaussians(q, p).mean())


def test_free_bits_in_the_loss_and_the_kl_it_logs():
    model, batch = _model(), _batch()
    torch.manual_seed(1)
    terms = _vkd(free_bits=0.3)(model, batch, step=0)
    torch.manual_seed(1)
    out = model(batch, mode="both", num_samples=3)
    per_dim = kl_per_dim(out.posterior, out.prior)
    floored = per_dim.mean(0).clamp(min=0.3).sum()
    bce = masked_bce(out.post_logits, batch.targets, batch.target_mask)
    prior_bce = masked_bce(out.prior_logits, batch.targets, batch.target_mask)
    assert terms["loss"].item() == pytest.approx((bce + 0.5 * floored + 0.7 * prior_bce).item(), rel=1e-5)
    assert terms["kl"].item() == pytest.approx(per_dim.sum(-1).mean().item(), rel=1e-5)


def test_detach_posterior_trains_q_by_its_bce_alone_and_p_as_before():
    model, batch = _model(), _batch()
    plain, detached, no_kl = (_grads(o, model, batch) for o in (_vkd(), _vkd(detach_posterior=True), _vkd(beta=0.0)))
    report_path = [n for n in plain if n.startswith(("text_encoder.", "posterior_head."))]
    assert report_path and plain.keys() == detached.keys()
    for name in report_path:  # q: its BCE's gradient, nothing from the KL
        assert torch.allclose(detached[name], no_kl[name], atol=1e-7), name
    assert any(not torch.allclose(plain[n], no_kl[n]) for n in report_path)  # ... which it did get without detach
    for name in set(plain) - set(report_path):  # p (and the classifier): the same gradient as without detach
        assert torch.allclose(detached[name], plain[name], atol=1e-7), name


@pytest.mark.parametrize("image_head", ["shared", "separate"])
def test_image_bce_mean_puts_the_image_bce_on_the_prior_mean(image_head):
    model, batch = _model(image_head=image_head), _batch()
    objective = _vkd(image_bce="mean")
    torch.manual_seed(1)
    terms = objective(model, batch, step=0)
    feats = model.image_encoder(batch.image)
    p = model.prior_head(feats)
    expected = masked_bce(model.classify_image(p.mu, feats), batch.targets, batch.target_mask)
    assert terms["prior_bce"].item() == pytest.approx(expected.item(), rel=1e-6)
    torch.manual_seed(2)  # other samples of q, the same prior BCE: no sample of p is drawn
    assert objective(model, batch, step=0)["prior_bce"].item() == pytest.approx(expected.item(), rel=1e-6)
    q = model.posterior(batch.input_ids, batch.attention_mask, feats)
    assert terms["kl"].item() == pytest.approx(kl_diag_gaussians(q, p).mean().item(), rel=1e-5)  # full Gaussians
    assert _grads(objective, model, batch)["prior_head.logvar.weight"].abs().sum() > 0  # through the KL
    assert (_grads(_vkd(image_bce="mean", beta=0.0), model, batch)["prior_head.logvar.weight"] == 0).all()


def test_a_separate_image_head_reads_mu_p_and_the_image_features():
    model, batch = _model(image_head="separate").eval(), _batch()
    assert model.image_classifier[0].in_features == 4 + 8 and model.classifier is not None  # the report path's
    feats = model.image_encoder(batch.image)
    mu = model.prior_head.mean(feats)
    logits = model.image_classifier(torch.cat([mu, feats], dim=-1))
    by_hand = torch.sigmoid(logits)
    probs, spread = model.predict(batch.image)
    assert spread is None and torch.allclose(probs, by_hand, atol=1e-6)
    assert not torch.allclose(probs, torch.sigmoid(model.classify(mu)), atol=1e-3)
    assert torch.allclose(model(batch, mode="image").prior_logits[0], logits, atol=1e-6)
    torch.manual_seed(3)
    probs_mc, spread_mc = model.predict(batch.image, mode="mc", num_samples=5)
    torch.manual_seed(3)
    z = model.prior_head(feats).sample(5)
    mc = torch.sigmoid(model.image_classifier(torch.cat([z, feats.expand(5, -1, -1)], dim=-1)))
    assert torch.allclose(probs_mc, mc.mean(0), atol=1e-6) and torch.allclose(spread_mc, mc.std(0), atol=1e-6)
    deployed = model.deploy_state_dict()
    assert any(k.startswith("image_classifier.") for k in deployed)
    assert not any(k.startswith(("classifier.", "text_encoder.", "posterior_head.")) for k in deployed)
    image_only = VKDModel(_Encoder(8), None, latent_dim=4, hidden_dim=8, image_head="separate")
    assert image_only.classifier is None  # nothing reads it: DDP would stop on its missing gradients


@pytest.mark.parametrize("objective", ["vkd", "image_only", "text_only", "kd"])
def test_a_separate_image_head_leaves_no_trainable_parameter_without_gradient(objective):
    from dataclasses import replace

    from vkd_dist.build import build_model
    from vkd_dist.configure import load_config

    cfg = load_config(overrides=[
        "data.image_size=32", "model.image_encoder=vit_small_patch16_224", "model.image_head=separate",
        "model.image_encoder_kwargs={depth: 1, embed_dim: 32, num_heads: 2, patch_size: 16}",
        "model.text_config={hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}",
        "model.latent_dim=4", "model.hidden_dim=8"])
    torch.manual_seed(0)
    model = build_model(cfg, 50, objective=objective)
    teacher = build_model(cfg, 50, objective="text_only") if objective == "kd" else None
    loss = build_objective(replace(cfg.objective, name=objective), 2, teacher)(model, _batch(3, size=32), 0)["loss"]
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert (model.image_classifier is not None) == (objective != "text_only")  # every image path has its own
    assert (model.classifier is not None) == (objective in ("vkd", "text_only"))  # only a report path's


class _Recording(_Encoder):
    """Keeps the gradient that reaches its output: per study, what the loss asks of that study's features."""

    out = None

    def forward(self, x, mask=None):
        self.out = super().forward(x, mask)
        self.out.retain_grad()
        return self.out


UNLABELLED = [1, 4]
CASES = {  # objective, objective knobs, model knobs
    "vkd": ("vkd", {}, {}),
    "vkd-image_bce-mean": ("vkd", {"image_bce": "mean"}, {}),
    "vkd-detach": ("vkd", {"detach_posterior": True}, {}),
    "vkd-free_bits": ("vkd", {"free_bits": 0.01}, {}),
    "vkd-separate-image_text": ("vkd", {}, {"image_head": "separate", "posterior": "image_text"}),
    "vkd-all": ("vkd", {"image_bce": "mean", "detach_posterior": True, "free_bits": 0.01}, {"image_head": "separate"}),
    "vkd-beta0": ("vkd", {"beta": 0.0}, {}),
    "vkd-beta0-predictive": ("vkd", {"beta": 0.0, "predictive_weight": 1.0, "image_bce": "mean"}, {}),
    "image_only": ("image_only", {}, {}),
    "image_only-separate": ("image_only", {}, {"image_head": "separate"}),
    "text_only": ("text_only", {}, {}),
    "kd": ("kd", {}, {}),
}


@pytest.mark.parametrize("case", CASES)
def test_unlabelled_studies_learn_only_from_the_terms_that_need_no_labels(case):
    """A study with no labels (target_mask all False) gets no BCE gradient: vkd's only through the KL (none at
    beta 0), kd's only through the teacher term, the baselines' none."""
    from dataclasses import replace

    name, knobs, arch = CASES[case]
    torch.manual_seed(0)
    model = VKDModel(_Recording(8), _Recording(8, text=True), latent_dim=4, hidden_dim=8, dropout=0.0, **arch)
    teacher = VKDModel(None, _Encoder(8, text=True), latent_dim=4, hidden_dim=8) if name == "kd" else None
    cfg = ObjectiveConfig(**{"name": name, "beta": 0.5, "beta_schedule": "constant", **knobs})
    objective = build_objective(cfg, num_samples=3, teacher=teacher)
    batch = _batch()
    batch.target_mask[UNLABELLED] = False
    labelled = [i for i in range(len(batch)) if i not in UNLABELLED]

    def feature_grads(b) -> dict:
        _grads(objective, model, b)
        return {path: enc.out.grad.clone() for path, enc in (("image", model.image_encoder),
                                                             ("text", model.text_encoder)) if enc.out is not None}

    full = feature_grads(batch)
    # Every study unlabelled: what is left is the part of the loss that needs no labels.
    label_free = feature_grads(replace(batch, target_mask=torch.zeros_like(batch.target_mask)))
    for path, grad in full.items():
        assert torch.allclose(grad[UNLABELLED], label_free[path][UNLABELLED], atol=1e-8), path
        assert grad[labelled].abs().sum() > 0, path
    learns_without_labels = name == "kd" or (name == "vkd" and (cfg.beta > 0 or cfg.predictive_weight > 0))
    assert bool(sum(g[UNLABELLED].abs().sum() for g in label_free.values()) > 0) == learns_without_labels
    if cfg.detach_posterior:  # the KL does not reach the report path
        assert (label_free["text"] == 0).all()


def test_predictive_distillation_fits_the_image_path_to_the_report_paths_predictive_by_hand():
    from vkd_dist.objectives.vkd import predictive_distillation

    model, batch = _model(), _batch()
    torch.manual_seed(1)
    terms = _vkd(image_bce="mean", predictive_weight=2.0)(model, batch, step=0)
    torch.manual_seed(1)
    out = model(batch, mode="both", num_samples=3, prior_logits="mean")
    target = torch.sigmoid(out.post_logits).mean(0)  # E_q[p(y|z)] over the K = 3 samples, per study and label
    image = out.prior_logits[0]
    by_hand = -(target * torch.log(torch.sigmoid(image)) + (1 - target) * torch.log(1 - torch.sigmoid(image)))
    assert terms["pred"].item() == pytest.approx(by_hand.sum(-1).mean().item(), rel=1e-5)
    base = _vkd(image_bce="mean")
    torch.manual_seed(1)
    expected = base(model, batch, step=0)["loss"] + 2.0 * by_hand.sum(-1).mean()
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    # The report path is the teacher here: no gradient reaches it through this term.
    logits = torch.randn(3, 4, 5, requires_grad=True)
    img = torch.randn(1, 4, 5, requires_grad=True)
    predictive_distillation(img, logits).backward()
    assert logits.grad is None and img.grad is not None and img.grad.abs().sum() > 0
