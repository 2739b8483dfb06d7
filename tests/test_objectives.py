"""The objective registry: what each objective declares, and that a new one is one class."""

import json

import pytest

from conftest import tiny_overrides, two_step_run
from vkd_dist.config import ConfigError
from vkd_dist.configure import load_config
from vkd_dist.objectives import IMAGE, TEXT, Objective, get_objective, masked_bce, objective_names, register
from vkd_dist.objectives.base import REGISTRY
from vkd_dist.train import StopRequest, train


def test_the_shipped_objectives_declare_what_they_need():
    assert set(objective_names()) >= {"vkd", "image_only", "text_only", "kd"}
    vkd, image_only, text_only, kd = (get_objective(n) for n in ("vkd", "image_only", "text_only", "kd"))
    assert vkd.needs_image() and vkd.needs_text() and vkd.stochastic and vkd.configurable_posterior
    assert image_only.needs_image() and not image_only.needs_text() and not image_only.stochastic
    assert text_only.needs_text() and not text_only.needs_image() and text_only.inference == TEXT
    assert kd.needs_teacher and kd.inference == IMAGE and not kd.needs_text()


def test_an_unknown_objective_is_a_config_error_listing_the_registered_ones(tmp_path):
    with pytest.raises(ConfigError, match="objective.name='vkdd' is not allowed.*vkd, image_only, text_only, kd"):
        load_config(overrides=["objective=vkdd", f"run_dir={tmp_path}"])


def test_an_objective_whose_inference_needs_a_missing_path_is_refused_at_registration():
    class Broken(Objective):
        name = "broken"
        model_mode = TEXT
        inference = IMAGE

    with pytest.raises(ValueError, match="image inference needs an image path"):
        register(Broken)
    assert "broken" not in REGISTRY


@pytest.fixture
def toy_objective():
    """A new objective in one class: image-only BCE plus a (logged) L2 penalty on the logits."""

    @register
    class LogitPenalty(Objective):
        name = "toy_logit_penalty"
        model_mode = IMAGE
        calls = 0

        def terms(self, out, batch, step):
            type(self).calls += 1
            bce = masked_bce(out.prior_logits, batch.targets, batch.target_mask)
            penalty = out.prior_logits.float().pow(2).mean()
            return {"loss": bce + 0.01 * penalty, "bce": bce.detach(), "logit_l2": penalty.detach()}

    yield LogitPenalty
    REGISTRY.pop("toy_logit_penalty")


def test_a_registered_toy_objective_trains_evaluates_and_exports(toy_objective, tiny_data, tmp_path):
    cfg = load_config(overrides=tiny_overrides(tiny_data, tmp_path, objective="toy_logit_penalty",
                                               **{"train.max_steps": 2, "logging.log_every": 1}))
    result = train(cfg)
    assert result.step == 2 and toy_objective.calls == 2
    assert result.test["macro_auroc"] is not None  # image-only inference, as it declared
    meta = json.loads((tmp_path / "final" / "meta.json").read_text())
    assert meta["objective"] == "toy_logit_penalty"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/logit_l2")] == [1, 2]  # its own term is logged, unasked


class ListStream:
    """An injected stream: the same in-memory batches every epoch; records what the trainer asked for."""

    def __init__(self, batches):
        self.batches, self.requests = batches, []

    @property
    def batches_per_epoch(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int, skip: int):
        self.requests.append((epoch, skip))
        return iter(self.batches[skip:])


def _batches(tiny_data, tmp_path, n):
    from vkd_dist.data.pipeline import train_loader
    from vkd_dist.data.schema import read_dataset
    from vkd_dist.prepare import resolve_tokenizer

    cfg = load_config(overrides=tiny_overrides(tiny_data, tmp_path / "tok"))
    info = read_dataset(tiny_data)
    stream = train_loader(info, "train", cfg.data, resolve_tokenizer(cfg, info), 0, 1, 0, None)
    return [b for _, b in zip(range(n), stream.epoch(0, 0))]


def test_train_takes_an_injected_stream_and_resumes_into_it(tiny_data, tmp_path):
    batches = _batches(tiny_data, tmp_path, 2)

    class StopAfter2(StopRequest):
        def __init__(self):
            super().__init__(install=False)
            self.calls = 0

        def agreed(self, accelerator):
            self.calls += 1
            return self.calls >= 2

    overrides = tiny_overrides(tiny_data, tmp_path / "run", **{"train.max_steps": 3, "train.test_at_end": False})
    first = ListStream(batches)
    assert train(load_config(overrides=overrides), stop=StopAfter2(), stream=first).preempted
    assert first.requests == [(0, 0)]  # 2 steps, 2 batches an epoch: stopped at the end of epoch 0
    second = ListStream(batches)
    result = train(load_config(overrides=[*overrides, "resume=latest"]), stop=StopRequest(install=False),
                   stream=second)
    assert result.step == 3 and second.requests == [(0, 2), (1, 0)]  # after epoch 0's 2 batches: none replayed


def test_select_metric_chooses_best_by_its_own_direction(tiny_data, tmp_path):
    cfg = load_config(overrides=tiny_overrides(tiny_data, tmp_path, **{
        "train.max_steps": 6, "train.eval_every": 2, "train.select_metric": "bce", "train.test_at_end": False}))
    train(cfg)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    bce = {e.step: e.value for e in EventAccumulator(str(tmp_path / "tensorboard")).Reload().Scalars("val/bce")}
    meta = json.loads((tmp_path / "best" / "meta.json").read_text())
    assert meta["select_metric"] == "bce" and len(bce) == 3
    assert meta["step"] == min(bce, key=bce.get)  # the lowest validation loss, not the highest
    with pytest.raises(ConfigError, match="train.select_metric='auroc' is not allowed.*macro_auroc"):
        load_config(overrides=tiny_overrides(tiny_data, tmp_path, **{"train.select_metric": "auroc"}))


@pytest.fixture(scope="module")
def text_only_run(tiny_data, tmp_path_factory):
    """A 2-step text_only run with a checkpoint at step 2 (and final/)."""
    return two_step_run(tiny_data, tmp_path_factory.mktemp("text_only") / "run", "text_only")


@pytest.mark.parametrize("where", ["run", "checkpoint"])
def test_text_init_copies_the_text_only_runs_report_path(tiny_data, text_only_run, tmp_path, where):
    import torch

    from vkd_dist.prepare import tokenizer_dir
    from vkd_dist.run import build_run
    from vkd_dist.text_init import REPORT_PATH
    from vkd_dist.weights import load_weights

    ckpt = text_only_run / "checkpoints" / "step-00000002"
    given = text_only_run if where == "run" else ckpt
    cfg = load_config(overrides=tiny_overrides(tiny_data, tmp_path / "vkd", **{
        "objective.text_init": str(given), "model.image_head": "separate"}))
    assert tokenizer_dir(cfg, cfg.run_dir) == text_only_run / "tokenizer"  # the token ids it was trained on
    model = build_run(cfg).model
    teacher = load_weights(ckpt / "model.safetensors")  # step 2 = final/: the same tensors either way
    state = model.state_dict()
    copied = [k for k in state if k.startswith(REPORT_PATH)]
    assert {k.split(".")[0] for k in copied} == {"text_encoder", "posterior_head", "classifier"}
    assert set(copied) == {k for k in teacher if k in state} and all(torch.equal(state[k], teacher[k]) for k in copied)
    assert "prior_head.mu.weight" not in teacher  # the image path starts afresh


def test_text_init_refuses_a_run_that_is_not_a_matching_text_only_run(tiny_data, text_only_run, tmp_path):
    from vkd_dist.config import save_config

    vkd_run = tmp_path / "vkd_run"
    save_config(load_config(overrides=tiny_overrides(tiny_data, vkd_run)), vkd_run / "config.yaml")
    cases = [({"objective.text_init": str(vkd_run)}, "expected a text_only run, got a vkd run"),
             ({"objective.text_init": str(text_only_run), "model.latent_dim": 8},
              r"its posterior_head is another architecture \(model.latent_dim 16 there, 8 here\)"),
             ({"objective.text_init": str(text_only_run), "model.posterior": "image_text"},
              "expected model.posterior=text"),
             ({"objective.text_init": str(text_only_run), "objective": "image_only"}, "has no report path"),
             ({"objective.text_init": str(tmp_path)}, "no config.yaml there")]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            load_config(overrides=tiny_overrides(tiny_data, tmp_path / "student", **overrides))
        assert "\n" not in str(err.value) and str(err.value).startswith("objective.text_init=")


# ---------------------------------------------------------------- distil_on, contrastive: against hand computations
def _bce(x: float, y: float) -> float:
    import math

    p = 1 / (1 + math.exp(-x))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def _toy_batch(labelled):
    """B studies, 3 labels; the unlabelled ones have every label masked, as the collate makes them."""
    import torch

    from vkd_dist.data.pipeline import Batch

    g = torch.Generator().manual_seed(0)
    b = len(labelled)
    labelled_t = torch.tensor(labelled)
    mask = labelled_t[:, None].expand(b, 3).clone()
    mask[0, 1] = False  # a labelled study with one masked label
    return Batch(torch.zeros(b, 1, 4, 4), torch.zeros(b, 2, dtype=torch.long), torch.ones(b, 2, dtype=torch.long),
                 (torch.rand(b, 3, generator=g) > 0.5).float(), mask, labelled=labelled_t)


def _hand_masked_bce(logits, batch) -> float:
    """masked_bce by loops: summed over unmasked labels, averaged over K samples and all B studies."""
    k, b, n = logits.shape
    return sum(_bce(logits[s, i, j].item(), batch.targets[i, j].item()) for s in range(k) for i in range(b)
               for j in range(n) if batch.target_mask[i, j]) / (k * b)


def _objective(name, **keys):
    from vkd_dist.config import ObjectiveConfig

    return get_objective(name)(ObjectiveConfig(name=name, **keys), num_samples=2)


def test_kd_with_distil_on_unlabelled_is_the_supervised_bce_on_a_labelled_batch_and_distils_the_rest():
    import math

    import torch

    from vkd_dist.models.vkd import VKDOutput

    g = torch.Generator().manual_seed(1)
    student, teacher_logits = torch.randn(1, 4, 3, generator=g), torch.randn(1, 4, 3, generator=g)
    kd = _objective("kd", distil_on="unlabelled", kd_alpha=0.5, kd_temperature=2.0)
    kd.teacher = lambda batch, mode: VKDOutput(post_logits=teacher_logits)
    labelled = _toy_batch([True] * 4)
    terms = kd.terms(VKDOutput(prior_logits=student), labelled, step=0)
    assert terms["loss"].item() == pytest.approx(_hand_masked_bce(student, labelled), rel=1e-6)  # not (1 - alpha) x
    assert terms["kd"].item() == 0
    mixed = _toy_batch([True, False, True, False])
    soft = sum(_bce(student[0, i, j].item() / 2, 1 / (1 + math.exp(-teacher_logits[0, i, j].item() / 2)))
               for i in (1, 3) for j in range(3)) / 4  # the unlabelled studies' soft targets, over the batch
    terms = kd.terms(VKDOutput(prior_logits=student), mixed, step=0)
    assert terms["kd"].item() == pytest.approx(soft, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(_hand_masked_bce(student, mixed) + 0.5 * 4 * soft, rel=1e-6)
    everywhere = _objective("kd", kd_alpha=0.5, kd_temperature=2.0)  # the default, distil_on=all: as before
    everywhere.teacher = kd.teacher
    assert everywhere.terms(VKDOutput(prior_logits=student), labelled, step=0)["kd"].item() > 0


def test_vkd_with_distil_on_unlabelled_reduces_to_its_supervised_part_on_a_labelled_batch():
    import torch

    from vkd_dist.models.vkd import Gaussian, VKDOutput

    g = torch.Generator().manual_seed(2)
    out = VKDOutput(prior=Gaussian(torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)),
                    posterior=Gaussian(torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)),
                    post_logits=torch.randn(2, 4, 3, generator=g), prior_logits=torch.randn(2, 4, 3, generator=g))
    keys = dict(beta=0.5, beta_schedule="constant", prior_bce_weight=0.7, predictive_weight=4.0, free_bits=0.1)
    batch = _toy_batch([True] * 4)
    supervised = _hand_masked_bce(out.post_logits, batch) + 0.7 * _hand_masked_bce(out.prior_logits, batch)
    terms = _objective("vkd", distil_on="unlabelled", **keys).terms(out, batch, step=10)
    assert terms["loss"].item() == pytest.approx(supervised, rel=1e-6)
    assert _objective("vkd", **keys).terms(out, batch, step=10)["loss"].item() > supervised + 0.1  # default: as before
    # one unlabelled study of four: its KL (free bits floored over it alone) and predictive term, over the batch
    half = _toy_batch([True, True, True, False])
    from vkd_dist.models.vkd import kl_per_dim

    kl_row = kl_per_dim(out.posterior, out.prior)[3].clamp(min=0.1).sum().item()
    terms = _objective("vkd", distil_on="unlabelled", **keys).terms(out, half, step=10)
    expected_kl = 0.5 * kl_row / 4
    supervised = _hand_masked_bce(out.post_logits, half) + 0.7 * _hand_masked_bce(out.prior_logits, half)
    assert terms["loss"].item() == pytest.approx(supervised + expected_kl + 4.0 * terms["pred"].item(), rel=1e-5)


def test_contrastive_info_nce_matches_a_hand_computation():
    import math

    import torch

    from vkd_dist.objectives.contrastive import info_nce

    g = torch.Generator().manual_seed(3)
    img = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=-1)
    scale = torch.tensor(7.5)
    sim = [[scale.item() * sum(img[i, d].item() * txt[j, d].item() for d in range(4)) for j in range(5)]
           for i in range(5)]
    image_to_text = [-sim[i][i] + math.log(sum(math.exp(sim[i][j]) for j in range(5))) for i in range(5)]
    text_to_image = [-sim[j][j] + math.log(sum(math.exp(sim[i][j]) for i in range(5))) for j in range(5)]
    hand = (sum(image_to_text) / 5 + sum(text_to_image) / 5) / 2
    assert info_nce(img, txt, scale).item() == pytest.approx(hand, rel=1e-6)


def test_contrastive_trains_the_projection_heads_and_its_clamped_temperature(tiny_data, tmp_path):
    import math

    import torch

    from vkd_dist.build import build_model
    from vkd_dist.models.contrastive import MAX_LOGIT_SCALE

    cfg = load_config(overrides=tiny_overrides(tiny_data, tmp_path, objective="contrastive"))
    model = build_model(cfg, 400)
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"image_encoder", "text_encoder", "contrastive"}  # the classifier heads take no gradient
    batch = _batches(tiny_data, tmp_path, 1)[0]
    batch.image = batch.image.float()
    objective = get_objective("contrastive")(cfg.objective)
    terms = objective(model, batch, step=0)
    terms["loss"].backward()
    assert model.contrastive.logit_scale.grad is not None and model.contrastive.image_proj.weight.grad is not None
    with torch.no_grad():
        model.contrastive.logit_scale.fill_(10.0)
    assert objective(model, batch, step=0)["logit_scale"].item() == pytest.approx(100.0)  # open_clip's ceiling
    assert MAX_LOGIT_SCALE == pytest.approx(math.log(100))


def test_the_objectives_declare_which_studies_they_learn_from():
    from vkd_dist.objectives import LABELLED, MIXED, PAIRED

    learns = {n: get_objective(n).learns_from for n in ("image_only", "text_only", "kd", "vkd", "contrastive")}
    assert learns == {"image_only": LABELLED, "text_only": LABELLED, "kd": MIXED, "vkd": MIXED,
                      "contrastive": PAIRED}
