"""Configuration: typed schema (`schema`) and YAML loading with overlays (`loader`)."""

from jaxft.config.loader import ConfigError, config_diff, dump_config, load_config, validate
from jaxft.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    PeftConfig,
    RopeScalingConfig,
    SourceConfig,
    TokenizerConfig,
    TrainConfig,
    to_dict,
)

__all__ = [
    "CheckpointConfig", "Config", "DataConfig", "EvalConfig", "MeshConfig", "ModelConfig",
    "OptimizerConfig", "PeftConfig", "RopeScalingConfig", "SourceConfig", "TokenizerConfig",
    "TrainConfig", "to_dict",
    "ConfigError", "config_diff", "dump_config", "load_config", "validate",
]
