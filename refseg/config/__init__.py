"""Typed experiment configuration: the schema (dataclasses), YAML loading with dotted overrides, presets.

    from refseg.config import load_config
    cfg = load_config("configs/debug.yaml", ["train.lr=2e-4", "model.fusion.num_layers=4"])
    model = build_model(cfg.model)   # each section goes to its own builder

``schema`` holds the dataclasses and :class:`ConfigError`, ``load`` turns YAML and overrides into them
(unknown keys name the closest valid one), ``presets`` the named model sizes, ``validate`` every value and cross-field check (``validate(cfg)``). No torch or ray import.
"""

from refseg.config.load import (
    apply_overrides,
    closest_key,
    config_from_dict,
    deep_copy,
    fix_floats,
    load_config,
    load_yaml,
    parse_override,
    shipped_path,
)
from refseg.config.presets import PRESETS, TINY_TOKENIZER, preset_config
from refseg.config.schema import (
    Config,
    ConfigError,
    DataConfig,
    DecoderConfig,
    DeepSpeedConfig,
    EvalConfig,
    FusionConfig,
    LossConfig,
    ModelConfig,
    TextConfig,
    TrainConfig,
    TuneConfig,
    VisionConfig,
)
from refseg.config.validate import validate

__all__ = [
    "PRESETS",
    "TINY_TOKENIZER",
    "Config",
    "ConfigError",
    "DataConfig",
    "DecoderConfig",
    "DeepSpeedConfig",
    "EvalConfig",
    "FusionConfig",
    "LossConfig",
    "ModelConfig",
    "TextConfig",
    "TrainConfig",
    "TuneConfig",
    "VisionConfig",
    "apply_overrides",
    "closest_key",
    "config_from_dict",
    "deep_copy",
    "fix_floats",
    "load_config",
    "load_yaml",
    "parse_override",
    "preset_config",
    "shipped_path",
    "validate",
]
