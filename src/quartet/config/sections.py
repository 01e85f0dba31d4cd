"""The typed sections of every stage's config, with the checks that need more than one key.

Every section forbids unknown keys and validates assignments; the stage configs (`SFTConfig`,
`RewardConfig`, `DPOConfig`, `RLConfig`) are what `quartet.config.load_config` builds.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

# Marks a key that only algorithms with a critic read (those whose advantage estimator needs values,
# quartet.rl.algorithms); the --help of the others leaves it out.
CRITIC_ONLY = {"critic_only": True}


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
    split_digits: bool = Field(True, description="The tokenizer trained for a preset gives every digit a token of its "
                                                 "own (as Llama 3 and Qwen do), so numbers read digit by digit; false: "
                                                 "BPE may merge digits into multi-digit tokens.")
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


class FreshModelStageConfig(StageConfig):
    """A stage that may start from no model at all: without a path or a preset it builds the `tiny` preset."""

    model: ModelConfig = ModelConfig()

    @model_validator(mode="after")
    def _default_model(self) -> "FreshModelStageConfig":
        if not self.model.path and not self.model.preset:
            self.model.preset = "tiny"
        return self


class SFTConfig(FreshModelStageConfig):
    """`quartet sft`: supervised fine-tuning of the initial actor (and reference)."""

    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    lora: LoraConfig = LoraConfig()


class RewardLossConfig(Section):
    """Pairwise loss -log sigmoid(r_chosen - r_rejected - margin) + center_coef * (r_chosen + r_rejected)^2."""

    use_margin: bool = Field(True, description="Use the data's optional per-pair 'margin' field.")
    center_coef: float = Field(0.0, ge=0.0, description="Reward centering: keeps scores near zero (e.g. 0.01).")


class RewardConfig(FreshModelStageConfig):
    """`quartet reward`: a one-output sequence classifier trained on chosen/rejected pairs."""

    run: RunSection = RunSection(output_dir="runs/reward")
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig(lr=1e-4)
    loss: RewardLossConfig = RewardLossConfig()
    lora: LoraConfig = LoraConfig()


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
    reward_url: str | list[str] | None = Field(
        None, description="Instead of a reward model: the URL of a reward server (`quartet serve reward`, or any server "
                          "of OpenRLHF's POST /get_reward contract), e.g. http://127.0.0.1:8000; several, comma-separated "
                          "or a list: requests are spread over them.")
    reward_token_file: str | None = Field(None, description="File holding the bearer token the reward server asks for.")
    reward_timeout: float = Field(60.0, gt=0, description="Seconds one reward-server request may take before it is retried.")
    reward_retries: int = Field(3, ge=0, description="Retries of a failed reward-server request (waiting 1, 2, 4... seconds, "
                                                     "at most 30); past them the run checkpoints and stops (exit status 3).")
    reward_max_concurrency: int = Field(4, gt=0, description="Reward-server requests in flight at once.")
    reward_request_size: int = Field(32, gt=0, description="Most texts in one reward-server request.")
    critic: str | None = Field(None, description="Critic initialisation directory; default per critic_init (algorithms "
                                                 "with a critic).", json_schema_extra=CRITIC_ONLY)
    critic_init: Literal["reward", "actor"] = Field("reward", description="Critic starts from the reward model "
                                                                          "(DeepSpeed-Chat) or the SFT model; with reward "
                                                                          "functions and no reward model, the SFT model "
                                                                          "unless set.",
                                                    json_schema_extra=CRITIC_ONLY)
    shared_trunk: bool = Field(False, description="The critic is a value head on the actor's own trunk: one trunk forward and "
                                                  "backward per update instead of two (changes the algorithm: the value loss "
                                                  "trains the actor's trunk; see docs/stages/ppo.md).",
                                 json_schema_extra=CRITIC_ONLY)
    trust_remote_code: bool = Field(False, description="Run model code shipped with a checkpoint (only for sources you trust).")
    allow_pickle: bool = Field(False, description="Allow loading non-safetensors (pickle) weights. Only for files you trust.")
    # set by RLConfig's check when critic_init was left at 'reward' with no reward model, so the run can say so
    _critic_init_defaulted: bool = PrivateAttr(False)

    @property
    def reward_urls(self) -> list[str]:
        """The reward servers' URLs, from a list or a comma-separated string."""
        urls = self.reward_url if isinstance(self.reward_url, list) else (self.reward_url or "").split(",")
        return [u.strip() for u in urls if u.strip()]

    @property
    def critic_init_defaulted(self) -> bool:
        """Whether the critic starts from the actor because critic_init was left unset with no reward model."""
        return self._critic_init_defaulted

    @model_validator(mode="after")
    def _one_reward(self) -> "RLModelsConfig":
        given = [name for name in ("reward", "reward_fn", "reward_url") if getattr(self, name)]
        if len(given) > 1:
            raise ValueError(f"set one of models.reward, models.reward_fn and models.reward_url, not {' and '.join(given)}")
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
    compile: bool = Field(False, description="Decode steps compiled over a static KV cache (torch.compile; "
                                             "GPT-2 and Llama-shaped actors): a compilation of 30-90 s per shape, "
                                             "then up to 1.5x faster sampling on deep, wide models. See "
                                             "docs/performance.md.")
    logprobs_from_generation: bool = Field(
        True, description="Old log-probs from the sampling step (no extra actor forward); the trainer recomputes them "
                          "when off or when the backend's log-probs differ from the trainer's.")
    env: str | None = Field(None, description="Multi-turn episodes with an environment, 'package.module:Class' (one "
                                              "instance per episode: reset(**columns), step(action)).")
    tools: list[str] | None = Field(None, description="Tools, 'package.module:function' (comma-separated): the model "
                                                      "calls them as <tool_call>{...}</tool_call> until a turn without a "
                                                      "call, its answer.")
    max_turns: int = Field(4, gt=0, description="Episodes: most model turns, each at most max_new_tokens.")
    max_observation_tokens: int = Field(256, gt=0, description="Episodes: longer observation messages are cut to this "
                                                               "many tokens (and say so).")
    max_episode_tokens: int | None = Field(None, gt=0, description="Episodes: most tokens after the prompt (the "
                                                                   "model's and the observations'); default none.")
    tool_timeout: float = Field(30.0, gt=0, description="Seconds a tool call may take; a slower one is answered with a "
                                                        "timeout message and counted.")
    max_concurrent_tools: int = Field(16, gt=0, description="Most tool calls running at once.")
    env_timeout: float = Field(60.0, gt=0, description="Seconds an environment's reset or step may take (a tool "
                                                       "environment's step includes its calls); past it the run stops "
                                                       "with the environment and row named.")
    max_staleness: int | None = Field(
        None, ge=0, description="Asynchronous RL: a producer process samples and scores step t's batch with the "
                                "policy of step t-k while the trainer updates (k = this; 0 = take turns; default "
                                "none: synchronous, in one process). See docs/async.md.")
    producer_timeout: float = Field(600.0, gt=0, description="Asynchronous RL: seconds the trainer waits for a batch; "
                                                             "a producer that takes longer, or dies, is restarted "
                                                             "and its batch made again.")
    producer_restarts: int = Field(2, ge=0, description="Asynchronous RL: restarts of the producer for one batch "
                                                        "before the run stops (with a checkpoint to resume from).")
    producer_threads: int | None = Field(None, gt=0, description="Asynchronous RL: the producer's torch threads; the "
                                                                 "trainer keeps the rest (default: half each when "
                                                                 "k > 0, all for both when k = 0, as they take turns).")

    @field_validator("tools", mode="before")
    @classmethod
    def _split_tools(cls, value: Any) -> Any:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_environment(self) -> "RolloutConfig":
        if self.env and self.tools:
            raise ValueError("rollout.env and rollout.tools both set: give the tools to your environment, or use the "
                             "built-in tool environment (rollout.tools) alone")
        return self

    @property
    def episodes(self) -> bool:
        """Multi-turn episodes (an environment or tools) instead of one answer per prompt."""
        return bool(self.env or self.tools)

    @property
    def generation_limit(self) -> int:
        """The most tokens the policy can choose per sample: per answer, or per episode."""
        if not self.episodes:
            return self.max_new_tokens
        return min(self.max_episode_tokens or self.max_turns * self.max_new_tokens, self.max_turns * self.max_new_tokens)


GSPO_AGGREGATION = "seq-mean-token-mean"  # GSPO (Zheng et al. 2025) averages its sequence objective over sequences


class AlgorithmConfig(Section):
    """The RL algorithm (a registered name, see quartet.rl.algorithms) and its constants."""

    name: str = Field("ppo", description="Registered algorithm: ppo, grpo, rloo, reinforce++, reinforce++-baseline "
                                         "(its preset applies under your values; see docs/concepts.md).")
    beta: float = Field(0.1, ge=0, description="KL penalty coefficient (initial value when adaptive); 0 and no "
                                               "adaptive KL: no reference model is loaded.")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description="Per-token KL estimate of the penalty (Schulman's k1, k2, k3).")
    kl_penalty: Literal["reward", "loss"] | None = Field(
        None, description="Where the KL penalty goes: folded into the per-token rewards, or a loss term "
                          "(beta x aggregated KL; verl's kl_loss_coef); default: the algorithm's place.")
    adaptive_kl: bool = Field(False, description="Ziegler et al.'s adaptive KL controller.")
    kl_target: float = Field(6.0, gt=0, description="Adaptive KL: the KL per response the controller steers to.")
    kl_horizon: int = Field(10000, gt=0, description="Adaptive KL: samples over which beta moves by at most 20%.")
    clip_reward_value: float | None = Field(
        5.0, gt=0, description="Scores are clipped to +- this (null: not clipped) before the rewards and advantages "
                               "read them; one clipped score serves every estimator. Default 5 (PPO, DeepSpeed-Chat); "
                               "the group presets do not clip, REINFORCE++'s clip at 10 (OpenRLHF).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.", json_schema_extra=CRITIC_ONLY)
    cliprange: float = Field(0.2, gt=0, description="PPO ratio clip range (the low side when clip_high is set).")
    clip_high: float | None = Field(None, gt=0, description="Upper clip range (DAPO's clip-higher: 0.28); default: cliprange.")
    dual_clip: float | None = Field(None, gt=1, description="Dual clip c (Ye et al. 2020): caps the loss of a token with "
                                                           "a negative advantage at -A * c (typically 3).")
    sequence_ratio: bool = Field(False, description="GSPO: one importance ratio per sequence (the geometric mean of its "
                                                    "tokens' ratios) instead of one per token; averages over sequences "
                                                    "(loss_aggregation seq-mean-token-mean, chosen when unset).")
    offpolicy_correction: Literal["none", "decoupled", "tis"] = Field(
        "none", description="Weight each token's policy-gradient term by pi_old / pi_sampler, the trainer's "
                            "recomputed old log-prob over the sampler's: 'decoupled' as is (AReaL), 'tis' capped at "
                            "tis_cap (truncated importance sampling); the old log-probs are then recomputed.")
    tis_cap: float = Field(2.0, gt=1, description="offpolicy_correction 'tis': the cap on the importance weight "
                                                  "(verl's 2).")
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] | None = Field(
        None, description="How per-token losses become one: over all tokens of the mini-batch (DAPO), per sequence "
                          "then over sequences (GRPO), or per-sequence sums over max_new_tokens (Dr. GRPO); "
                          "default: the algorithm's.")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="GRPO: divide by the group's std, the batch's std, or not at all (Dr. GRPO).")
    advantage_eps: float = Field(1e-6, gt=0, description="Added to the std a group advantage is divided by "
                                                        "(verl's 1e-6; TRL uses 1e-4).")
    cliprange_value: float = Field(0.2, gt=0, description="Value clip range of the critic's loss.",
                                   json_schema_extra=CRITIC_ONLY)
    whiten_advantages: bool = Field(True, description="Whiten the critic's (GAE) advantages over the batch's valid tokens.",
                                    json_schema_extra=CRITIC_ONLY)
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
    turn_rewards: bool = Field(False, description="Episodes: each environment step's reward at the last token of "
                                                  "the turn that earned it (per-turn credit), instead of summed into "
                                                  "the episode's score.")
    mask_truncated: bool = Field(False, description="Leave responses without EOS (cut at max_new_tokens) out of the "
                                                    "policy loss (DAPO's overlong filtering).")
    vf_coef: float = Field(0.1, gt=0, description="Weight of the value loss with models.shared_trunk "
                                                  "(with separate models each has its own gradients: unused).",
                           json_schema_extra=CRITIC_ONLY)

    @model_validator(mode="after")
    def _known(self) -> "AlgorithmConfig":
        from quartet.rl.algorithms import get_algorithm  # torch, only once a config is built

        get_algorithm(self.name)
        if self.sequence_ratio and self.loss_aggregation not in (None, GSPO_AGGREGATION):
            # GSPO's objective is a mean over sequences; a token mean would weigh each sequence by its length
            raise ValueError(f"algorithm.sequence_ratio (GSPO) averages over sequences: set algorithm.loss_aggregation "
                             f"to {GSPO_AGGREGATION}, not {self.loss_aggregation}")
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
        """The loss aggregation in force: the one set, else GSPO's with a sequence ratio, else the algorithm's."""
        if self.loss_aggregation:
            return self.loss_aggregation
        return GSPO_AGGREGATION if self.sequence_ratio else self.spec.loss_aggregation

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
    critic_lr: float = Field(5e-5, gt=0, description="Learning rate of the critic.", json_schema_extra=CRITIC_ONLY)
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip each model's gradient norm to this (null: no clipping).")


class RLTrainConfig(LoopConfig):
    """The RL run: how many steps, logging, samples, checkpoints, precision."""

    steps: int = Field(100, gt=0, description="RL steps (each: one rollout batch and its updates).")
    log_every: int = Field(1, gt=0, description="Log metrics every N steps (always the last).")
    sample_every: int = Field(10, gt=0, description="Log a table of sample responses every N steps.")
    n_samples: int = Field(4, ge=0, description="Sample responses shown and written to samples.jsonl each time.")
    bf16: bool = Field(False, description="bf16 autocast for generation, scoring and updates "
                                          "(GPUs with bf16; see docs/stages/ppo.md).")
    compile: bool = Field(False, description="torch.compile the actor and critic forward of the updates "
                                             "(a one-time compile of about a minute; see docs/stages/ppo.md).")
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
    # a factory: building the default checks the name against the algorithm registry, which needs torch
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = RolloutConfig()
    batch: BatchConfig = BatchConfig()
    optim: OptimConfig = OptimConfig()
    train: RLTrainConfig = RLTrainConfig()
    lora: LoraConfig = LoraConfig()

    @model_validator(mode="after")
    def _check(self) -> "RLConfig":
        if not self.models.actor:
            raise ValueError("models.actor is required (the SFT model directory)")
        if not self.models.reward and not self.models.reward_fn and not self.models.reward_url and not self.rollout.env:
            raise ValueError("set models.reward (a reward model directory), models.reward_fn ('module:function') or "
                             "models.reward_url (a reward server)"
                             + (" to score the answers after the tool calls" if self.rollout.tools else ""))
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
            if "critic_init" in m.model_fields_set:  # asked for outright (or by a preset): say so
                raise ValueError("models.critic_init is 'reward' but there is no reward model (reward_fn or reward_url "
                                 "given): "
                                 "set models.critic_init=actor or models.critic")
            m.critic_init = "actor"  # reward functions, no reward model: nothing else to start the critic from
            m._critic_init_defaulted = True
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
