"""One typed configuration tree: dataclasses, loaded from YAML, `key=value` overrides, validated up front.

Load order: dataclass defaults -> `configs/default.yaml` -> --config FILE -> command-line overrides. A FILE
without an `include:` key layers on configs/default.yaml; one with `include:` builds on what it includes
(`include: []`: on the dataclass defaults alone). `data.build_synthetic` belongs to the `data.path` of the layer
that set it: a later layer that moves `data.path` without setting it again turns building off, so a mistyped
path is an error, not a new synthetic corpus. `validate()` runs before any data or model is built, and the
resolved tree is written as `config.yaml` into every run directory.
"""

from vkd_dist.config.checks import CHOICES, validate
from vkd_dist.config.loading import config_from_dict, load_config, overrides_from_yaml, save_config, to_dict
from vkd_dist.config.schema import (
    DEFAULT_CONFIG,
    REPO_ROOT,
    Config,
    ConfigError,
    DataConfig,
    DistConfig,
    LoggingConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    SyntheticConfig,
    TrainConfig,
    close_match,
    did_you_mean,
    no_dataset,
    not_allowed,
)

__all__ = ["CHOICES", "DEFAULT_CONFIG", "REPO_ROOT", "Config", "ConfigError", "DataConfig", "DistConfig",
           "LoggingConfig", "ModelConfig", "ObjectiveConfig", "OptimConfig", "SyntheticConfig", "TrainConfig",
           "close_match", "config_from_dict", "did_you_mean", "load_config", "no_dataset", "not_allowed",
           "overrides_from_yaml",
           "save_config", "to_dict", "validate"]
