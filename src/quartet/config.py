"""Typed configs for every stage, loadable from YAML with dotted CLI overrides.

`load_config(SFTConfig, "c.yaml", ["--train.lr", "1e-4"])` reads the file, applies the
overrides, and validates everything up front: an unknown key or a wrong type is a
`ConfigError` that names the key and suggests the closest valid one.
"""

from __future__ import annotations

import copy
import difflib
import textwrap
import warnings
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

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
    trust_remote_code: bool = Field(False, description="Run model code shipped with a checkpoint (only for sources you trust).")
    allow_pickle: bool = Field(False, description="Allow loading non-safetensors (pickle) weights. Only for files you trust.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass (less memory, more time).")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if self.path and self.preset:
            raise ValueError("set either model.path or model.preset, not both")
        return self


class LoraConfig(Section):
    """Low-rank adapters through peft (off by default)."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of the whole model.")
    r: int = Field(8, gt=0, description="Adapter rank.")
    alpha: int = Field(16, gt=0, description="Adapter scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapters' input.")
    target_modules: str | list[str] = Field("all-linear", description="Modules that get adapters (peft's names).")


class DataConfig(Section):
    """Local data files and the over-long policy (prompt kept from its end, then cut at max_length)."""

    train: str | None = Field(None, description="Training file or save_to_disk directory.")
    eval: str | None = Field(None, description="Held-out file; when absent, eval_fraction of train is held out.")
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of train held out when there is no eval file.")
    max_length: int = Field(512, gt=1, description="Prompt + response are cut to this many tokens.")
    max_prompt_length: int = Field(256, gt=0, description="Prompts keep their last this many tokens.")
    completion_field: str | None = Field(None, description="SFT: read the completion from this field (e.g. 'chosen').")
    limit: int | None = Field(None, gt=0, description="Use at most this many training rows.")


class LoopConfig(Section):
    """What the one run loop needs of every stage: logging, checkpoints and the non-finite guard."""

    log_every: int = Field(5, gt=0, description="Log metrics every N steps (always the last).")
    save_every: int | None = Field(None, gt=0, description="Checkpoint every N steps (and on SIGTERM/SIGINT).")
    keep_checkpoints: int = Field(2, gt=0, description="Complete checkpoints kept (the newest).")
    max_nonfinite_steps: int = Field(10, gt=0, description="Stop after this many non-finite steps in a row.")


class TrainConfig(LoopConfig):
    """Optimisation of the supervised stages (SFT, reward)."""

    lr: float = Field(3e-4, gt=0, description="Peak learning rate (warm-up, then cosine to 0).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    batch_size: int = Field(8, gt=0, description="Examples per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of the steps spent warming the learning rate up.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this (null: no clipping).")
    bf16: bool = Field(False, description="bf16 autocast where the hardware supports it.")
    mask_prompt: bool = Field(True, description="SFT: loss on completion tokens only.")
    eval_every: int = Field(50, gt=0, description="Evaluate on the held-out data every N steps (and at the end).")


class RunSection(Section):
    """Where the run writes, its seed, its device and how multi-process runs shard."""

    output_dir: str = Field("runs/sft", description="Run directory (config, metrics, checkpoints, final/).")
    seed: int = Field(0, description="Seed of data order, initialisation and sampling.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto': CUDA when available, else the CPU.")
    fsdp: bool | None = Field(None, description="On several processes, shard the trained models' parameters, gradients "
                                                "and optimizer state over the ranks with FSDP2 (each transformer block "
                                                "its own unit); null: when the launcher asks for FSDP (accelerate launch "
                                                "with an FSDP config). No effect on one process.")
    fsdp_frozen: bool = Field(False, description="With fsdp, shard the frozen reference and reward models too, so no "
                                                 "rank holds a full copy of them (each forward gathers one block at a time).")
    fsdp_reshard_after_forward: bool | None = Field(None, description="With fsdp, free each block's gathered weights "
                                                                      "after its forward and gather them again for the "
                                                                      "backward (less memory, more communication); null: "
                                                                      "the launcher's fsdp_reshard_after_forward, else true.")


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


class DPOLossConfig(Section):
    """The DPO-family objective (quartet.rl.dpo) and the frozen reference it is measured against."""

    beta: float = Field(0.1, gt=0, description="Implicit-reward scale beta in r = beta * (log pi - log pi_ref): smaller "
                                               "lets the policy move further from the reference (ipo: tau; hinge: "
                                               "1 / margin).")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid", description="sigmoid: DPO (Rafailov et al. 2023); ipo: IPO on length-normalised log-probs (Azar "
                               "et al. 2023); hinge: SLiC (Zhao et al. 2023); robust: rDPO for noisy labels "
                               "(Chowdhury et al. 2024). TRL's loss_type names.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="Assumed share of pairs whose labels are flipped: "
                                                                    "conservative DPO (sigmoid) or rDPO (robust); "
                                                                    "not defined for ipo or hinge.")
    rpo_alpha: float | None = Field(None, ge=0, description="Weight of RPO's NLL term on the chosen answer (Pang et al. "
                                                            "2024; TRL's rpo_alpha, e.g. 1.0), here per pair: the mean "
                                                            "token NLL of each chosen answer; null or 0: no NLL term.")
    reference: str | None = Field(None, description="Frozen reference model directory; default the starting model "
                                                    "(a frozen copy of it, or with LoRA the model with adapters off).")
    precompute_ref_logprobs: bool = Field(False, description="Compute the reference log-probs once before training, "
                                                             "store them in the run directory (reused on --resume) "
                                                             "and keep no reference model in memory.")


class DPOConfig(StageConfig):
    """`quartet dpo`: offline preference optimisation (DPO and variants) from an SFT model on chosen/rejected pairs.

    The default learning rate, 5e-6, is for real pretrained SFT models (TRL's DPO examples use 5e-7 to 5e-6 for
    full fine-tuning; LoRA takes about ten times more). A tiny model trained from scratch (the presets, the demo)
    needs far more: 1e-4 to 1e-3.
    """

    run: RunSection = RunSection(output_dir="runs/dpo")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig(lr=5e-6)
    lora: LoraConfig = LoraConfig()
    dpo: DPOLossConfig = DPOLossConfig()

    @model_validator(mode="after")
    def _check(self) -> "DPOConfig":
        if not self.model.path and not self.model.preset:
            raise ValueError("model.path is required: the SFT model directory DPO starts from (e.g. runs/sft/final); "
                             "model.preset builds a fresh model, for tests")
        d = self.dpo
        if d.label_smoothing > 0 and d.loss_type not in ("sigmoid", "robust"):
            raise ValueError(f"dpo.label_smoothing ({d.label_smoothing}) is not defined for dpo.loss_type "
                             f"'{d.loss_type}'; use it with sigmoid or robust, or set dpo.label_smoothing to 0")
        return self


class RLModelsConfig(Section):
    """The models of online RL. Reference defaults to the actor's checkpoint; critic per critic_init."""

    actor: str | None = Field(None, description="SFT model directory: the actor starts here.")
    reference: str | None = Field(None, description="Frozen reference; defaults to `actor` (with LoRA: the actor with adapters off).")
    reward: str | None = Field(None, description="Reward model directory (one-output sequence classifier).")
    reward_fn: str | list[str] | None = Field(
        None, description="Instead of a reward model: 'module:function' (or a list of them) taking (prompts, responses, "
                          "**columns) -> scores, one per response (None for a row a function does not judge).")
    reward_weights: list[float] | None = Field(None, description="Weights of the reward functions (default 1 each).")
    critic: str | None = Field(None, description="Critic initialisation directory; default per critic_init (algorithms with a critic).")
    critic_init: Literal["reward", "actor"] = Field("reward", description="Critic starts from the reward model (DeepSpeed-Chat) or the SFT model.")
    shared_trunk: bool = Field(False, description="The critic is a value head on the actor's own trunk: one trunk forward and "
                                                  "backward per update instead of two (changes the algorithm: the value loss "
                                                  "trains the actor's trunk; see README).")
    trust_remote_code: bool = Field(False, description="Run model code shipped with a checkpoint (only for sources you trust).")
    allow_pickle: bool = Field(False, description="Allow loading non-safetensors (pickle) weights. Only for files you trust.")

    @model_validator(mode="after")
    def _one_reward(self) -> "RLModelsConfig":
        if self.reward and self.reward_fn:
            raise ValueError("set models.reward or models.reward_fn, not both")
        n_fns = len(self.reward_fn) if isinstance(self.reward_fn, list) else int(self.reward_fn is not None)
        if self.reward_weights is not None and len(self.reward_weights) != n_fns:
            raise ValueError(f"models.reward_weights has {len(self.reward_weights)} weights for {n_fns} reward functions")
        return self


class SamplingConfig(Section):
    """How responses are sampled (the temperature applies to the RL log-probs too)."""

    max_new_tokens: int = Field(64, gt=0, description="Most tokens generated per response.")
    min_new_tokens: int = Field(0, ge=0, description="EOS is blocked before this many tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; log-probs are taken at the same temperature.")
    top_k: int = Field(0, ge=0, description="Sample from the k most likely tokens (0 = off).")
    top_p: float = Field(1.0, gt=0, le=1.0, description="Nucleus sampling: the smallest set with this much probability (1.0 = off).")
    greedy: bool = Field(False, description="Argmax decoding instead of sampling (evaluation, not training).")


class RolloutConfig(SamplingConfig):
    """Generation during online RL: the sampling settings, samples per prompt and the backend that samples."""

    n: int = Field(1, gt=0, description="Samples per prompt (the group size of group algorithms; 8 in their presets).")
    backend: Literal["hf"] = Field("hf", description="Rollout backend: 'hf' samples with the actor itself (a KV-cached loop).")
    logprobs_from_generation: bool = Field(
        True, description="Old log-probs from the sampling step (no extra actor forward); the trainer recomputes them "
                          "when off or when the backend's log-probs differ from the trainer's.")


class AlgorithmConfig(Section):
    """The RL algorithm (a registered name, see quartet.rl.algorithms) and its constants."""

    name: str = Field("ppo", description="Registered algorithm: ppo, grpo, rloo, reinforce++, reinforce++-baseline "
                                         "(its preset applies under your values; see README).")
    beta: float = Field(0.1, ge=0, description="KL penalty coefficient (initial value when adaptive); 0 and no "
                                               "adaptive KL: no reference model is loaded.")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description="Per-token KL estimate of the penalty (Schulman's k1, k2, k3).")
    kl_penalty: Literal["reward", "loss"] | None = Field(
        None, description="Where the KL penalty goes: folded into the per-token rewards, or a loss term "
                          "(beta x aggregated KL; verl's kl_loss_coef); default: the algorithm's place.")
    adaptive_kl: bool = Field(False, description="Ziegler et al.'s adaptive KL controller.")
    kl_target: float = Field(6.0, gt=0, description="Adaptive KL: the KL per response the controller steers to.")
    kl_horizon: int = Field(10000, gt=0, description="Adaptive KL: samples over which beta moves by at most 20%.")
    clip_reward_value: float = Field(5.0, gt=0, description="Scores are clipped to +- this before they enter the rewards.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    cliprange: float = Field(0.2, gt=0, description="PPO ratio clip range (the low side when clip_high is set).")
    clip_high: float | None = Field(None, gt=0, description="Upper clip range (DAPO's clip-higher: 0.28); default: cliprange.")
    dual_clip: float | None = Field(None, gt=1, description="Dual clip c (Ye et al. 2020): caps the loss of a token with "
                                                           "a negative advantage at -A * c (typically 3).")
    sequence_ratio: bool = Field(False, description="GSPO: one importance ratio per sequence (the geometric mean of its "
                                                    "tokens' ratios) instead of one per token.")
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] | None = Field(
        None, description="How per-token losses become one: over all tokens of the mini-batch (DAPO), per sequence "
                          "then over sequences (GRPO), or per-sequence sums over max_new_tokens (Dr. GRPO); "
                          "default: the algorithm's.")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="GRPO: divide by the group's std, the batch's std, or not at all (Dr. GRPO).")
    advantage_eps: float = Field(1e-6, gt=0, description="Added to the std a group advantage is divided by.")
    cliprange_value: float = Field(0.2, gt=0, description="Value clip range of the critic's loss.")
    whiten_advantages: bool = Field(True, description="Whiten advantages over the batch's valid tokens.")
    score_normalization: Literal["none", "stored", "running"] = Field(
        "none", description="'stored': the reward model's saved mean/std; 'running': running stats of the scores.")
    missing_eos_penalty: float | None = Field(None, description="Score given to responses that never emit EOS.")
    dynamic_sampling: bool = Field(False, description="DAPO: drop groups whose scores are all equal and sample more "
                                                      "prompts until the batch is full (at most max_sampling_rounds).")
    max_sampling_rounds: int = Field(4, gt=0, description="Dynamic sampling: most sampling rounds per step; a batch still "
                                                          "short after them is filled with the dropped groups.")
    overlong_shaping: bool = Field(False, description="DAPO: a linear score penalty in the last overlong_buffer tokens "
                                                      "before max_new_tokens.")
    overlong_buffer: int | None = Field(None, gt=0, description="Overlong shaping's buffer in tokens; default a fifth of "
                                                                "rollout.max_new_tokens (DAPO: 4096 of 20480).")
    overlong_penalty_factor: float = Field(1.0, ge=0, description="Overlong shaping: the penalty at max_new_tokens.")
    mask_truncated: bool = Field(False, description="Leave responses without EOS (cut at max_new_tokens) out of the "
                                                    "policy loss (DAPO's overlong filtering).")
    vf_coef: float = Field(0.1, gt=0, description="Weight of the value loss with models.shared_trunk "
                                                  "(with separate models each has its own gradients: unused).")

    @model_validator(mode="after")
    def _known(self) -> "AlgorithmConfig":
        from quartet.rl.algorithms import get_algorithm  # torch, only once a config is built

        get_algorithm(self.name)
        return self

    @property
    def spec(self) -> Any:
        """The registered algorithm (quartet.rl.algorithms.Algorithm)."""
        from quartet.rl.algorithms import get_algorithm

        return get_algorithm(self.name)

    @property
    def kl_in_loss(self) -> bool:
        return (self.kl_penalty or self.spec.kl_penalty) == "loss"

    @property
    def aggregation(self) -> str:
        return self.loss_aggregation or self.spec.loss_aggregation

    @property
    def uses_reference(self) -> bool:
        """A KL term needs the reference; with beta 0 (and no adaptive controller) it is not loaded."""
        return self.beta > 0 or self.adaptive_kl


class BatchConfig(Section):
    """How a step's rollouts are cut up: global sizes, over all processes."""

    rollout_batch_size: int = Field(16, gt=0, description="Samples per step (global, over all processes): "
                                                          "rollout_batch_size / rollout.n prompts.")
    mini_batch_size: int = Field(8, gt=0, description="Samples per optimizer step.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per mini-batch.")
    ppo_epochs: int = Field(1, gt=0, description="Passes over each rollout batch.")
    forward_batch_size: int | None = Field(
        None, gt=0, description="Rows per scoring forward (reference, critic, reward model) on each process; "
                                "default: the training micro-batch (mini_batch_size / grad_accum / processes), "
                                "or more rows while one forward's float32 logits stay within 64 MiB.")
    share_prompts: bool | None = Field(
        None, description="Compute each prompt once per group in the reference and training forwards (its keys and "
                          "values reused by the group's samples; the same numbers, less arithmetic). Mini-batches are "
                          "then whole groups. Default: on for group algorithms (rollout.n > 1) without a critic, "
                          "where the model can take it (else a one-line note and per-row forwards).")


class OptimConfig(Section):
    """AdamW for the actor and, when the algorithm has one, the critic (one optimizer, a group each)."""

    actor_lr: float = Field(1e-5, gt=0, description="Learning rate of the actor.")
    critic_lr: float = Field(5e-5, gt=0, description="Learning rate of the critic.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip each model's gradient norm to this (null: no clipping).")


class RLTrainConfig(LoopConfig):
    """The RL run: how many steps, logging, samples, checkpoints, precision."""

    steps: int = Field(100, gt=0, description="RL steps (each: one rollout batch and its updates).")
    log_every: int = Field(1, gt=0, description="Log metrics every N steps (always the last).")
    sample_every: int = Field(10, gt=0, description="Log a table of sample responses every N steps.")
    n_samples: int = Field(4, ge=0, description="Sample responses shown and written to samples.jsonl each time.")
    bf16: bool = Field(False, description="bf16 autocast for generation, scoring and updates (GPUs with bf16; see README).")
    compile: bool = Field(False, description="torch.compile the actor and critic forward of the updates "
                                             "(a one-time compile of about a minute; see README).")
    eval_every: int = Field(10, gt=0, description="With held-out prompts (data.eval or data.eval_fraction): sample "
                                                  "and score them before training, every N steps and at the end.")
    max_generated_tokens: int | None = Field(
        None, gt=0, description="Stop once this many response tokens were generated (a budget counted in tokens, "
                                "as `quartet arena` compares algorithms), or at `steps`, whichever comes first.")


class PromptDataConfig(DataConfig):
    """Online RL's prompt data: shorter prompts by default, leaving room for the response."""

    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Share of the prompts held out for evaluation "
                                                                  "when there is no eval file (default: none).")
    max_prompt_length: int = Field(128, gt=0, description="Prompts keep their last this many tokens.")


class RLConfig(StageConfig):
    """`quartet ppo`: online RL with a registered algorithm (four-model PPO by default).

    `preset: deepspeed-chat` reproduces DeepSpeed-Chat's step 3.
    """

    preset: str | None = Field(None, description="Named defaults put under the file's and the command line's values: "
                                                 "deepspeed-chat, grpo, dr-grpo, dapo, rloo, reinforce++, "
                                                 "reinforce++-baseline (default: the one named like algorithm.name).")
    run: RunSection = RunSection(output_dir="runs/ppo")
    models: RLModelsConfig = RLModelsConfig()
    data: PromptDataConfig = PromptDataConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    rollout: RolloutConfig = RolloutConfig()
    batch: BatchConfig = BatchConfig()
    optim: OptimConfig = OptimConfig()
    train: RLTrainConfig = RLTrainConfig()
    lora: LoraConfig = LoraConfig()

    @model_validator(mode="after")
    def _check(self) -> "RLConfig":
        if not self.models.actor:
            raise ValueError("models.actor is required (the SFT model directory)")
        if not self.models.reward and not self.models.reward_fn:
            raise ValueError("set models.reward (a reward model directory) or models.reward_fn ('module:function')")
        b, m = self.batch, self.models
        if b.rollout_batch_size % b.mini_batch_size:
            raise ValueError(f"batch.rollout_batch_size ({b.rollout_batch_size}) must be a multiple of "
                             f"batch.mini_batch_size ({b.mini_batch_size})")
        if b.mini_batch_size % b.grad_accum:
            raise ValueError(f"batch.mini_batch_size ({b.mini_batch_size}) must be a multiple of "
                             f"batch.grad_accum ({b.grad_accum})")
        if self.rollout.min_new_tokens > self.rollout.max_new_tokens:
            raise ValueError(f"rollout.min_new_tokens ({self.rollout.min_new_tokens}) exceeds "
                             f"rollout.max_new_tokens ({self.rollout.max_new_tokens})")
        if m.shared_trunk and m.critic:
            raise ValueError("models.shared_trunk builds the critic on the actor's trunk: leave models.critic unset")
        if m.shared_trunk and self.lora.enabled:
            raise ValueError("models.shared_trunk does not combine with LoRA (the value loss would have to train "
                             "the frozen trunk): turn one of them off")
        algorithm = self.algorithm.spec
        if self.needs_critic and m.critic_init == "reward" and not m.shared_trunk and not m.reward and not m.critic:
            raise ValueError("models.critic_init is 'reward' but there is no reward model (reward_fn given): "
                             "set models.critic_init=actor or models.critic")
        if not self.needs_critic and (m.critic or m.shared_trunk):
            setting = "models.critic" if m.critic else "models.shared_trunk"
            raise ValueError(f"algorithm {algorithm.name!r} has no critic: leave {setting} unset")
        n = self.rollout.n
        if algorithm.group and n < 2:
            raise ValueError(f"algorithm {algorithm.name!r} compares the samples of a prompt's group: set rollout.n "
                             f"to 2 or more (its preset uses 8), not {n}")
        if b.rollout_batch_size % n:
            raise ValueError(f"batch.rollout_batch_size ({b.rollout_batch_size}) counts samples: it must be a multiple "
                             f"of rollout.n ({n}), the samples per prompt")
        a = self.algorithm
        if a.overlong_shaping and (a.overlong_buffer or 0) > self.rollout.max_new_tokens:
            raise ValueError(f"algorithm.overlong_buffer ({a.overlong_buffer}) exceeds rollout.max_new_tokens "
                             f"({self.rollout.max_new_tokens})")
        return self

    @property
    def needs_critic(self) -> bool:
        from quartet.rl.algorithms import get_algorithm

        return get_algorithm(self.algorithm.name).needs_critic


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


def _deep_merge(base: dict, top: dict) -> dict:
    """`top` over `base`, as a new mapping: no section of either is shared with the result (overrides
    are later written into it)."""
    merged = copy.deepcopy(base)
    for key, value in top.items():
        merged[key] = (_deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict)
                       else copy.deepcopy(value))
    return merged


# Named defaults, each following the paper or framework named beside it (README: "Algorithms").
# Choosing `algorithm.name: X` applies the preset of the same name, if there is one.
_GROUP = {"rollout": {"n": 8}, "batch": {"ppo_epochs": 1}, "models": {"critic_init": "actor"}}
RL_PRESETS: dict[str, dict[str, Any]] = {
    # DeepSpeed-Chat step 3 (applications/DeepSpeed-Chat, ppo_trainer.py defaults)
    "deepspeed-chat": {
        "algorithm": {"name": "ppo", "beta": 0.1, "adaptive_kl": False, "kl_estimator": "k1", "clip_reward_value": 5.0,
                      "gamma": 1.0, "lam": 0.95, "whiten_advantages": False, "cliprange": 0.2, "cliprange_value": 0.2,
                      "score_normalization": "none"},
        "batch": {"ppo_epochs": 1},
        "models": {"critic_init": "reward"},
    },
    # DeepSeekMath (Shao et al. 2024, sec. 4): KL as a loss term with k3 and beta 0.04, group-normalised
    # outcome advantages, per-sequence token means, one update per rollout (their group: 64 samples)
    "grpo": _deep_merge(_GROUP, {"algorithm": {"name": "grpo", "beta": 0.04, "kl_estimator": "k3", "kl_penalty": "loss",
                                               "scale_rewards": "group", "loss_aggregation": "seq-mean-token-mean",
                                               "cliprange": 0.2}}),
    # Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): no std division, per-sequence
    # sums over a constant (max_new_tokens), no KL term
    "dr-grpo": _deep_merge(_GROUP, {"algorithm": {"name": "grpo", "beta": 0.0, "scale_rewards": "none",
                                                  "loss_aggregation": "seq-mean-token-sum-norm", "cliprange": 0.2}}),
    # DAPO (Yu et al. 2025): clip-higher 0.2 / 0.28, token-mean over the mini-batch, dynamic sampling,
    # overlong shaping (a fifth of the length limit), no KL term (their group: 16 samples)
    "dapo": _deep_merge(_GROUP, {"algorithm": {"name": "grpo", "beta": 0.0, "scale_rewards": "group",
                                               "loss_aggregation": "token-mean", "cliprange": 0.2, "clip_high": 0.28,
                                               "dynamic_sampling": True, "overlong_shaping": True}}),
    # RLOO (Ahmadian et al. 2024, "Back to basics"; TRL's RLOOTrainer: beta 0.05, k1 in the reward):
    # whole-sequence REINFORCE with the leave-one-out baseline (token sums over a constant)
    "rloo": _deep_merge(_GROUP, {"algorithm": {"name": "rloo", "beta": 0.05, "kl_estimator": "k1",
                                               "kl_penalty": "reward", "loss_aggregation": "seq-mean-token-sum-norm"}}),
    # REINFORCE++ (Hu 2025; OpenRLHF's --advantage_estimator reinforce, init_kl_coef 0.01): k1 in the
    # reward, gamma 1, returns whitened over the batch; one sample per prompt
    "reinforce++": {"algorithm": {"name": "reinforce++", "beta": 0.01, "kl_estimator": "k1", "kl_penalty": "reward",
                                  "gamma": 1.0, "loss_aggregation": "token-mean"},
                    "batch": {"ppo_epochs": 1}, "models": {"critic_init": "actor"}},
    # REINFORCE++-baseline (Hu 2025; OpenRLHF's reinforce_baseline): the group mean subtracted first
    "reinforce++-baseline": _deep_merge(_GROUP, {"algorithm": {"name": "reinforce++-baseline", "beta": 0.01,
                                                               "kl_estimator": "k1", "kl_penalty": "reward",
                                                               "gamma": 1.0, "loss_aggregation": "token-mean"}}),
}


def apply_rl_preset(data: dict, overrides: dict[str, Any]) -> dict:
    """Put a named preset's values under the file's and the command line's.

    The preset is `preset`, or else the one named like the chosen algorithm (`algorithm.name`).
    """
    name = overrides.get("preset", data.get("preset"))
    if name is None:
        algorithm = overrides.get("algorithm.name", (data.get("algorithm") or {}).get("name"))
        name = algorithm if algorithm in RL_PRESETS else None
    if name is None:
        return data
    if name not in RL_PRESETS:
        raise ConfigError(f"unknown preset '{name}'; choose one of: {', '.join(RL_PRESETS)}")
    return _deep_merge(RL_PRESETS[name], data)


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


def describe_config(config_cls: type[BaseModel], width: int = 120) -> str:
    """Every key of a stage config with its type, default and description, grouped by section."""
    lines = ["config keys (in a --config YAML file, or on the command line as --section.key VALUE;",
             "'?' marks a key that may be null):"]
    fields = config_cls.model_fields
    top = [name for name, field in fields.items()
           if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel))]
    groups = [("", config_cls, None, top)] if top else []
    for name, field in fields.items():
        if name not in top:  # a section: its defaults are the stage's (e.g. run.output_dir per stage)
            groups.append((name, field.annotation, field.default, list(field.annotation.model_fields)))
    for section, section_cls, section_default, names in groups:
        doc = (section_cls.__doc__ or "").strip().splitlines()[0] if section else "settings of the whole stage"
        lines += ["", f"{section or '(top level)'}: {doc}"]
        for name in names:
            field = section_cls.model_fields[name]
            default = getattr(section_default, name) if section_default is not None else field.default
            key = f"--{section}.{name}" if section else f"--{name}"
            head = f"  {key:<34} {_type_name(field.annotation):<14} {default!s:<10} "
            indent = " " * 63
            text = textwrap.wrap(field.description or "", width=max(40, width - max(len(head), len(indent))))
            lines.append(head + (text[0] if text else ""))
            lines.extend(indent + more for more in text[1:])
    return "\n".join(lines)
