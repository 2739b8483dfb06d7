"""Loading a config for work: `vkd_dist.config.read_config` plus every component's check, before any data or
model is built. Every entry point (vkd-train, vkd-slurm, vkd-data embed-text, the benchmarks, the study, the
tests) loads through `load_config` here; `validate` checks a Config built otherwise.

The layout (issue 21, the first of its two): `vkd_dist/config/` is the bottom floor and imports nothing of the
package, only the standard library and yaml. It builds the tree and makes the structural checks (keys, types,
ranges, choices that are plain constants, paths). A component that owns a registry or a name check validates
its own part of the tree with a `check_config(cfg)` in its own module: objective names and teachers
(vkd_dist.objectives), strategies (vkd_dist.strategy), timm encoders and their kwargs and BertConfig fields
(vkd_dist.models.encoders), pretrained short names (vkd_dist.models.pretrained), objective.text_init
(vkd_dist.text_init), model.init_from (vkd_dist.init_from), selectable metrics (vkd_dist.metrics), the shared
group (vkd_dist.fileio). This module, above all of them, composes the two. Every arrow points down.

Why this layout and not the second (each component owning its config dataclass, composed by the config package):
the schema stays one file of dataclasses (vkd_dist/config/schema.py) that a reader takes in at once, and reading
a config (`read_config`, `config_from_dict` for a saved run) imports no torch, timm or transformers; only the
checks moved, so a saved config.yaml, every override and every recipe mean what they meant. The second layout
would scatter the schema over the modules that import torch and timm, so that building even a bare Config (the
SLURM launcher's, a saved run's) would import them all, and it would move every dataclass that the tests,
benchmarks and docs name.

CHECKS runs in the order the one `validate` of before ran, so the first error a config reports is the same:
one line naming the key, its value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Optional

from vkd_dist import fileio, init_from, metrics, objectives, strategy, text_init
from vkd_dist.config import Config, ConfigError, read_config
from vkd_dist.config import checks as structural
from vkd_dist.config.checks import Check
from vkd_dist.models import encoders, pretrained

__all__ = ["CHECKS", "ConfigError", "load_config", "validate"]

CHECKS: tuple[Check, ...] = (
    structural.check_choices,  # data.uncertain, model.posterior, dist.backend, ...: constant choices
    objectives.check_config,  # objective.name: a registered objective
    metrics.check_config,  # train.select_metric
    structural.check_bounds,  # positive, non-negative, intervals, warmup vs max_steps, data.max_skip_frac
    fileio.check_config,  # data.shared_group: a group on this machine
    structural.check_betas,
    strategy.check_config,  # dist.strategy, dist.offload_optimizer
    structural.check_in_chans,
    encoders.check_config,  # model.image_encoder (+ kwargs, built on the meta device), model.text_config
    objectives.check_teacher,  # objective.kd_teacher, when the objective needs a teacher
    structural.check_teacher_path,
    text_init.check_config,  # objective.text_init
    init_from.check_config,  # model.init_from, model.init_modules
    structural.check_text_layers,
    structural.check_overwrite,  # overwrite with resume
    pretrained.check_config,  # model.image_weights, model.text_encoder
    structural.check_paths,  # model.tokenizer, resume, run_dir, data.path, data.text_features
)


def load_config(path: Optional[str | Path] = None, overrides: Optional[Iterable[str]] = ()) -> Config:
    """The config for work: defaults <- configs/default.yaml <- FILE <- key=value overrides (see vkd_dist.config),
    then every check of CHECKS; a ConfigError (one line) on the first that fails."""
    return read_config(path, overrides, CHECKS)


def validate(cfg: Config) -> None:
    """Every check of CHECKS on a config built otherwise (e.g. changed after loading)."""
    for check in CHECKS:
        check(cfg)
