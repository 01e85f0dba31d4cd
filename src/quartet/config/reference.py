"""The configuration reference of the docs site, written from the typed config sections.

Every key of every stage, with the type, default and description that `quartet STAGE --help`
prints (the same rows), as Markdown tables by stage and section, and each RL preset's defaults.
`make docs` writes it to docs/reference/config.md; a test checks the committed page against it, so
the docs and the code cannot disagree.

    python -m quartet.config.reference docs/reference/config.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel

from quartet.config.loading import _config_rows, critic_only_keys
from quartet.config.rl_presets import RL_PRESETS
from quartet.config.sections import DPOConfig, RewardConfig, RLConfig, SFTConfig

# (title, commands, config class): the stages whose keys the reference lists, in pipeline order
STAGES: list[tuple[str, str, type[BaseModel]]] = [
    ("SFT", "quartet sft", SFTConfig),
    ("Reward model", "quartet reward", RewardConfig),
    ("DPO", "quartet dpo", DPOConfig),
    ("Online RL", "quartet ppo | grpo | rloo | reinforce | rl", RLConfig),
]


def _cell(text: str) -> str:
    """A table cell: pipes escaped, so `k1|k2|k3` stays one cell."""
    return text.replace("|", "\\|") if text else " "


def config_rows(config_cls: type[BaseModel]) -> list[tuple[str, list[tuple[str, str, str, str]]]]:
    """A stage's sections as `--help` lists them, every key included: (heading, rows of (key, type,
    default, description))."""
    return _config_rows(config_cls, {}, with_critic=True)


def config_reference() -> str:
    """The whole reference page, Markdown."""
    lines = ["# Configuration reference", "",
             "<!-- Written by `python -m quartet.config.reference docs/reference/config.md` (run by `make docs`)",
             "     from the typed config sections; do not edit by hand. -->", "",
             "Every key of every stage, as `quartet STAGE --help` lists it. Set a key in a `--config` YAML file",
             "(`section:` then `key: value`) or on the command line as `--section.key VALUE`. A type ending in",
             "`?` may be null. The online-RL defaults below are the base values; naming an algorithm applies",
             "its preset on top (see [the presets](#presets)), under your own values.", ""]
    for title, commands, config_cls in STAGES:
        lines += [f"## {title}", "", f"`{commands}`", ""]
        for heading, rows in config_rows(config_cls):
            lines += [f"### {heading}", "", "| key | type | default | description |", "|---|---|---|---|"]
            lines += [f"| `{key}` | `{_cell(type_name)}` | `{_cell(default)}` | {_cell(description)} |"
                      for key, type_name, default, description in rows]
            lines.append("")
    critic_keys = ", ".join(f"`{key}`" for key in critic_only_keys(RLConfig))
    lines += ["## Presets", "",
              "`--algorithm.name NAME` (or `quartet grpo`, `rloo`, `reinforce`) applies the preset of that name;",
              "`--preset NAME` applies one by itself (`deepspeed-chat`, `dr-grpo`, `dapo`). Values you set win.",
              f"Algorithms without a critic ignore the critic's keys ({critic_keys}).", "",
              "| preset | keys it sets |", "|---|---|"]
    for name, preset in RL_PRESETS.items():
        values = ", ".join(f"`{section}.{key}` {value}" for section, keys in preset.items() for key, value in keys.items())
        lines.append(f"| `{name}` | {values} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m quartet.config.reference OUTPUT.md")
    Path(args[0]).parent.mkdir(parents=True, exist_ok=True)
    Path(args[0]).write_text(config_reference(), encoding="utf-8")


if __name__ == "__main__":
    main()
