"""`quartet pipeline`: SFT -> reward model -> PPO, or SFT -> DPO, each stage reading the previous stage's `final/`.

The YAML file has one section per stage, each a normal stage config: `sft:`, `reward:`, `ppo:`
(online RL), or `sft:` and `dpo:` (offline preference optimisation: the same preference file
that would train the reward model trains the policy directly). An optional `output_dir` holds
the stages' run directories (`sft/`, `reward/`, `ppo/` or `sft/`, `dpo/`). Every stage config is
validated before any training starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quartet.config import (
    ConfigError,
    DPOConfig,
    RewardConfig,
    RLConfig,
    SFTConfig,
    build_config,
    parse_overrides,
    read_yaml,
)

STAGES = ("sft", "reward", "ppo")
DPO_STAGES = ("sft", "dpo")
CONFIGS = {"sft": SFTConfig, "reward": RewardConfig, "ppo": RLConfig, "dpo": DPOConfig}


def _with_default(section: dict, dotted: str, value: Any) -> None:
    """Set `dotted` in a nested dict unless the user set it."""
    *parents, leaf = dotted.split(".")
    node = section
    for part in parents:
        node = node.setdefault(part, {})
    node.setdefault(leaf, value)


def pipeline_stages(data: dict) -> tuple[str, ...]:
    """The stages a pipeline file runs: sft -> dpo when it has a `dpo:` section, else sft -> reward -> ppo."""
    if "dpo" not in data:
        return STAGES
    both = sorted(set(data) & {"reward", "ppo"})
    if both:
        raise ConfigError(f"a pipeline file runs sft -> reward -> ppo or sft -> dpo: it has a 'dpo' section and "
                          f"{both}; remove one path")
    return DPO_STAGES


def build_pipeline_configs(data: dict, override_args: list[str] | None = None) -> tuple[Any, ...]:
    """Validate the stage configs of a pipeline file, wiring each stage to the previous one.

    Returns (SFTConfig, RewardConfig, RLConfig), or (SFTConfig, DPOConfig) for an sft -> dpo file.
    """
    stages = pipeline_stages(data)
    unknown = set(data) - {*STAGES, *DPO_STAGES, "output_dir", "seed"}
    if unknown:
        raise ConfigError(f"unknown pipeline key(s) {sorted(unknown)}; a pipeline file has sections {list(STAGES)} "
                          f"or {list(DPO_STAGES)}, output_dir and seed")
    output = Path(data.get("output_dir", "runs/pipeline"))
    sections = {stage: dict(data.get(stage) or {}) for stage in stages}
    per_stage: dict[str, dict[str, Any]] = {stage: {} for stage in stages}
    for key, value in parse_overrides(override_args or []).items():
        stage, _, rest = key.partition(".")
        if key == "output_dir":
            output = Path(str(value))
        elif key == "seed":
            data = {**data, "seed": value}
        elif stage in stages and rest:
            per_stage[stage][rest] = value
        else:
            raise ConfigError(f"pipeline override '--{key}' must start with one of {list(stages)} (e.g. --sft.train.lr 1e-4)")
    for stage in stages:
        _with_default(sections[stage], "run.output_dir", str(output / stage))
        if "seed" in data:
            _with_default(sections[stage], "run.seed", data["seed"])
    sft_final = str(Path(sections["sft"]["run"]["output_dir"]) / "final")
    if "dpo" in stages:
        if not (sections["dpo"].get("model") or {}).get("preset"):
            _with_default(sections["dpo"], "model.path", sft_final)
    else:
        reward_final = str(Path(sections["reward"]["run"]["output_dir"]) / "final")
        if not (sections["reward"].get("model") or {}).get("preset"):
            _with_default(sections["reward"], "model.path", sft_final)
        _with_default(sections["ppo"], "models.actor", sft_final)
        if not (sections["ppo"].get("models") or {}).get("reward_fn"):
            _with_default(sections["ppo"], "models.reward", reward_final)
    configs = []
    for stage in stages:
        try:
            configs.append(build_config(CONFIGS[stage], sections[stage], per_stage[stage]))
        except ConfigError as err:
            raise ConfigError(f"pipeline section '{stage}': {err}") from None
    return tuple(configs)


def run_pipeline(config_path: str | Path, override_args: list[str] | None = None, resume: bool = False) -> dict[str, Any]:
    """Run the file's stages in order (SFT, reward, PPO; or SFT, DPO); returns the stage summaries."""
    from quartet.stages.dpo import run_dpo
    from quartet.stages.reward import run_reward
    from quartet.stages.rl import run_rl
    from quartet.stages.sft import run_sft

    data = read_yaml(config_path)
    stages = pipeline_stages(data)
    configs = build_pipeline_configs(data, override_args)
    runners = {"sft": run_sft, "reward": run_reward, "ppo": run_rl, "dpo": run_dpo}
    summaries = {}
    for name, stage_cfg in zip(stages, configs):
        stage_dir = Path(stage_cfg.run.output_dir)
        if resume and (stage_dir / "summary.json").exists():  # written last, after final/
            print(f"[pipeline] {name}: already finished in {stage_dir}, skipping")
            continue
        summaries[name] = runners[name](stage_cfg, resume=resume)
    return summaries
