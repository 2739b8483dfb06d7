"""One typed configuration tree: dataclasses, loaded from YAML, `key=value` overrides, validated up front.

Load order: dataclass defaults -> `configs/default.yaml` -> --config FILE -> command-line overrides. A FILE
without an `include:` key layers on configs/default.yaml; one with `include:` builds on what it includes
(`include: []`: on the dataclass defaults alone). `data.build_synthetic` belongs to the `data.path` of the layer
that set it: a later layer that moves `data.path` without setting it again turns building off, so a mistyped
path is an error, not a new synthetic corpus. The resolved tree is written as `config.yaml` into every run directory.

This package is the bottom floor: it imports nothing of vkd_dist (the standard library and yaml only).
`read_config` builds the tree and runs the structural checks (keys, types, ranges, constant choices, paths);
the checks that need a component live in that component, and `vkd_dist.configure.load_config` (which every
entry point uses) runs both, before any data or model is built.
"""

from vkd_dist.config.checks import CHOICES, STRUCTURAL, check_structure
from vkd_dist.config.loading import config_from_dict, overrides_from_yaml, read_config, save_config, to_dict
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
    config_keys_named,
    did_you_mean,
    no_dataset,
    not_allowed,
    unknown_key,
)

__all__ = ["CHOICES", "DEFAULT_CONFIG", "REPO_ROOT", "STRUCTURAL", "Config", "ConfigError", "DataConfig",
           "DistConfig", "LoggingConfig", "ModelConfig", "ObjectiveConfig", "OptimConfig", "SyntheticConfig",
           "TrainConfig", "check_structure", "close_match", "config_from_dict", "config_keys_named", "did_you_mean",
           "no_dataset", "not_allowed", "overrides_from_yaml", "read_config", "save_config", "to_dict",
           "unknown_key"]
