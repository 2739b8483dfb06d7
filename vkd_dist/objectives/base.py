"""What an objective is, and the registry that names them.

An objective is one small class: its name, the model mode its forward pass needs, whether it needs a
teacher, what inference uses, and the loss terms it computes from the model's outputs. Everything else
(config validation, model building, the kd teacher, evaluation, export) asks the registry, so adding one is a
subclass decorated with `@register` plus its tests."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Optional

import torch

from vkd_dist.data.compose import LABELLED, MIXED, PAIRED  # what an objective learns from

if TYPE_CHECKING:
    from vkd_dist.config import ObjectiveConfig
    from vkd_dist.data.pipeline import Batch
    from vkd_dist.models.vkd import VKDOutput

# The model's forward modes (vkd_dist.models.vkd.VKDModel.forward).
BOTH, IMAGE, TEXT, PAIRS = "both", "image", "text", "pairs"


class Objective:
    """Subclasses set the class attributes and implement `terms`; the train loop only sums and logs them."""

    name: ClassVar[str]
    model_mode: ClassVar[str] = IMAGE  # both: prior and posterior, K samples each | image | text: the mean only
    needs_teacher: ClassVar[bool] = False  # a frozen text_only run (objective.kd_teacher) scores each batch
    inference: ClassVar[str] = IMAGE  # what evaluation and export run: image (deployable) | text (reads reports)
    stochastic: ClassVar[bool] = False  # trains the heads' variances; deterministic ones use the means only
    configurable_posterior: ClassVar[bool] = False  # model.posterior (text | image_text) applies
    # which studies its batches hold where some have no labels (vkd_dist/data/compose.py): LABELLED (labelled
    # ones only) | MIXED (data.labelled_share of each batch labelled) | PAIRED (labels unused: every study)
    learns_from: ClassVar[str] = LABELLED

    def __init__(self, cfg: ObjectiveConfig, num_samples: int = 1, teacher: Optional[torch.nn.Module] = None):
        self.cfg, self.num_samples, self.teacher = cfg, num_samples, teacher
        self._pos_weight = torch.tensor(cfg.pos_weight, dtype=torch.float32) if cfg.pos_weight else None

    @classmethod
    def needs_image(cls) -> bool:
        return cls.model_mode in (BOTH, IMAGE, PAIRS)

    @classmethod
    def needs_text(cls) -> bool:
        return cls.model_mode in (BOTH, TEXT, PAIRS)

    def pos_weight(self, device: torch.device) -> Optional[torch.Tensor]:
        return None if self._pos_weight is None else self._pos_weight.to(device)

    def __call__(self, model: torch.nn.Module, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        out = model(batch, mode=self.model_mode, num_samples=self.num_samples)
        return self.terms(out, batch, step)

    def terms(self, out: VKDOutput, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """Named loss terms: "loss" is what is minimised; the others are detached, for logging."""
        raise NotImplementedError


REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    if cls.model_mode not in (BOTH, IMAGE, TEXT, PAIRS) or cls.inference not in (IMAGE, TEXT) or \
            cls.learns_from not in (LABELLED, MIXED, PAIRED):
        raise ValueError(f"objective {cls.name!r}: model_mode {cls.model_mode!r} / inference {cls.inference!r} / "
                         f"learns_from {cls.learns_from!r}")
    if cls.inference == IMAGE and not cls.needs_image():
        raise ValueError(f"objective {cls.name!r}: image inference needs an image path (model_mode {cls.model_mode})")
    REGISTRY[cls.name] = cls
    return cls


def objective_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get_objective(name: str) -> type[Objective]:
    if name not in REGISTRY:
        raise KeyError(f"objective {name!r} is not registered (registered: {', '.join(REGISTRY)})")
    return REGISTRY[name]
