import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from vkd_dist import checkpoint, weights
from vkd_dist.configure import load_config
from vkd_dist.data.schema import read_dataset
from vkd_dist.evaluate import main as eval_main
from vkd_dist.labels import LABELS
from vkd_dist.train import StopRequest, train


class StopAfter(StopRequest):
    """Ask the loop to stop (as a preemption signal would) once `n` steps are done."""

    def __init__(self, n):
        super().__init__(install=False)
        self.n, self.calls = n, 0

    def agreed(self, accelerator):
        self.calls += 1
        return self.calls >= self.n


@pytest.fixture(scope="module")
def vkd_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("vkd-run")
    cfg = load_config(overrides=tiny_overrides(tiny_data, run, **{"train.max_steps": 6, "train.eval_every": 3,
                                                                  "train.ckpt_every": 3}))
    return run, train(cfg)


def test_tiny_vkd_run_writes_everything(vkd_run, tiny_data):
    run, result = vkd_run
    assert result.step == 6 and not result.preempted
    assert (run / "config.yaml").is_file() and (run / "tokenizer" / "tokenizer.json").is_file()
    tokens = json.loads((run / "tokens" / "train.json").read_text())  # every training report tokenised once
    assert tokens["reports"] == read_dataset(tiny_data).num_samples("train") and tokens["tokens"] > 0
    assert [p.name for p in sorted((run / "checkpoints").glob("step-*"))] == ["step-00000003", "step-00000006"]
    assert (run / "best" / "model.safetensors").is_file() and (run / "final" / "model.safetensors").is_file()
    final = load_file(run / "final" / "model.safetensors")
    assert not any(k.startswith(("text_encoder.", "posterior_head.")) for k in final)  # image-only export
    assert any(k.startswith("image_encoder.") for k in final)
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["num_samples"] == 60 and set(metrics["auroc"]) == set(LABELS)


def test_tensorboard_scalars_read_back(vkd_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = vkd_run
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/bce", "train/kl", "train/beta", "train/lr", "train/grad_norm",
                "train/samples_per_s", "train/data_wait_frac", "val/macro_auroc", "val_auroc/Cardiomegaly",
                "test/macro_auroc"):
        assert tag in tags, tag
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]
    assert [e.step for e in acc.Scalars("val/macro_auroc")] == [3, 6]
    for tag in ("val/bce", "val/macro_auprc", "val/macro_ece", "val/micro_auroc", "val/macro_auroc_chexpert5"):
        assert [e.step for e in acc.Scalars(tag)] == [3, 6], tag  # every summary figure, the val loss too
    assert "val_pr/Cardiomegaly" in acc.Tags()["tensors"]  # PR curves
    assert [e.step for e in acc.Images("val/roc")] == [3, 6]  # the ROC figure


def test_eval_cli_writes_the_metrics_json(vkd_run, tiny_data, tmp_path):
    run, result = vkd_run
    out = tmp_path / "eval.json"
    assert eval_main(["--run", str(run), "--checkpoint", "final", "--data", str(tiny_data), "--split", "test",
                      "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["auroc"]) == set(LABELS) and set(report["n"]) == set(LABELS)
    assert report["checkpoint"] == "final" and report["split"] == "test"
    # The data set's evaluation policy, not the training one (data.missing=mask): blank counts as negative, so
    # No Finding (only ever 1 or blank in the reports) is scored, and every label is scored on all 60 studies
    # but those with an uncertain mention.
    assert report["eval_policy"] == {"uncertain": "ignore", "missing": "negative"}
    assert report["auroc"]["No Finding"] is not None and report["n"]["No Finding"] == 60
    info = read_dataset(tiny_data)
    counts = info.meta["label_counts"]["test"]
    assert report["n"] == {n: 60 - counts[n]["-1"] for n in LABELS}
    defined_labels = [n for n in LABELS if report["auroc"][n] is not None]
    assert report["macro_labels"] == info.scorable_labels("test") == defined_labels
    defined = [report["auroc"][n] for n in report["macro_labels"]]
    assert report["macro_auroc"] == pytest.approx(sum(defined) / len(defined))
    lo, hi = report["macro_auroc_ci"]
    assert lo < report["macro_auroc"] < hi and report["bootstrap"]["unit"] == "patient"
    for name in report["macro_labels"]:
        per = report["per_label"][name]
        assert per["auroc_ci"][0] <= per["auroc"] <= per["auroc_ci"][1]
        assert 0 <= per["auprc"] <= 1 and 0 <= per["ece"] <= 1 and 0 <= per["sens_at_90_spec"] <= 1
    five = [report["auroc"][k] for k in ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")]
    five = [v for v in five if v is not None]
    assert report["macro_auroc_chexpert5"] == pytest.approx(sum(five) / len(five))
    assert 0 <= report["micro_auroc"] <= 1
    assert report["n"]["Cardiomegaly"] > 0
    assert report["macro_auroc"] == pytest.approx(result.test["macro_auroc"], abs=1e-6)  # same model, same split


def _params(run):
    return load_file(checkpoint.latest(run) / "model.safetensors")


@pytest.mark.parametrize("workers", [0, 2])
def test_stop_and_resume_equals_uninterrupted(tiny_data, tmp_path, workers):
    common = {"train.max_steps": 8, "train.ckpt_every": 4, "train.test_at_end": False, "data.num_workers": workers}
    train(load_config(overrides=tiny_overrides(tiny_data, tmp_path / "a", **common)))
    partial = train(load_config(overrides=tiny_overrides(tiny_data, tmp_path / "b", **common)), stop=StopAfter(3))
    assert partial.preempted and partial.step == 3
    assert not (tmp_path / "b" / "final").exists()
    resumed = train(load_config(overrides=tiny_overrides(tiny_data, tmp_path / "b", resume="latest", **common)))
    assert resumed.step == 8
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    state = json.loads((checkpoint.latest(tmp_path / "b") / "train_state.json").read_text())
    assert state["step"] == 8


def test_pretokenised_run_equals_tokenising_in_the_loader(tiny_data, tmp_path):
    common = {"train.max_steps": 4, "train.test_at_end": False, "train.ckpt_every": 4, "objective": "text_only"}
    train(load_config(overrides=tiny_overrides(tiny_data, tmp_path / "table", **common)))
    train(load_config(overrides=tiny_overrides(tiny_data, tmp_path / "live", **{**common, "data.pretokenize": False})))
    assert (tmp_path / "table" / "tokens").is_dir() and not (tmp_path / "live" / "tokens").exists()
    a, b = _params(tmp_path / "table"), _params(tmp_path / "live")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("objective", ["image_only", "text_only"])
def test_baselines_train_in_the_same_trainer(tiny_data, tmp_path, objective):
    result = train(load_config(overrides=tiny_overrides(tiny_data, tmp_path, objective=objective,
                                                        **{"train.max_steps": 3})))
    assert result.step == 3 and result.test["num_samples"] == 60
    exported = load_file(tmp_path / "final" / "model.safetensors")
    if objective == "text_only":
        assert any(k.startswith("text_encoder.") for k in exported)
    else:
        assert not any(k.startswith("text_encoder.") for k in exported)


def test_kd_distils_from_a_text_only_teacher(tiny_data, tmp_path):
    teacher = tmp_path / "teacher"
    train(load_config(overrides=tiny_overrides(tiny_data, teacher, objective="text_only", **{"train.max_steps": 3})))
    result = train(load_config(overrides=tiny_overrides(tiny_data, tmp_path / "kd", objective="kd",
                                                        **{"objective.kd_teacher": str(teacher),
                                                           "train.max_steps": 3})))
    assert result.step == 3 and result.test["macro_auroc"] is not None
    assert not (tmp_path / "kd" / "tokenizer").exists()  # the student reads with the teacher's vocabulary...
    out = tmp_path / "kd-eval.json"
    # ...and so does vkd-eval
    assert eval_main(["--run", str(tmp_path / "kd"), "--checkpoint", "final", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["macro_auroc"] == pytest.approx(result.test["macro_auroc"], abs=1e-6)


def test_a_non_finite_loss_stops_the_run_before_anything_is_logged_or_saved(tiny_data, tmp_path, monkeypatch):
    from vkd_dist.objectives import Objective

    original = Objective.__call__

    def poisoned(self, model, batch, step):
        terms = original(self, model, batch, step)
        if step == 1:  # the second step; losses are read back only at log/eval/checkpoint steps
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(Objective, "__call__", poisoned)
    cfg = load_config(overrides=tiny_overrides(tiny_data, tmp_path, objective="image_only", **{
        "train.max_steps": 6, "logging.log_every": 4, "train.ckpt_every": 4}))
    with pytest.raises(FloatingPointError, match="between steps 1 and 4"):
        train(cfg)
    assert not list((tmp_path / "checkpoints").glob("step-*"))


def test_a_compiled_run_checkpoints_and_exports_as_an_eager_one(tiny_data, tmp_path):
    """train.compile=true: the same checkpoint and export keys as an eager run, so either resumes the other."""
    common = {"train.max_steps": 4, "train.ckpt_every": 2, "train.test_at_end": False}
    eager = train(load_config(overrides=tiny_overrides(tiny_data, tmp_path / "eager", **common)))
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = train(load_config(overrides=tiny_overrides(tiny_data, tmp_path / "compiled",
                                                          **{**common, "train.compile": True})), stop=StopAfter(3))
    # compiled, and once: the steps' padded text lengths differ (2 graphs when the length is not marked dynamic)
    assert counters["stats"]["unique_graphs"] == 1
    assert eager.step == 4 and compiled.preempted and compiled.step == 3
    ckpt_keys = set(load_file(checkpoint.latest(tmp_path / "compiled") / "model.safetensors"))
    assert ckpt_keys == set(_params(tmp_path / "eager"))
    resumed = train(load_config(overrides=tiny_overrides(tiny_data, tmp_path / "compiled", resume="latest", **common)))
    assert resumed.step == 4  # an eager run resumes the compiled one
    exported = load_file(tmp_path / "compiled" / "final" / "model.safetensors")
    assert set(exported) == set(load_file(tmp_path / "eager" / "final" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in exported.values() if v.is_floating_point())


def test_an_export_that_would_drop_deployable_weights_fails(tiny_data, tmp_path):
    from accelerate import Accelerator

    from vkd_dist.build import build_model

    cfg = load_config(overrides=tiny_overrides(tiny_data, tmp_path / "run"))
    model = build_model(cfg, 400)
    accelerator = Accelerator(cpu=True)
    weights.export_image_model(accelerator, model, tmp_path / "ok", {})
    assert set(load_file(tmp_path / "ok" / "model.safetensors")) == set(model.deploy_state_dict())
    wrapped = torch.nn.ModuleDict({"inner": model})  # state keys "inner.*": none match the deployable names
    wrapped.deploy_state_dict = model.deploy_state_dict
    with pytest.raises(RuntimeError, match=r"deployable tensors are not in the model's state dict"):
        weights.export_image_model(accelerator, wrapped, tmp_path / "bad", {})
    assert not (tmp_path / "bad").exists()


def test_only_the_last_checkpoints_are_kept(tiny_data, tmp_path):
    train(load_config(overrides=tiny_overrides(tiny_data, tmp_path, objective="image_only", **{
        "train.max_steps": 4, "train.ckpt_every": 1, "train.keep_last": 2, "train.test_at_end": False})))
    assert [p.name for p in sorted((tmp_path / "checkpoints").glob("step-*"))] == ["step-00000003", "step-00000004"]
    assert checkpoint.latest(tmp_path).name == "step-00000004"


def test_compile_without_a_compiler_fails_before_any_work(tiny_data, tmp_path, monkeypatch):
    from torch._inductor import cpp_builder
    from torch._inductor.exc import InvalidCxxCompiler

    def no_compiler():
        raise InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    from vkd_dist.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.compile=true on the CPU: .*no compiler"):
        train(load_config(overrides=tiny_overrides(tiny_data, tmp_path, **{"train.compile": True})))
    assert not (tmp_path / "tokenizer").exists() and not (tmp_path / "tokens").exists()  # nothing built yet


@pytest.mark.parametrize("setting,local,expected", [(None, "1", 2), (None, "2", 1), (1, "1", 1)])
def test_cpu_threads_follow_the_cores_and_the_processes_on_the_node(tiny_data, tmp_path, monkeypatch, capsys,
                                                                    setting, local, expected):
    """`accelerate launch` exports OMP_NUM_THREADS=1 on a CPU machine; train.cpu_threads (auto: the cores this
    process may use / the processes on its node) decides instead, and the run header says what it chose."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})  # a 2-core machine, whatever this one has
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    before = torch.get_num_threads()
    try:
        train(load_config(overrides=tiny_overrides(tiny_data, tmp_path, objective="image_only",
                                                   **{"train.max_steps": 2, "train.test_at_end": False,
                                                      "train.cpu_threads": "null" if setting is None else setting})))
        assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)
    header = next(line for line in capsys.readouterr().out.splitlines() if "process(es) on cpu" in line)
    assert f"| {expected} CPU thread(s)/process (train.cpu_threads" in header
    assert ("auto, 2 cores / " + local) in header if setting is None else "auto" not in header
