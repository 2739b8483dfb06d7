"""The objective registry: what each objective declares, and that a new one is one class."""

import json

import pytest

from conftest import tiny_overrides
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
    run = tmp_path_factory.mktemp("text_only") / "run"
    train(load_config(overrides=tiny_overrides(tiny_data, run, objective="text_only", **{
        "train.max_steps": 2, "train.ckpt_every": 2, "train.test_at_end": False})))
    return run


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
              r"text encoder / latent sizes differ \(model.latent_dim 16 there, 8 here\)"),
             ({"objective.text_init": str(text_only_run), "model.posterior": "image_text"},
              "expected model.posterior=text"),
             ({"objective.text_init": str(text_only_run), "objective": "image_only"}, "has no report path"),
             ({"objective.text_init": str(tmp_path)}, "no config.yaml there")]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            load_config(overrides=tiny_overrides(tiny_data, tmp_path / "student", **overrides))
        assert "\n" not in str(err.value) and str(err.value).startswith("objective.text_init=")
