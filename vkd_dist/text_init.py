"""objective.text_init: a run's report path (text encoder, posterior head, classifier) starts from the weights of a
trained text_only run, and the run reads reports with that run's tokenizer (vkd_dist/prepare.py tokenizer_dir).

The weights are those kd's teacher would be (vkd_dist/evaluate.py load_teacher): the checkpoint or export named,
else the run's best/, else final/, else its newest verified checkpoint. Refused, one line each: a run that is
not text_only, or whose text encoder or latent sizes differ from this config's. The loading itself is
vkd_dist/init_from.py's, which model.init_from shares."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vkd_dist.init_from import Source, check_source, copy_modules, source_run, source_weights
from vkd_dist.run_dir import RunDir

if TYPE_CHECKING:
    import torch

    from vkd_dist.config import Config

KEY = "objective.text_init"
MODULES = ("text_encoder", "posterior_head", "classifier")
REPORT_PATH = tuple(f"{m}." for m in MODULES)
WHAT = "a text_only run directory"


def _src(cfg: Config) -> Source:
    return Source(KEY, str(cfg.objective.text_init))


def text_init_run(cfg: Config) -> Path:
    """The run directory objective.text_init names: itself, or the run of a checkpoint or export inside it."""
    return source_run(_src(cfg), WHAT)


def check_text_init(cfg: Config) -> Path:
    """Before any work: the text_only run objective.text_init names, its report path shaped as this config's.
    Returns its run directory."""
    from vkd_dist.objectives import get_objective

    src = _src(cfg)
    run = source_run(src, WHAT)
    spec = get_objective(cfg.objective.name)
    if not spec.needs_text():
        raise src.refused(f"objective {cfg.objective.name} has no report path to initialise (expected vkd)")
    if spec.configurable_posterior and cfg.model.posterior != "text":
        raise src.refused(f"a text_only run's posterior reads the report only; expected model.posterior=text, "
                          f"not {cfg.model.posterior}")
    init = RunDir(run).config()
    if init.objective.name != "text_only":
        raise src.refused(f"expected a text_only run, got a {init.objective.name} run")
    text = [m for m in MODULES if m != "text_encoder" or not cfg.data.text_features]  # features: no encoder
    return check_source(src, cfg, text, WHAT)


def check_config(cfg: Config) -> None:
    """objective.text_init, when set (see check_text_init)."""
    if cfg.objective.text_init:
        check_text_init(cfg)


def init_text_path(model: torch.nn.Module, cfg: Config, labels: Sequence[str]) -> None:
    """Copy the text_only run's report path into `model` (a no-op without objective.text_init)."""
    if not cfg.objective.text_init:
        return
    run = check_text_init(cfg)
    RunDir(run).check_labels(labels, cfg.data.path)
    weights = source_weights(_src(cfg), run, ("best", "final", "checkpoint"))
    copy_modules(model, _src(cfg), weights, [m for m in MODULES if any(k.startswith(f"{m}.")
                                                                        for k in model.state_dict())])
