"""Loading a stage config: YAML plus dotted overrides, validated up front, and its `--help` listing.

An unknown key or a wrong type is a `ConfigError` that names the key and suggests the closest
valid one; keys of the RL config's earlier flat sections are read under their new names.
"""

from __future__ import annotations

import copy
import difflib
import textwrap
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from quartet.config.rl_presets import RL_PRESETS, apply_rl_preset
from quartet.config.sections import ConfigError, RLConfig

# Where the keys of the flat `ppo:` and `generation:` sections of earlier versions live now; the
# old names keep working (with a note), since users' YAML files and command lines carry them.
LEGACY_RL_SECTIONS = {"generation": "rollout"}
LEGACY_PPO_KEYS = {
    **dict.fromkeys(("steps", "log_every", "sample_every", "n_samples", "save_every", "keep_checkpoints",
                     "max_nonfinite_steps", "bf16", "compile"), "train"),
    **dict.fromkeys(("rollout_batch_size", "mini_batch_size", "grad_accum", "ppo_epochs", "forward_batch_size"), "batch"),
    **dict.fromkeys(("actor_lr", "critic_lr", "weight_decay", "max_grad_norm"), "optim"),
    **dict.fromkeys(("beta", "kl_estimator", "adaptive_kl", "kl_target", "kl_horizon", "clip_reward_value", "gamma", "lam",
                     "cliprange", "cliprange_value", "whiten_advantages", "score_normalization", "missing_eos_penalty",
                     "vf_coef"), "algorithm"),
    "logprobs_from_generation": "rollout",
    "shared_trunk": "models",
}


def legacy_key(dotted: str) -> str | None:
    """The current name of a key from before the RL config was grouped by concern, or None."""
    section, _, leaf = dotted.partition(".")
    if section in LEGACY_RL_SECTIONS and leaf:
        return f"{LEGACY_RL_SECTIONS[section]}.{leaf}"
    if section == "ppo" and leaf in LEGACY_PPO_KEYS:
        return f"{LEGACY_PPO_KEYS[leaf]}.{leaf}"
    return None


def _migrate_legacy_keys(data: dict, overrides: dict[str, Any], valid: list[str]) -> tuple[dict, dict[str, Any]]:
    """Rename legacy RL keys in a config mapping and its overrides, with one note naming them all."""
    renamed: dict[str, str] = {}
    data = dict(data)
    for section in ("ppo", *LEGACY_RL_SECTIONS):
        old = data.pop(section, None)
        if old is None:
            continue
        if not isinstance(old, dict):
            raise ConfigError(f"config key '{section}' must be a section (mapping), got {type(old).__name__}")
        for leaf, value in old.items():
            new = legacy_key(f"{section}.{leaf}")
            if new is None:
                raise ConfigError(f"unknown config key '{section}.{leaf}'{_suggest(f'{section}.{leaf}', valid)}")
            new_section, new_leaf = new.split(".")
            if not isinstance(data.setdefault(new_section, {}), dict):
                raise ConfigError(f"config key '{new_section}' must be a section (mapping)")
            data[new_section] = {**data[new_section], new_leaf: value}
            renamed[f"{section}.{leaf}"] = new
    new_overrides = {}
    for dotted, value in overrides.items():
        new = legacy_key(dotted)
        if new is not None:
            renamed[dotted] = new
        new_overrides[new or dotted] = value
    if renamed:
        warnings.warn("config keys renamed (the old names still work): "
                      + ", ".join(f"{old} -> {new}" for old, new in renamed.items()), FutureWarning, stacklevel=3)
    return data, new_overrides


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
        elif item["type"] == "value_error" and isinstance(item.get("input"), dict):  # a section's own check: it names its keys
            lines.append(message.removeprefix("Value error, "))
        elif key:
            got = item.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"config key '{key}': {message}{shown}")
        else:
            lines.append(message.removeprefix("Value error, "))
    return "; ".join(lines)


def build_config(config_cls: type[ConfigT], data: dict | None = None, overrides: dict[str, Any] | None = None) -> ConfigT:
    """Validate `data` with dotted `overrides` applied on top; raise ConfigError naming any bad key.

    For the RL config, keys of earlier versions are renamed first and a named preset goes under
    the file's values and the overrides.
    """
    data, overrides = copy.deepcopy(data or {}), dict(overrides or {})  # the caller's mappings stay as they were
    valid = _dotted_keys(config_cls)
    if issubclass(config_cls, RLConfig):
        data, overrides = _migrate_legacy_keys(data, overrides, valid)
        data = apply_rl_preset(data, overrides)
    for dotted, value in overrides.items():
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
    return build_config(config_cls, data, parse_overrides(override_args or []))


# Keys a resumed run keeps: they fix what its checkpoints mean (the models they hold or start from,
# the objective their optimizer state follows, the seed their RNG state continues, the shape of a
# step their data position counts). Anything else may change on --resume (train.steps to extend
# the run, logging, checkpoint intervals...).
RESUME_LOCKED_KEYS = (
    "model.path", "model.preset", "model.tokenizer_path", "model.vocab_size",
    "models.actor", "models.reference", "models.reward", "models.critic", "models.critic_init", "models.shared_trunk",
    "lora.enabled", "lora.r", "lora.alpha", "lora.target_modules", "dpo.reference",
    "preset", "algorithm.name", "dpo.loss_type", "run.seed",
    "train.batch_size", "train.grad_accum",
    "batch.rollout_batch_size", "batch.mini_batch_size", "batch.grad_accum", "batch.ppo_epochs", "rollout.n",
    "rollout.env", "rollout.tools", "rollout.max_staleness",
)
RUN_CONFIG = "config.yaml"  # the resolved config a run writes into its directory


def _dotted_value(dump: dict, dotted: str) -> Any:
    node: Any = dump
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _check_resume_keeps(run: dict, values: dict[str, Any], source: Path) -> None:
    """Raise ConfigError naming every key of RESUME_LOCKED_KEYS whose value in `values` differs from
    the run's (`run`: the run's config, dumped)."""
    changed = [f"{key} (the run's {_dotted_value(run, key)!r}, here {value!r})"
               for key, value in values.items() if key in RESUME_LOCKED_KEYS and _dotted_value(run, key) != value]
    if changed:
        raise ConfigError(f"--resume continues the run whose config is {source}, and these keys fix what its "
                          f"checkpoints mean: {', '.join(changed)}; keep the run's values, or start a new run "
                          "with another --output")


def load_run_config(config_cls: type[ConfigT], path: str | Path | None = None,
                    override_args: list[str] | None = None, resume: bool = False) -> ConfigT:
    """A stage's config as its command builds it: `load_config`, plus what `--resume` needs.

    On `resume` the run directory's own config.yaml (the resolved config the run wrote) is read:
    without `path` it is the base the command-line overrides go on top of, so
    `quartet grpo --output RUN --resume` continues RUN as it was started; either way the keys in
    RESUME_LOCKED_KEYS must keep the run's values. A directory without config.yaml resumes nothing:
    the config comes from `path` and the overrides alone.
    """
    overrides = parse_overrides(override_args or [])
    data = read_yaml(path) if path else {}
    if not resume:
        return build_config(config_cls, data, overrides)
    run_dir = overrides.get("run.output_dir") or _dotted_value(data, "run.output_dir") \
        or config_cls.model_fields["run"].default.output_dir
    saved_path = Path(run_dir) / RUN_CONFIG
    if not saved_path.is_file():
        try:
            return build_config(config_cls, data, overrides)
        except ConfigError as err:
            if path:
                raise
            raise ConfigError(f"{err} ({run_dir} holds no {RUN_CONFIG} to resume with: give the run's config "
                              "with --config FILE)") from None
    saved = read_yaml(saved_path)
    try:
        run_config = build_config(config_cls, saved)
    except ConfigError as err:
        raise ConfigError(f"{saved_path} does not load as this command's config (is it another stage's run?): "
                          f"{err}") from None
    run = run_config.model_dump(mode="json")
    _check_resume_keeps(run, overrides, saved_path)  # first, so that it, not a check it trips, is named
    config = build_config(config_cls, data if path else saved, overrides)
    after = config.model_dump(mode="json")
    _check_resume_keeps(run, {key: _dotted_value(after, key) for key in RESUME_LOCKED_KEYS}, saved_path)
    return config


def dump_config(config: BaseModel, path: str | Path) -> None:
    """Write the resolved config as YAML (every field, defaults included)."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")


# ----------------------------------------------------------------------------- help


def _type_name(annotation: Any) -> str:
    """A short name of a field's type for --help: int, float?, k1|k2|k3, str|list[str]."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    optional = len(args) < len(get_args(annotation))
    if get_origin(annotation) is Literal:
        return "|".join(str(a) for a in get_args(annotation))
    if args and get_origin(annotation) is not list:
        name = "|".join(_type_name(a) for a in args)
    else:
        name = getattr(annotation, "__name__", str(annotation)) if get_origin(annotation) is None else str(annotation)
    return name + ("?" if optional else "")


def _wrap_type(name: str, width: int) -> list[str]:
    """A type name in lines of at most `width`, broken after a '|' where it can be."""
    parts = name.split("|")
    tokens = [part + "|" for part in parts[:-1]] + parts[-1:]
    lines = [""]
    for token in tokens:
        if lines[-1] and len(lines[-1]) + len(token) > width:
            lines.append("")
        lines[-1] += token
    return [chunk for line in lines for chunk in textwrap.wrap(line, width) or [""]]


def _is_section(field: Any) -> bool:
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def critic_only_keys(config_cls: type[BaseModel]) -> list[str]:
    """The dotted keys only algorithms with a critic read (marked CRITIC_ONLY in the sections)."""
    return [f"{section}.{name}" for section, field in config_cls.model_fields.items() if _is_section(field)
            for name, leaf in field.annotation.model_fields.items()
            if (leaf.json_schema_extra or {}).get("critic_only")]


def _config_rows(config_cls: type[BaseModel], defaults: Mapping[str, Any], with_critic: bool
                 ) -> list[tuple[str, list[tuple[str, str, str, str]]]]:
    """The listing's sections, each (heading, rows of (key, type, default, description))."""
    fields = config_cls.model_fields
    top = [name for name, field in fields.items() if not _is_section(field)]
    groups = [("", config_cls, None, top)] if top else []
    left_out = set() if with_critic else set(critic_only_keys(config_cls))
    for name, field in fields.items():
        if name not in top:  # a section: its defaults are the stage's (e.g. run.output_dir per stage)
            section_default = field.get_default(call_default_factory=True)
            groups.append((name, field.annotation, section_default, list(field.annotation.model_fields)))
    sections = []
    for section, section_cls, section_default, names in groups:
        doc = (section_cls.__doc__ or "").strip().splitlines()[0] if section else "settings of the whole stage"
        rows = []
        for name in names:
            field = section_cls.model_fields[name]
            dotted = f"{section}.{name}" if section else name
            if dotted in left_out:
                continue
            default = getattr(section_default, name) if section_default is not None else field.default
            default = defaults.get(dotted, default)
            rows.append((f"--{dotted}", _type_name(field.annotation), str(default), field.description or ""))
        sections.append((f"{section or '(top level)'}: {doc}", rows))
    return sections


def describe_config(config_cls: type[BaseModel], width: int = 120, defaults: Mapping[str, Any] | None = None,
                    with_critic: bool = True) -> str:
    """Every key of a stage config with its type, default and description, grouped by section.

    `defaults` (dotted key -> value) replaces the listed defaults, e.g. with a preset's values;
    `with_critic=False` leaves out the keys only algorithms with a critic read. The four columns
    line up over the whole listing: a long type or default wraps inside its column.
    """
    sections = _config_rows(config_cls, defaults or {}, with_critic)
    rows = [row for _, section_rows in sections for row in section_rows]
    key_width = max(len(row[0]) for row in rows)
    type_width = min(18, max(len(row[1]) for row in rows))
    default_width = min(12, max(len(row[2]) for row in rows))
    text_width = max(30, width - (2 + key_width + 2 + type_width + 2 + default_width + 2))
    lines = ["config keys (in a --config YAML file, or on the command line as --section.key VALUE;",
             "'?' marks a key that may be null):"]
    for heading, section_rows in sections:
        lines += ["", heading]
        for key, type_name, default, description in section_rows:
            columns = ([key], _wrap_type(type_name, type_width),
                       textwrap.wrap(default, default_width) or [""],
                       textwrap.wrap(description, text_width, break_on_hyphens=False) or [""])
            for i in range(max(len(column) for column in columns)):
                cells = [column[i] if i < len(column) else "" for column in columns]
                line = (f"  {cells[0]:<{key_width}}  {cells[1]:<{type_width}}  {cells[2]:<{default_width}}  "
                        f"{cells[3]}")
                lines.append(line.rstrip())
    return "\n".join(lines)


def describe_rl_config(algorithm: str | None, width: int = 120) -> str:
    """The RL keys as `quartet <algorithm> --help` lists them: that algorithm's defaults (its preset
    applied) and, for an algorithm without a critic, the critic's keys left out."""
    from quartet.rl.algorithms import get_algorithm  # the registry says which algorithms train a critic (torch)

    name = algorithm or "ppo"
    preset = RL_PRESETS.get(name, {})
    defaults = {f"{section}.{key}": value for section, keys in preset.items() for key, value in keys.items()}
    with_critic = get_algorithm(name).needs_critic
    notes = [f"Defaults below are {name}'s" + (" (its preset, applied under your values)." if preset else ".")]
    if not with_critic:
        notes.append(f"{name} trains no critic: the critic's keys are left out ({', '.join(critic_only_keys(RLConfig))}; "
                     "see quartet ppo --help).")
    notes = [line for note in notes for line in textwrap.wrap(note, width)]
    return "\n".join(notes) + "\n\n" + describe_config(RLConfig, width, defaults, with_critic)
