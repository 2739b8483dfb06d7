"""Training objectives: each maps (model, batch, step) to named loss terms; the train loop only sums and logs
them. A new objective is one class in this folder, decorated with `@register` (see base.py); config
validation, model building, evaluation and export ask the registry what it needs.

vkd         the variational knowledge distillation ELBO (vkd.py)
image_only  the image path alone; text_only: the report path alone (baselines.py)
kd          logit distillation from a text_only teacher (kd.py)
contrastive image-report contrastive pre-training, CLIP-style symmetric InfoNCE (contrastive.py)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from vkd_dist.config import ConfigError, not_allowed

if TYPE_CHECKING:
    import torch

    from vkd_dist.config import Config, ObjectiveConfig

# Importing registers them, in the order choices are listed: the method, then its baselines.
from vkd_dist.objectives import vkd, baselines, kd, contrastive  # noqa: F401, I001
from vkd_dist.objectives.base import (BOTH, IMAGE, LABELLED, MIXED, PAIRED, PAIRS, TEXT, Objective, get_objective,
                                      objective_names, register)
from vkd_dist.objectives.losses import beta_at, masked_bce

__all__ = ["BOTH", "IMAGE", "LABELLED", "MIXED", "PAIRED", "PAIRS", "TEXT", "Objective", "beta_at",
           "build_objective", "check_config", "check_teacher", "get_objective", "masked_bce",
           "objective_names", "register"]


def build_objective(cfg: ObjectiveConfig, num_samples: int = 1, teacher: Optional[torch.nn.Module] = None) -> Objective:
    """The configured objective."""
    return get_objective(cfg.name)(cfg, num_samples, teacher)


# Settings known by a name of their own that are not objectives (the study's arms): the recipe that selects each.
RECIPES = {"vkd_distil": "configs/recipes/vkd_distil.yaml, after the text_only run of "
                         "configs/recipes/vkd_distil_teacher.yaml (docs/partial-labels.md)"}


def check_config(cfg: Config) -> None:
    """objective.name is a registered objective (asked at validation time: tests register their own). Whether
    data.labelled_share leaves a batch a labelled study depends on the data set: prepare_run asks."""
    name = cfg.objective.name
    if name in RECIPES and name not in objective_names():
        raise ConfigError(f"objective.name={name!r} is not an objective but a setting of vkd: select it with "
                          f"--config {RECIPES[name]}")
    if name not in objective_names():
        raise not_allowed("objective.name", name, objective_names())


def check_teacher(cfg: Config) -> None:
    """An objective that distils from a teacher is given one (that the path exists: vkd_dist/config/checks.py)."""
    if get_objective(cfg.objective.name).needs_teacher and not cfg.objective.kd_teacher:
        raise ConfigError(f"objective.kd_teacher must name a text_only run directory or checkpoint when "
                          f"objective={cfg.objective.name}")
