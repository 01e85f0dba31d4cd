"""Typed configs for every stage, loadable from YAML with dotted CLI overrides.

`load_config(SFTConfig, "c.yaml", ["--train.lr", "1e-4"])` reads the file, applies the
overrides, and validates everything up front: an unknown key or a wrong type is a
`ConfigError` that names the key and suggests the closest valid one.

The sections are in `sections.py`, the RL presets in `rl_presets.py`, and loading, dumping and
the `--help` listing in `loading.py`; everything public is importable from here.
"""

from quartet.config.loading import (
    LEGACY_PPO_KEYS,
    LEGACY_RL_SECTIONS,
    RESUME_LOCKED_KEYS,
    build_config,
    critic_only_keys,
    describe_config,
    describe_rl_config,
    dump_config,
    legacy_key,
    load_config,
    load_run_config,
    parse_overrides,
    read_yaml,
)
from quartet.config.rl_presets import RL_PRESETS, apply_rl_preset
from quartet.config.sections import (
    AlgorithmConfig,
    BatchConfig,
    ConfigError,
    DataConfig,
    DPOConfig,
    DPOLossConfig,
    LoopConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    PromptDataConfig,
    RewardConfig,
    RewardLossConfig,
    RLConfig,
    RLModelsConfig,
    RLTrainConfig,
    RolloutConfig,
    RunSection,
    SamplingConfig,
    Section,
    SFTConfig,
    StageConfig,
    TrainConfig,
)

__all__ = [
    "LEGACY_PPO_KEYS", "LEGACY_RL_SECTIONS", "RESUME_LOCKED_KEYS", "RL_PRESETS", "AlgorithmConfig", "BatchConfig", "ConfigError",
    "DataConfig", "DPOConfig", "DPOLossConfig", "LoopConfig", "LoraConfig", "ModelConfig", "OptimConfig",
    "PromptDataConfig", "RewardConfig", "RewardLossConfig", "RLConfig", "RLModelsConfig", "RLTrainConfig",
    "RolloutConfig", "RunSection", "SamplingConfig", "Section", "SFTConfig", "StageConfig", "TrainConfig",
    "apply_rl_preset", "build_config", "critic_only_keys", "describe_config", "describe_rl_config", "dump_config",
    "legacy_key", "load_config", "load_run_config", "parse_overrides", "read_yaml",
]
