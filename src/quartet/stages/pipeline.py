"""`quartet pipeline`: SFT -> reward model -> PPO, each stage reading the previous stage's `final/`.

The YAML file has one section per stage (`sft:`, `reward:`, `ppo:`), each a normal stage
config, and an optional `output_dir` under which the stages write `sft/`, `reward/`, `ppo/`.
All three configs are validated before any training starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quartet.config import (
    ConfigError,
    RewardConfig,
    RLConfig,
    SFTConfig,
    build_config,
    parse_overrides,
    read_yaml,
)

STAGES = ("sft", "reward", "ppo")


def _with_default(section: dict, dotted: str, value: Any) -> None:
    """Set `dotted` in a nested dict unless the user set it."""
    *parents, leaf = dotted.split(".")
    node = section
    for part in parents:
        node = node.setdefault(part, {})
    node.setdefault(leaf, value)


def build_pipeline_configs(data: dict, override_args: list[str] | None = None) -> tuple[SFTConfig, RewardConfig, RLConfig]:
    """Validate the three stage configs of a pipeline file, wiring each stage to the previous one."""
    unknown = set(data) - {*STAGES, "output_dir", "seed"}
    if unknown:
        raise ConfigError(f"unknown pipeline key(s) {sorted(unknown)}; a pipeline file has sections {list(STAGES)}, "
                          "output_dir and seed")
    output = Path(data.get("output_dir", "runs/pipeline"))
    sections = {stage: dict(data.get(stage) or {}) for stage in STAGES}
    per_stage: dict[str, dict[str, Any]] = {stage: {} for stage in STAGES}
    for key, value in parse_overrides(override_args or []).items():
        stage, _, rest = key.partition(".")
        if key == "output_dir":
            output = Path(str(value))
        elif key == "seed":
            data = {**data, "seed": value}
        elif stage in STAGES and rest:
            per_stage[stage][rest] = value
        else:
            raise ConfigError(f"pipeline override '--{key}' must start with one of {list(STAGES)} (e.g. --sft.train.lr 1e-4)")
    for stage in STAGES:
        _with_default(sections[stage], "run.output_dir", str(output / stage))
        if "seed" in data:
            _with_default(sections[stage], "run.seed", data["seed"])
    sft_final = str(Path(sections["sft"]["run"]["output_dir"]) / "final")
    reward_final = str(Path(sections["reward"]["run"]["output_dir"]) / "final")
    if not (sections["reward"].get("model") or {}).get("preset"):
        _with_default(sections["reward"], "model.path", sft_final)
    _with_default(sections["ppo"], "models.actor", sft_final)
    if not (sections["ppo"].get("models") or {}).get("reward_fn"):
        _with_default(sections["ppo"], "models.reward", reward_final)
    configs = []
    for stage, cls in zip(STAGES, (SFTConfig, RewardConfig, RLConfig)):
        try:
            configs.append(build_config(cls, sections[stage], per_stage[stage]))
        except ConfigError as err:
            raise ConfigError(f"pipeline section '{stage}': {err}") from None
    return tuple(configs)  # type: ignore[return-value]


def run_pipeline(config_path: str | Path, override_args: list[str] | None = None, resume: bool = False) -> dict[str, Any]:
    """Run SFT, reward and PPO in order; returns the three stage summaries."""
    from quartet.stages.reward import run_reward
    from quartet.stages.rl import run_rl
    from quartet.stages.sft import run_sft

    sft_cfg, reward_cfg, ppo_cfg = build_pipeline_configs(read_yaml(config_path), override_args)
    summaries = {}
    for name, stage_cfg, runner in (("sft", sft_cfg, run_sft), ("reward", reward_cfg, run_reward), ("ppo", ppo_cfg, run_rl)):
        stage_dir = Path(stage_cfg.run.output_dir)
        if resume and (stage_dir / "summary.json").exists():  # written last, after final/
            print(f"[pipeline] {name}: already finished in {stage_dir}, skipping")
            continue
        summaries[name] = runner(stage_cfg, resume=resume)
    return summaries
