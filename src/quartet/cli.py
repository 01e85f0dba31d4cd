"""The `quartet` command: one thin subcommand per stage (parse, build config, call the stage).

Nothing heavy is imported up front: `--help` and a config's errors come before torch and
transformers load (a stage's module is imported once its config is built).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from functools import partial

from quartet import __version__

STAGE_HELP = "any config key as a dotted override, e.g. --train.lr 1e-4 (see the configs/ examples)"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog may be a function, called only when that command's help is shown
    (listing a config's keys imports the configs, and the RL listings the algorithm registry)."""

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


def _config_epilog(config_name: str) -> str:
    from quartet import config

    return config.describe_config(getattr(config, config_name))


def _add_stage(sub, name: str, help_text: str, config_name: str | None = None) -> argparse.ArgumentParser:
    """A stage's subcommand; its --help lists every key of the stage's config (`config_name` in quartet.config)."""
    epilog = STAGE_HELP if config_name is None else partial(_config_epilog, config_name)
    parser = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--output", help="run directory (same as --run.output_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint; "
                                                              "without --config, with the config the run wrote there")
    return parser


def _stage_config(config_cls, args, overrides: list[str]):
    from quartet.config import load_run_config

    if args.output:
        overrides = [*overrides, "--run.output_dir", args.output]
    return load_run_config(config_cls, args.config, overrides, resume=args.resume)  # --resume: the run's own config


def _cmd_sft(args, overrides: list[str]) -> None:
    from quartet.config import SFTConfig

    config = _stage_config(SFTConfig, args, overrides)
    from quartet.stages.sft import run_sft

    run_sft(config, resume=args.resume)


def _cmd_reward(args, overrides: list[str]) -> None:
    from quartet.config import RewardConfig

    config = _stage_config(RewardConfig, args, overrides)
    from quartet.stages.reward import run_reward

    run_reward(config, resume=args.resume)


def _cmd_dpo(args, overrides: list[str]) -> None:
    from quartet.config import DPOConfig

    config = _stage_config(DPOConfig, args, overrides)
    from quartet.stages.dpo import run_dpo

    run_dpo(config, resume=args.resume)


# online-RL subcommands: the algorithm each one runs (`quartet rl` takes --algorithm.name, default ppo)
RL_COMMANDS = {
    "ppo": ("ppo", "stage 3: PPO with actor, critic, reward model and reference"),
    "grpo": ("grpo", "online RL with GRPO (group baselines, no critic; --preset dr-grpo or dapo for their fixes)"),
    "rloo": ("rloo", "online RL with RLOO (leave-one-out group baseline, no critic)"),
    "reinforce": ("reinforce++", "online RL with REINFORCE++ (whitened returns, no critic; "
                                 "--algorithm.name reinforce++-baseline for the group baseline)"),
    "rl": (None, "online RL with any registered algorithm (--algorithm.name; default ppo)"),
}


def _cmd_rl(algorithm: str | None, args, overrides: list[str]) -> None:
    from quartet.config import RLConfig

    named = any(o == "--algorithm.name" or o.startswith(("--algorithm.name=", "--preset")) for o in overrides)
    if algorithm is not None and not named:  # the command's algorithm, unless named on the command line
        overrides = ["--algorithm.name", algorithm, *overrides]
    config = _stage_config(RLConfig, args, overrides)
    from quartet.stages.rl import run_rl

    run_rl(config, resume=args.resume)


def _rl_epilog(algorithm: str | None) -> str:
    from quartet.config import describe_rl_config

    text = describe_rl_config(algorithm)
    if algorithm is None:
        text = "With --algorithm.name X the defaults are X's (quartet grpo|rloo|reinforce --help lists them).\n" + text
    return text


def _cmd_pipeline(args, overrides: list[str]) -> None:
    from quartet.stages.pipeline import run_pipeline

    if not args.config:
        raise ValueError("quartet pipeline needs --config FILE with sft:, reward: and ppo: sections (or sft: and dpo:)")
    if args.output:
        overrides = [*overrides, "--output_dir", args.output]
    run_pipeline(args.config, overrides, resume=args.resume)


def _cmd_score(args, overrides: list[str]) -> None:
    from quartet.stages.reward import score_file

    if overrides:
        raise ValueError(f"unexpected arguments: {' '.join(overrides)}")
    score_file(args.model, args.input, args.output, batch_size=args.batch_size, max_length=args.max_length)


def _cmd_demo(args, overrides: list[str]) -> None:
    from quartet.demo.run import run_demo

    if overrides:
        raise ValueError(f"unexpected arguments: {' '.join(overrides)}")
    overrides = {k: v for k, v in (("beta", args.beta), ("ppo_steps", args.ppo_steps)) if v is not None}
    run_demo(args.output, quick=args.quick, seed=args.seed, overrides=overrides, resume=args.resume)


def _cmd_arena(args, overrides: list[str]) -> None:
    from quartet.arena.runner import run_arena

    if overrides:
        raise ValueError(f"unexpected arguments: {' '.join(overrides)}")
    worlds = [w.strip() for w in args.world.split(",") if w.strip()]
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    run_arena(args.output, worlds, algorithms, seeds=args.seeds, quick=args.quick, resume=args.resume,
              jobs=args.jobs, threads=args.threads)


def _cmd_report(args, overrides: list[str]) -> None:
    from quartet.report import render_report

    if overrides:
        raise ValueError(f"unexpected arguments: {' '.join(overrides)}")
    print(f"report: {render_report(args.run_dir, args.output)}")


def _cmd_convert(args, overrides: list[str]) -> None:
    from quartet.models.llama2c import convert_llama2c

    if overrides:
        raise ValueError(f"unexpected arguments: {' '.join(overrides)}")
    print(f"converted: {convert_llama2c(args.checkpoint, args.tokenizer, args.output)}")


def _cmd_serve(args, overrides: list[str]) -> None:
    if overrides:
        raise ValueError(f"unexpected arguments: {' '.join(overrides)}")
    from quartet.serve.reward_server import ServerLimits, serve_reward

    if args.batch_size < 1 or args.max_texts < 1:
        raise ValueError("--batch-size and --max-texts must be at least 1")
    serve_reward(args.model, host=args.host, port=args.port, batch_size=args.batch_size, token_file=args.token_file,
                 max_length=args.max_length, limits=ServerLimits(max_texts=args.max_texts),
                 trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable]]:
    parser = _Parser(prog="quartet", description="RLHF with four models: SFT -> reward model -> PPO.")
    parser.add_argument("--version", action="version", version=f"quartet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    handlers: dict[str, Callable] = {}
    _add_stage(sub, "sft", "stage 1: supervised fine-tuning (actor and reference)", "SFTConfig")
    handlers["sft"] = _cmd_sft
    _add_stage(sub, "reward", "stage 2: reward model on chosen/rejected pairs", "RewardConfig")
    handlers["reward"] = _cmd_reward
    _add_stage(sub, "dpo", "offline preference optimisation (DPO, IPO, hinge, robust; RPO's NLL term) from an SFT "
                           "model on chosen/rejected pairs, no reward model", "DPOConfig")
    handlers["dpo"] = _cmd_dpo
    for command, (algorithm, help_text) in RL_COMMANDS.items():
        rl_parser = _add_stage(sub, command, help_text)
        rl_parser.epilog = partial(_rl_epilog, algorithm)
        handlers[command] = partial(_cmd_rl, algorithm)
    pipeline = _add_stage(sub, "pipeline", "the stages in order from one config file: SFT -> reward model -> PPO, "
                                           "or SFT -> DPO")
    pipeline.epilog = ("the file has sections sft:, reward: and ppo: (or sft: and dpo:), each a stage config (see "
                       "quartet sft|reward|ppo|dpo --help), plus output_dir and seed; each stage starts from the "
                       "previous one's final/; override a stage's key as --ppo.train.steps 10")
    handlers["pipeline"] = _cmd_pipeline
    score = sub.add_parser("score", help="score prompt/response pairs with a reward model",
                           description="Score a JSONL/JSON/CSV/Parquet file of prompt + response (or completion) "
                                       "rows with a reward model; writes the rows with a 'score' field as JSONL.")
    score.add_argument("--model", required=True, help="reward model directory")
    score.add_argument("--input", required=True, help="file of rows with prompt and response/completion")
    score.add_argument("--output", required=True, help="JSONL file to write")
    score.add_argument("--batch-size", type=int, default=16)
    score.add_argument("--max-length", type=int, default=1024)
    handlers["score"] = _cmd_score
    serve = sub.add_parser("serve", help="serve a model over HTTP (a reward model for remote rewards)")
    serve_sub = serve.add_subparsers(dest="served", metavar="WHAT", required=True)
    served = serve_sub.add_parser(
        "reward", help="a reward model behind POST /get_reward (OpenRLHF's contract) and GET /health",
        description="Score texts with a reward-model directory over HTTP: POST /get_reward with "
                    '{"query": [prompt + response, ...]} answers {"rewards": [...], "scores": [...]}. '
                    "Concurrent requests are scored together in batches. Online RL reads it with "
                    "--models.reward_url http://HOST:PORT (see docs/rewards.md).")
    served.add_argument("--model", required=True, help="reward model directory (e.g. runs/rm/final)")
    served.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    served.add_argument("--port", type=int, default=8000)
    served.add_argument("--batch-size", type=int, default=32, help="most texts scored in one forward (default 32)")
    served.add_argument("--token-file", help="file holding a bearer token every request must send "
                                             "('Authorization: Bearer TOKEN'); others get 401")
    served.add_argument("--max-length", type=int, default=1024, help="tokens kept per text (its end, where the score "
                                                                       "is read; default 1024)")
    served.add_argument("--max-texts", type=int, default=1024, help="most queries in one request (default 1024)")
    served.add_argument("--trust-remote-code", action="store_true", help="run model code shipped with the checkpoint")
    served.add_argument("--allow-pickle", action="store_true", help="allow non-safetensors (pickle) weights")
    handlers["serve"] = _cmd_serve
    demo = sub.add_parser("demo", help="the whole pipeline on a generated restaurant town (no download)",
                          description="SFT -> reward model -> PPO on a small generated world, judged by a hidden "
                                      "gold judge; writes report.html and summary.json.")
    demo.add_argument("--output", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument("--quick", action="store_true", help="a smaller run (about 3 minutes on 2 CPU cores)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of the whole demo: the town, the data and every stage (default 0)")
    demo.add_argument("--resume", action="store_true", help="continue an interrupted demo: finished stages are "
                                                             "kept, the interrupted one resumes from its checkpoint")
    demo.add_argument("--beta", type=float, help="KL coefficient of PPO (default 0.05; try 0.001 to watch the "
                                                 "policy game the reward model)")
    demo.add_argument("--ppo-steps", type=int, help="PPO steps (default 150, quick 50)")
    handlers["demo"] = _cmd_demo
    arena = sub.add_parser("arena", help="every algorithm on the same task and budget, judged by ground truth",
                           description="Train PPO, GRPO, RLOO, REINFORCE++ and DPO from the same SFT model on the same "
                                       "budget of generated tokens, in worlds with ground truth (the restaurant town's "
                                       "hidden gold judge; arithmetic's exact answers; reasoning-gym tasks), and "
                                       "write report.html and summary.json.")
    arena.add_argument("--output", default="runs/arena", help="arena directory (default: runs/arena)")
    arena.add_argument("--world", default="town,arith",
                       help="comma-separated: town, arith, calculator, guess, reasoning_gym:NAME (needs pip install "
                            "'quartet-rlhf[tasks]')")
    arena.add_argument("--algorithms", default="ppo,grpo,rloo,reinforce++,dpo",
                       help="comma-separated: ppo, grpo, rloo, reinforce++, reinforce++-baseline, dpo")
    arena.add_argument("--seeds", type=int, default=1, help="runs per algorithm, with seeds 0..N-1")
    arena.add_argument("--quick", action="store_true",
                       help="smaller worlds and budgets: a first look (about 2.5 minutes on 2 idle cores)")
    arena.add_argument("--resume", action="store_true", help="keep finished runs and resume the interrupted ones")
    arena.add_argument("--jobs", type=int, help="runs at a time, each a process (default: CPU count / threads, at most 8)")
    arena.add_argument("--threads", type=int, default=1,
                       help="torch threads per run (default 1: a run's numbers do not depend on --jobs or the machine's "
                            "core count)")
    handlers["arena"] = _cmd_arena
    report = sub.add_parser("report", help="render report.html for an RL run, a DPO run or a demo directory")
    report.add_argument("run_dir")
    report.add_argument("--output", help="HTML path (default: RUN_DIR/report.html)")
    handlers["report"] = _cmd_report
    convert = sub.add_parser("convert", help="convert other model formats to Hugging Face directories")
    convert_sub = convert.add_subparsers(dest="format", metavar="FORMAT", required=True)
    llama2c = convert_sub.add_parser("llama2c", help="a llama2.c checkpoint (.bin) and tokenizer (.bin)")
    llama2c.add_argument("--checkpoint", required=True)
    llama2c.add_argument("--tokenizer", required=True)
    llama2c.add_argument("--output", required=True)
    handlers["convert"] = _cmd_convert
    return parser, handlers


# Mistakes in what the user gave (a one-line error, exit status 2). ConfigError, DataError and
# ModelLoadError are ValueErrors; naming ValueError keeps their modules (torch) unimported here.
USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError)


def main(argv: list[str] | None = None) -> int:
    parser, handlers = build_parser()
    args, rest = parser.parse_known_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    if rest and not rest[0].startswith("--"):
        parser.error(f"unexpected argument '{rest[0]}'")
    from quartet.runs.faults import NumericalFault, StepAbandoned, TrainingInterrupted, say  # no torch here

    try:
        handlers[args.command](args, rest)
    except TrainingInterrupted as stop:
        say(str(stop))  # its checkpoint is written: a terminal that is gone must not turn this into a crash
        return 128 + stop.signum
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except NumericalFault as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except StepAbandoned as err:  # e.g. a reward server down past its retries (exit status 3)
        say(f"error: {err}")
        return err.exit_status
    except USER_ERRORS as err:
        if os.environ.get("QUARTET_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Under torchrun / accelerate launch: shut the process group down cleanly on the way out."""
    if "torch.distributed" not in sys.modules:  # no stage ran that far: nothing to shut down
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
