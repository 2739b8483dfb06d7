"""objective.text_init: a run's report path (text encoder, posterior head, classifier) starts from the weights of a
trained text_only run, and the run reads reports with that run's tokenizer (vkd_dist/prepare.py tokenizer_dir).

The weights are those kd's teacher would be (vkd_dist/evaluate.py load_teacher): the checkpoint or export named,
else the run's best/, else final/, else its newest verified checkpoint. Refused, one line each: a run that is
not text_only, or whose text encoder or latent sizes differ from this config's."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vkd_dist.config import ConfigError
from vkd_dist.run_dir import RunDir

if TYPE_CHECKING:
    import torch

    from vkd_dist.config import Config

KEY = "objective.text_init"
REPORT_PATH = ("text_encoder.", "posterior_head.", "classifier.")
# model.* keys that fix the report path's tensors (and what its features mean)
SAME_KEYS = ("text_encoder", "text_config", "text_pooling", "latent_dim", "hidden_dim")


def _refused(cfg: Config, expected: str) -> ConfigError:
    return ConfigError(f"{KEY}={cfg.objective.text_init}: {expected}")


def text_init_run(cfg: Config) -> Path:
    """The run directory objective.text_init names: itself, or the run of a checkpoint or export inside it
    (RUN/best, RUN/final, RUN/checkpoints/step-N)."""
    run = RunDir.containing(str(cfg.objective.text_init))
    if run is None:
        raise _refused(cfg, f"expected a text_only run directory or a checkpoint in one (no {RunDir.CONFIG} there)")
    return run.path


def check_text_init(cfg: Config) -> Path:
    """Before any work: the text_only run objective.text_init names, its report path shaped as this config's.
    Returns its run directory."""
    from vkd_dist.objectives import get_objective

    if not Path(str(cfg.objective.text_init)).exists():
        raise _refused(cfg, "no such file or directory (expected a text_only run directory)")
    spec = get_objective(cfg.objective.name)
    if not spec.needs_text():
        raise _refused(cfg, f"objective {cfg.objective.name} has no report path to initialise (expected vkd)")
    if spec.configurable_posterior and cfg.model.posterior != "text":
        raise _refused(cfg, f"a text_only run's posterior reads the report only; expected model.posterior=text, "
                            f"not {cfg.model.posterior}")
    run = text_init_run(cfg)
    init = RunDir(run).config()
    if init.objective.name != "text_only":
        raise _refused(cfg, f"expected a text_only run, got a {init.objective.name} run")
    differ = [f"model.{k} {getattr(init.model, k)!r} there, {getattr(cfg.model, k)!r} here" for k in SAME_KEYS
              if getattr(init.model, k) != getattr(cfg.model, k)]
    if differ:
        raise _refused(cfg, f"its text encoder / latent sizes differ ({'; '.join(differ)}); expected the same")
    if bool(init.data.text_features) != bool(cfg.data.text_features):  # a run on features has no text encoder
        raise _refused(cfg, f"data.text_features {init.data.text_features!r} there, {cfg.data.text_features!r} here; "
                            "expected both precomputed or both encoded")
    return run


def check_config(cfg: Config) -> None:
    """objective.text_init, when set (see check_text_init)."""
    if cfg.objective.text_init:
        check_text_init(cfg)


def text_init_weights(cfg: Config, run: Path) -> Path:
    """The weights file: the checkpoint (verified) or export named, else best/ > final/ > the newest verified
    checkpoint of the run."""
    from vkd_dist import checkpoint, weights

    given = Path(str(cfg.objective.text_init))
    if given != run:  # a checkpoint or an export inside the run
        if (given / checkpoint.STATE_FILE).is_file() and (problem := checkpoint.verify(given)) is not None:
            raise _refused(cfg, f"not a complete checkpoint: {problem}")
        return weights.find_weights(run, str(given))
    for which in ("best", "final"):  # as kd's teacher
        if RunDir(run).export_weights(which).is_file():
            return RunDir(run).export_weights(which)
    ckpt = checkpoint.resolve(run, "latest")
    if ckpt is None or not (ckpt / weights.EXPORT_FILE).is_file():
        raise _refused(cfg, f"expected weights in best/, final/ or a checkpoint with {weights.EXPORT_FILE}")
    return ckpt / weights.EXPORT_FILE


def init_text_path(model: torch.nn.Module, cfg: Config, labels: Sequence[str]) -> None:
    """Copy the text_only run's report path into `model` (a no-op without objective.text_init)."""
    if not cfg.objective.text_init:
        return
    from vkd_dist.weights import load_weights

    run = check_text_init(cfg)
    RunDir(run).check_labels(labels, cfg.data.path)
    weights = text_init_weights(cfg, run)
    state = load_weights(weights)
    own = {k: v for k, v in model.state_dict().items() if k.startswith(REPORT_PATH)}
    for k, v in own.items():
        if k not in state or state[k].shape != v.shape:
            found = f"shape {tuple(state[k].shape)}" if k in state else "nothing"
            raise _refused(cfg, f"{weights} has {found} for {k}; expected shape {tuple(v.shape)}")
    model.load_state_dict({k: state[k] for k in own}, strict=False)
