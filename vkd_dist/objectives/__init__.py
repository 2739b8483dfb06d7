"""Training objectives: each maps (model, batch, step) to named loss terms; the train loop only sums and logs
them. A new objective is one class in this folder, decorated with `@register` (see base.py); config
validation, model building, evaluation and export ask the registry what it needs.

vkd         the variational knowledge distillation ELBO (vkd.py)
image_only  the image path alone; text_only: the report path alone (baselines.py)
kd          logit distillation from a text_only teacher (kd.py)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch

    from vkd_dist.config import ObjectiveConfig

# Importing registers them, in the order choices are listed: the method, then its baselines.
from vkd_dist.objectives import vkd, baselines, kd  # noqa: F401, I001
from vkd_dist.objectives.base import BOTH, IMAGE, TEXT, Objective, get_objective, objective_names, register
from vkd_dist.objectives.losses import beta_at, masked_bce

__all__ = ["BOTH", "IMAGE", "TEXT", "Objective", "beta_at", "build_objective", "get_objective", "masked_bce",
           "objective_names", "register"]


def build_objective(cfg: ObjectiveConfig, num_samples: int = 1, teacher: Optional[torch.nn.Module] = None) -> Objective:
    """The configured objective."""
    return get_objective(cfg.name)(cfg, num_samples, teacher)
