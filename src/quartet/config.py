"""Typed configs for every stage, loadable from YAML with dotted CLI overrides.

`load_config(SFTConfig, "c.yaml", ["--train.lr", "1e-4"])` reads the file, applies the
overrides, and validates everything up front: an unknown key or a wrong type is a
`ConfigError` that names the key and suggests the closest valid one.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot be used, with the offending key named."""


class Section(BaseModel):
    """Base of all config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# ----------------------------------------------------------------------------- sections


class ModelConfig(Section):
    """Where a model comes from: a local Hugging Face directory, or a tiny preset built from scratch."""

    path: str | None = Field(None, description="Local Hugging Face model directory (from_pretrained).")
    preset: str | None = Field(None, description="Build a fresh model from a named preset (nano, tiny, small, gpt2-tiny); "
                               "'tiny' when neither path nor preset is set.")
    tokenizer_path: str | None = Field(None, description="Tokenizer directory; defaults to `path`.")
    vocab_size: int = Field(2048, gt=16, description="Vocabulary of the tokenizer trained for a preset.")
    trust_remote_code: bool = False
    allow_pickle: bool = Field(False, description="Allow loading non-safetensors (pickle) weights. Only for files you trust.")
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if self.path and self.preset:
            raise ValueError("set either model.path or model.preset, not both")
        return self


class LoraConfig(Section):
    """Low-rank adapters through peft (off by default)."""

    enabled: bool = False
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"


class DataConfig(Section):
    """Local data files and the over-long policy (prompt kept from its end, then cut at max_length)."""

    train: str | None = Field(None, description="Training file or save_to_disk directory.")
    eval: str | None = Field(None, description="Held-out file; when absent, eval_fraction of train is held out.")
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    max_length: int = Field(512, gt=1)
    max_prompt_length: int = Field(256, gt=0)
    completion_field: str | None = Field(None, description="SFT: read the completion from this field (e.g. 'chosen').")
    limit: int | None = Field(None, gt=0, description="Use at most this many training rows.")


class TrainConfig(Section):
    """Optimisation of the supervised stages (SFT, reward)."""

    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    batch_size: int = Field(8, gt=0, description="Examples per micro-batch.")
    grad_accum: int = Field(1, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    bf16: bool = Field(False, description="bf16 autocast where the hardware supports it.")
    mask_prompt: bool = Field(True, description="SFT: loss on completion tokens only.")
    eval_every: int = Field(50, gt=0)
    log_every: int = Field(5, gt=0)
    save_every: int | None = Field(None, gt=0, description="Checkpoint every N steps (always at the end).")
    keep_checkpoints: int = Field(2, gt=0)
    max_nonfinite_steps: int = Field(10, gt=0, description="Stop after this many non-finite steps in a row.")


class RunSection(Section):
    output_dir: str = "runs/sft"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


# ----------------------------------------------------------------------------- stages


class StageConfig(Section):
    run: RunSection = RunSection()


class SFTConfig(StageConfig):
    """`quartet sft`: supervised fine-tuning of the initial actor (and reference)."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    lora: LoraConfig = LoraConfig()

    @model_validator(mode="after")
    def _default_model(self) -> "SFTConfig":
        if not self.model.path and not self.model.preset:
            self.model.preset = "tiny"
        return self


class RewardLossConfig(Section):
    """Pairwise loss -log sigmoid(r_chosen - r_rejected - margin) + center_coef * (r_chosen + r_rejected)^2."""

    use_margin: bool = Field(True, description="Use the data's optional per-pair 'margin' field.")
    center_coef: float = Field(0.0, ge=0.0, description="Reward centering: keeps scores near zero (e.g. 0.01).")


class RewardConfig(StageConfig):
    """`quartet reward`: a one-output sequence classifier trained on chosen/rejected pairs."""

    run: RunSection = RunSection(output_dir="runs/reward")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig(lr=1e-4)
    loss: RewardLossConfig = RewardLossConfig()
    lora: LoraConfig = LoraConfig()

    @model_validator(mode="after")
    def _default_model(self) -> "RewardConfig":
        if not self.model.path and not self.model.preset:
            self.model.preset = "tiny"
        return self


class PPOModelsConfig(Section):
    """The four models. Reference defaults to the actor's checkpoint; critic to the reward model's."""

    actor: str | None = Field(None, description="SFT model directory: the actor starts here.")
    reference: str | None = Field(None, description="Frozen reference; defaults to `actor` (with LoRA: the actor with adapters off).")
    reward: str | None = Field(None, description="Reward model directory (one-output sequence classifier).")
    reward_fn: str | None = Field(None, description="Instead of a reward model: 'module:function' taking (prompts, responses) -> scores.")
    critic: str | None = Field(None, description="Critic initialisation directory; default per critic_init.")
    critic_init: Literal["reward", "actor"] = Field("reward", description="Critic starts from the reward model (DeepSpeed-Chat) or the SFT model.")
    trust_remote_code: bool = False
    allow_pickle: bool = False

    @model_validator(mode="after")
    def _one_reward(self) -> "PPOModelsConfig":
        if self.reward and self.reward_fn:
            raise ValueError("set models.reward or models.reward_fn, not both")
        return self


class GenerationConfig(Section):
    """Sampling during rollout (temperature applies to the PPO log-probs too)."""

    max_new_tokens: int = Field(64, gt=0)
    min_new_tokens: int = Field(0, ge=0)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0, le=1.0, description="1.0 = off")


class PPOSection(Section):
    """One PPO step: rollout -> scores -> per-token rewards -> GAE -> clipped updates."""

    steps: int = Field(100, gt=0, description="PPO steps (each: one rollout batch and its updates).")
    rollout_batch_size: int = Field(16, gt=0, description="Prompts per step (global, over all processes).")
    mini_batch_size: int = Field(8, gt=0, description="Rollouts per optimizer step.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per mini-batch.")
    ppo_epochs: int = Field(1, gt=0, description="Passes over each rollout batch.")
    actor_lr: float = Field(1e-5, gt=0)
    critic_lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    beta: float = Field(0.1, ge=0, description="KL penalty coefficient (initial value when adaptive).")
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    adaptive_kl: bool = Field(False, description="Ziegler et al.'s adaptive KL controller.")
    kl_target: float = Field(6.0, gt=0)
    kl_horizon: int = Field(10000, gt=0)
    clip_reward_value: float = Field(5.0, gt=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    whiten_advantages: bool = True
    score_normalization: Literal["none", "stored", "running"] = Field(
        "none", description="'stored': reward model's saved mean/std; 'running': running stats of scores.")
    missing_eos_penalty: float | None = Field(None, description="Score given to responses that never emit EOS.")
    logprobs_from_generation: bool = Field(True, description="Old log-probs from the sampling step (no extra actor forward).")
    forward_batch_size: int | None = Field(
        None, gt=0, description="Rows per scoring forward (reference, critic, reward model) on each process; "
                                "default: the training micro-batch (mini_batch_size / grad_accum / processes), "
                                "or more rows while one forward's float32 logits stay within 64 MiB.")
    sample_every: int = Field(10, gt=0, description="Log a table of sample responses every N steps.")
    n_samples: int = Field(4, ge=0)
    log_every: int = Field(1, gt=0)
    save_every: int | None = Field(None, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    max_nonfinite_steps: int = Field(10, gt=0, description="Stop after this many non-finite steps in a row.")
    bf16: bool = Field(False, description="bf16 autocast for generation, scoring and updates (GPUs with bf16; see README).")
    compile: bool = Field(False, description="torch.compile the actor and critic forward of the PPO updates "
                                             "(a one-time compile of about a minute; see README).")
    shared_trunk: bool = Field(False, description="The critic is a value head on the actor's own trunk: one trunk "
                                                  "forward and backward per update instead of two (changes the "
                                                  "algorithm: the value loss trains the actor's trunk; see README).")
    vf_coef: float = Field(0.1, gt=0, description="Weight of the value loss in the shared trunk's loss "
                                                  "(with separate models each has its own gradients: unused).")


class PromptDataConfig(DataConfig):
    """PPO's prompt data: shorter prompts by default, leaving room for the response."""

    max_prompt_length: int = Field(128, gt=0)


class PPOConfig(StageConfig):
    """`quartet ppo`: the four-model PPO stage. `preset: deepspeed-chat` reproduces DeepSpeed-Chat's step 3."""

    preset: str | None = Field(None, description="Named defaults applied before the file's values (deepspeed-chat).")
    run: RunSection = RunSection(output_dir="runs/ppo")
    models: PPOModelsConfig = PPOModelsConfig()
    data: PromptDataConfig = PromptDataConfig()
    generation: GenerationConfig = GenerationConfig()
    ppo: PPOSection = PPOSection()
    lora: LoraConfig = LoraConfig()

    @model_validator(mode="after")
    def _check(self) -> "PPOConfig":
        if not self.models.actor:
            raise ValueError("models.actor is required (the SFT model directory)")
        if not self.models.reward and not self.models.reward_fn:
            raise ValueError("set models.reward (a reward model directory) or models.reward_fn ('module:function')")
        p = self.ppo
        if p.rollout_batch_size % p.mini_batch_size:
            raise ValueError(f"ppo.rollout_batch_size ({p.rollout_batch_size}) must be a multiple of "
                             f"ppo.mini_batch_size ({p.mini_batch_size})")
        if p.mini_batch_size % p.grad_accum:
            raise ValueError(f"ppo.mini_batch_size ({p.mini_batch_size}) must be a multiple of "
                             f"ppo.grad_accum ({p.grad_accum})")
        if self.generation.min_new_tokens > self.generation.max_new_tokens:
            raise ValueError(f"generation.min_new_tokens ({self.generation.min_new_tokens}) exceeds "
                             f"generation.max_new_tokens ({self.generation.max_new_tokens})")
        if p.shared_trunk and self.models.critic:
            raise ValueError("ppo.shared_trunk builds the critic on the actor's trunk: leave models.critic unset")
        if p.shared_trunk and self.lora.enabled:
            raise ValueError("ppo.shared_trunk does not combine with LoRA (the value loss would have to train "
                             "the frozen trunk): turn one of them off")
        if (self.models.critic_init == "reward" and not p.shared_trunk and not self.models.reward
                and not self.models.critic):
            raise ValueError("models.critic_init is 'reward' but there is no reward model (reward_fn given): "
                             "set models.critic_init=actor or models.critic")
        return self


# DeepSpeed-Chat step 3 (applications/DeepSpeed-Chat, ppo_trainer.py defaults).
PPO_PRESETS: dict[str, dict[str, Any]] = {
    "deepspeed-chat": {
        "ppo": {"beta": 0.1, "adaptive_kl": False, "kl_estimator": "k1", "clip_reward_value": 5.0, "gamma": 1.0,
                "lam": 0.95, "whiten_advantages": False, "ppo_epochs": 1, "cliprange": 0.2, "cliprange_value": 0.2,
                "score_normalization": "none"},
        "models": {"critic_init": "reward"},
    },
}


def _deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def apply_ppo_preset(data: dict, overrides: dict[str, Any]) -> dict:
    """Put a named preset's values under the file's and the command line's."""
    name = overrides.get("preset", data.get("preset"))
    if name is None:
        return data
    if name not in PPO_PRESETS:
        raise ConfigError(f"unknown preset '{name}'; choose one of: {', '.join(PPO_PRESETS)}")
    return _deep_merge(PPO_PRESETS[name], data)


# ----------------------------------------------------------------------------- loading

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def _dotted_keys(model_cls: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model_cls.model_fields.items():
        keys.append(prefix + name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_dotted_keys(annotation, prefix + name + "."))
    return keys


# Names users bring from other frameworks, mapped to ours.
_SYNONYMS = {"learning_rate": "lr", "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
             "num_train_epochs": "epochs", "model_name_or_path": "path", "output": "output_dir"}


def _suggest(key: str, valid: list[str]) -> str:
    prefix, _, leaf = key.rpartition(".")
    if leaf in _SYNONYMS:
        candidate = f"{prefix}.{_SYNONYMS[leaf]}" if prefix else _SYNONYMS[leaf]
        matches = [k for k in valid if k == candidate or k.endswith("." + _SYNONYMS[leaf])]
        if matches:
            return f"; did you mean '{candidate if candidate in valid else matches[0]}'?"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # try the last component alone, e.g. "train.learning_rate" -> "train.lr"
        leaf = key.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in valid}
        hits = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.5)
        close = [leaves[hits[0]]] if hits else []
    return f"; did you mean '{close[0]}'?" if close else ""


def _check_keys(model_cls: type[BaseModel], data: dict, prefix: str, valid: list[str]) -> None:
    for key, value in data.items():
        dotted = prefix + str(key)
        field = model_cls.model_fields.get(key)
        if field is None:
            raise ConfigError(f"unknown config key '{dotted}'{_suggest(dotted, valid)}")
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' must be a section (mapping), got {type(value).__name__}")
            _check_keys(annotation, value, dotted + ".", valid)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn `["--train.lr", "1e-4", "--lora.enabled=true"]` into {"train.lr": 1e-4, ...} (YAML-typed values)."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"unexpected argument '{arg}': overrides look like --section.key VALUE")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override '--{key}' needs a value")
            raw = args[i + 1]
            i += 2
        overrides[key.replace("-", "_")] = _parse_value(raw)
    return overrides


def _parse_value(raw: str) -> Any:
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as text; numbers should be numbers
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def _format_validation_error(err: ValidationError, valid: list[str]) -> str:
    lines = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"])
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{key}'{_suggest(key, valid)}")
        elif key:
            got = item.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"config key '{key}': {message}{shown}")
        else:
            lines.append(message.removeprefix("Value error, "))
    return "; ".join(lines)


def build_config(config_cls: type[ConfigT], data: dict | None = None, overrides: dict[str, Any] | None = None) -> ConfigT:
    """Validate `data` with dotted `overrides` applied on top; raise ConfigError naming any bad key."""
    data = dict(data or {})
    valid = _dotted_keys(config_cls)
    for dotted, value in (overrides or {}).items():
        if dotted not in valid:
            raise ConfigError(f"unknown config key '{dotted}'{_suggest(dotted, valid)}")
        _set_dotted(data, dotted, value)
    _check_keys(config_cls, data, "", valid)
    try:
        return config_cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, valid)) from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(config_cls: type[ConfigT], path: str | Path | None = None, override_args: list[str] | None = None) -> ConfigT:
    """Load a stage config from an optional YAML file plus `--section.key VALUE` CLI overrides."""
    data = read_yaml(path) if path else {}
    overrides = parse_overrides(override_args or [])
    if config_cls is PPOConfig:
        data = apply_ppo_preset(data, overrides)
    return build_config(config_cls, data, overrides)


def dump_config(config: BaseModel, path: str | Path) -> None:
    """Write the resolved config as YAML (every field, defaults included)."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
