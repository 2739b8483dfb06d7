"""Starting a run's modules from another run's weights, read through safetensors: the one mechanism behind
objective.text_init (a text_only run's report path, vkd_dist/text_init.py) and model.init_from (the modules
model.init_modules names, from any run: e.g. a contrastive pre-training run's image encoder, fine-tuned or, with
model.freeze_image, probed linearly).

Validated before any work (`check_source`): the path exists and is a run (or a checkpoint / export inside one),
the source run's objective built each named module, and the config keys that fix each module's tensors agree,
each refusal one line naming the key. At load (`copy_modules`) every tensor of the named modules must be in the
weights file with this model's shape; only those are copied, every other parameter keeps its initialisation."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vkd_dist.config import Config, ConfigError, not_allowed
from vkd_dist.run_dir import RunDir

if TYPE_CHECKING:
    import torch

KEY = "model.init_from"
_IMAGE = ("model.image_encoder", "model.image_encoder_kwargs", "model.in_chans", "data.image_size")
_TEXT = ("model.text_encoder", "model.text_config", "model.text_pooling")
_LATENT = ("model.latent_dim", "model.hidden_dim")
# module -> the config keys that fix its tensors (and what its inputs mean)
MODULE_KEYS: dict[str, tuple[str, ...]] = {
    "image_encoder": _IMAGE, "text_encoder": _TEXT, "prior_head": (*_IMAGE, *_LATENT),
    "posterior_head": (*_TEXT, *_LATENT), "classifier": _LATENT, "image_classifier": (*_IMAGE, *_LATENT),
    "contrastive": (*_IMAGE, *_TEXT, "model.projection_dim"),
}
LABELLED_MODULES = ("classifier", "image_classifier")  # their outputs are the run's labels


@dataclass(frozen=True)
class Source:
    """A config key that names another run's weights, and its value."""

    key: str
    value: str

    def refused(self, expected: str) -> ConfigError:
        return ConfigError(f"{self.key}={self.value}: {expected}")


def _get(cfg: Config, dotted: str) -> Any:
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def source_run(src: Source, what: str = "a run directory") -> Path:
    """The run directory `src` names: itself, or the run of a checkpoint or export inside it (RUN/best,
    RUN/final, RUN/checkpoints/step-N)."""
    if not Path(src.value).exists():
        raise src.refused(f"no such file or directory (expected {what})")
    run = RunDir.containing(src.value)
    if run is None:
        raise src.refused(f"expected {what} or a checkpoint in one (no {RunDir.CONFIG} there)")
    return run.path


def has_module(cfg: Config, module: str) -> bool:
    """Whether a model built from `cfg` has `module` (vkd_dist/build.py)."""
    from vkd_dist.objectives import PAIRS, get_objective

    spec = get_objective(cfg.objective.name)
    separate = cfg.model.image_head == "separate" and spec.needs_image()
    return {"image_encoder": spec.needs_image(), "prior_head": spec.needs_image(),
            "text_encoder": spec.needs_text() and not cfg.data.text_features, "posterior_head": spec.needs_text(),
            "classifier": spec.needs_text() or not separate, "image_classifier": separate,
            "contrastive": spec.model_mode == PAIRS}[module]


def check_source(src: Source, cfg: Config, modules: Iterable[str], what: str = "a run directory") -> Path:
    """Before any work: the run `src` names built each of `modules` shaped as this config's. Returns its run."""
    run = source_run(src, what)
    there = RunDir(run).config()
    modules = list(modules)
    if {"text_encoder", "posterior_head", "contrastive"} & set(modules) and \
            bool(there.data.text_features) != bool(cfg.data.text_features):  # a run on features has no text encoder
        raise src.refused(f"data.text_features {there.data.text_features!r} there, {cfg.data.text_features!r} here; "
                          "expected both precomputed or both encoded")
    for module in modules:
        if not has_module(there, module):
            raise src.refused(f"its objective {there.objective.name} built no {module}")
        differ = [f"{k} {_get(there, k)!r} there, {_get(cfg, k)!r} here" for k in MODULE_KEYS[module]
                  if _get(there, k) != _get(cfg, k)]
        if differ:
            raise src.refused(f"its {module} is another architecture ({'; '.join(differ)}); expected the same")
    return run


def source_weights(src: Source, run: Path, exports: Sequence[str]) -> Path:
    """The weights file: the checkpoint (verified) or export named, else the first of `exports` ("best", "final",
    "checkpoint": the newest verified checkpoint) that the run has."""
    from vkd_dist import checkpoint, weights

    given = Path(src.value)
    if given != run:  # a checkpoint or an export inside the run
        if (given / checkpoint.STATE_FILE).is_file() and (problem := checkpoint.verify(given)) is not None:
            raise src.refused(f"not a complete checkpoint: {problem}")
        return weights.find_weights(run, str(given))
    for which in exports:
        if which != "checkpoint" and RunDir(run).export_weights(which).is_file():
            return RunDir(run).export_weights(which)
        if which == "checkpoint":
            ckpt = checkpoint.resolve(run, "latest")
            if ckpt is not None and (ckpt / weights.EXPORT_FILE).is_file():
                return ckpt / weights.EXPORT_FILE
    places = ", ".join(f"{w}/" if w != "checkpoint" else "a checkpoint" for w in exports)
    raise src.refused(f"expected weights in {places} (with {weights.EXPORT_FILE})")


def copy_modules(model: torch.nn.Module, src: Source, path: Path, modules: Iterable[str]) -> list[str]:
    """Copy every tensor of `modules` from the safetensors file `path` into `model`; returns the keys copied."""
    from vkd_dist.weights import load_weights

    prefixes = tuple(f"{m}." for m in modules)
    state = load_weights(path)
    own = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    missing = [m for m in modules if not any(k.startswith(f"{m}.") for k in own)]
    if missing:
        raise src.refused(f"this run's model has no {missing[0]} to initialise")
    for k, v in own.items():
        if k not in state or state[k].shape != v.shape:
            found = f"shape {tuple(state[k].shape)}" if k in state else "nothing"
            raise src.refused(f"{path} has {found} for {k}; expected shape {tuple(v.shape)}")
    model.load_state_dict({k: state[k] for k in own}, strict=False)
    return list(own)


# ------------------------------------------------------------------------------------------------ model.init_from
def _src(cfg: Config) -> Source:
    return Source(KEY, str(cfg.model.init_from))


def check_config(cfg: Config) -> None:
    """model.init_from, when set: model.init_modules names modules this model has, and the run has them too."""
    if not cfg.model.init_from:
        return
    modules = list(cfg.model.init_modules)
    if not modules:
        raise ConfigError(f"model.init_modules is empty; expected some of {', '.join(MODULE_KEYS)} with {KEY}")
    for module in modules:
        if module not in MODULE_KEYS:
            raise not_allowed("model.init_modules", module, MODULE_KEYS)
        if not has_module(cfg, module):
            raise _src(cfg).refused(f"objective {cfg.objective.name} builds no {module} to initialise "
                                    "(model.init_modules)")
    check_source(_src(cfg), cfg, modules)


def init_modules(model: torch.nn.Module, cfg: Config, labels: Sequence[str]) -> None:
    """Copy model.init_modules from the run model.init_from names (a no-op without it). The weights: the
    checkpoint or export named, else the run's newest verified checkpoint (what it ended with: a run checkpoints
    at its last step), else final/."""
    if not cfg.model.init_from:
        return
    modules = list(cfg.model.init_modules)
    run = check_source(_src(cfg), cfg, modules)
    if any(m in LABELLED_MODULES for m in modules):
        RunDir(run).check_labels(labels, cfg.data.path)
    copy_modules(model, _src(cfg), source_weights(_src(cfg), run, ("checkpoint", "final")), modules)


def init_tokenizer_run(cfg: Config) -> Path | None:
    """The run whose tokenizer this one reads because it starts from that run's text encoder, else None."""
    if cfg.model.init_from and "text_encoder" in cfg.model.init_modules:
        return source_run(_src(cfg))
    return None
