"""Offline preference optimisation: DPO and its variants (IPO, hinge/SLiC, robust rDPO, RPO's NLL term).

The policy starts from an SFT model and learns from the reward stage's preference data (the same
files, conventions, truncation and bad-row errors) without a reward model. With the frozen
reference pi_ref, each answer's implicit reward is r = beta * (log pi(answer) - log pi_ref(answer)),
where log pi(answer) sums the log-probs of the answer's tokens only (never the prompt's). The
losses are rl/dpo.py's.

- One forward per micro-batch: chosen and rejected answers of n pairs are one padded batch of 2n
  rows (rows [0, n) chosen, [n, 2n) rejected), as for the reward model; `answer_mask` marks the
  answer tokens of each row.
- The reference: a frozen copy of the starting model; with LoRA the policy itself with its
  adapters off (no second copy); or `dpo.reference`. With `dpo.precompute_ref_logprobs` its
  log-probs are computed once before training, stored in the run directory (ref_logps.safetensors,
  reused on --resume) and no reference model stays in memory.
- Every micro-batch returns per-pair loss sums (a LossSum over pairs), so gradient accumulation
  and several processes give the exact mean over the pairs of a step. RPO's NLL term is therefore
  taken per pair (each chosen answer's mean token NLL, the RPO paper's normalisation), not as
  TRL's one token mean over a batch, which does not add up over micro-batches.
- Metrics are TRL's: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies,
  logps/chosen, logps/rejected, loss (nll_loss with RPO), as train/... and, at eval_every, eval/...;
  rewards/accuracies counts a tie (chosen and rejected rewards equal, as at step 0) as half, not as wrong.

Resume, signals, checkpoints, the non-finite guard and multi-process are SupervisedTrainer's and
the run loop's; so is FSDP2 (`run.fsdp`): the policy is sharded as SFT's model is, and with
`run.fsdp_frozen` the frozen reference too (a precomputed reference is never sharded: it is
dropped before training). `final/` is a plain Hugging Face causal LM (LoRA merged).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from quartet.config import DPOConfig, DPOLossConfig
from quartet.data import collate_preference_answers
from quartet.models.forward import causal_lm_logits
from quartet.models.loading import check_model_dir, load_causal_lm, save_model
from quartet.rl.dpo import dpo_loss, preference_metric_sums, sequence_logps
from quartet.rl.logprobs import token_logprobs, token_logprobs_inplace
from quartet.runs.distributed import Ranks
from quartet.runs.precision import autocast_context
from quartet.runs.progress import progress_bar
from quartet.runs.run import Run, seed_everything
from quartet.runs.supervised import LossSum, SupervisedTrainer, move_to
from quartet.stages.common import (
    apply_lora,
    check_context_length,
    check_fsdp_options,
    load_preference_data,
    resolve_causal_lm,
    resolve_tokenizer,
    unwrap_lora,
)
from quartet.stages.reward import count_pairs

REF_LOGPS_FILE = "ref_logps.safetensors"
SAMPLES_FILE = "dpo_samples.jsonl"
N_SAMPLES = 8  # held-out pairs written to dpo_samples.jsonl with their implicit rewards


# ----------------------------------------------------------------------------- log-probs


def answer_token_logps(model: torch.nn.Module, batch: dict[str, Any],
                       inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's log-prob given the tokens before it, and which of them are answer tokens: [2n, T-1] each.

    Position t holds log p(token t+1 | tokens <= t), so the mask is `answer_mask` shifted by one.
    The last position predicts nothing and is left out of the forward pass. `inplace`: no
    gradients needed, the logits' memory is reused (the same numbers).
    """
    ids, attention = batch["input_ids"], batch["attention_mask"]
    logits = causal_lm_logits(model, ids[:, :-1], attention[:, :-1])  # [2n, T-1, vocab]
    targets = ids[:, 1:]  # [2n, T-1]
    logps = token_logprobs_inplace(logits, targets) if inplace else token_logprobs(logits, targets)
    return logps, batch["answer_mask"][:, 1:]


def answer_logps(model: torch.nn.Module, batch: dict[str, Any], average: bool = False) -> torch.Tensor:
    """Log-prob of each row's answer [2n]: the sum over its answer tokens (`average`: their mean)."""
    logps, mask = answer_token_logps(model, batch)
    return sequence_logps(logps, mask, average=average)


def per_answer_mean(sums: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed answer log-probs [2n] divided by each answer's token count, as `sequence_logps(average=True)`."""
    return sums / mask.bool().sum(1).to(sums.dtype).clamp(min=1)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Dropout off for the duration (the reference is a frozen, deterministic model)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class Reference:
    """The frozen reference's summed answer log-probs of a batch [2n] (no gradient).

    Three sources, the first that applies: values precomputed into the batch (`ref_logps`); a
    frozen model (`model`: a copy of the starting model, or dpo.reference); the policy itself
    with its LoRA adapters off (`adapters_of`: the PEFT model that the policy module passed in
    is, or wraps). With neither, every batch must carry precomputed values.
    """

    def __init__(self, model: PreTrainedModel | None = None, adapters_of: torch.nn.Module | None = None):
        self.model, self.adapters_of = model, adapters_of

    @torch.no_grad()
    def sums(self, policy: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        if self.model is not None:
            logps, mask = answer_token_logps(self.model, batch, inplace=True)
        elif self.adapters_of is not None:
            with self.adapters_of.disable_adapter(), eval_mode(policy):
                logps, mask = answer_token_logps(policy, batch, inplace=True)
        else:
            raise RuntimeError("no reference model, and the batch carries no precomputed reference log-probs")
        return sequence_logps(logps, mask)  # [2n]


# ----------------------------------------------------------------------------- the loss


def policy_and_reference_logps(module: torch.nn.Module, batch: dict[str, Any], reference: Reference,
                               average: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(policy [2n], reference [2n]) answer log-probs, summed or (`average`) per-token means, and the
    policy's token log-probs and answer mask [2n, T-1]."""
    ref = reference.sums(module, batch)  # [2n]
    logps, mask = answer_token_logps(module, batch)  # [2n, T-1] each
    policy = sequence_logps(logps, mask, average=average)  # [2n]
    if average:
        ref = per_answer_mean(ref, mask)
    return policy, ref.to(policy.dtype), logps, mask


def length_normalised(settings: DPOLossConfig) -> bool:
    """IPO is defined on per-token mean log-probs (as in TRL); the other losses on sums."""
    return settings.loss_type == "ipo"


def make_dpo_loss(settings: DPOLossConfig, reference: Reference) -> Callable[[torch.nn.Module, dict[str, Any]], LossSum]:
    """The DPO stage's loss over one concatenated (chosen; rejected) batch: per-pair sums."""
    average = length_normalised(settings)

    def dpo_stage_loss(module: torch.nn.Module, batch: dict[str, Any]) -> LossSum:
        policy, ref, logps, mask = policy_and_reference_logps(module, batch, reference, average)
        n = policy.shape[0] // 2
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy[:n], policy[n:], ref[:n], ref[n:], beta=settings.beta, loss_type=settings.loss_type,
            label_smoothing=settings.label_smoothing)  # [n] each
        sums = preference_metric_sums(chosen_rewards, rejected_rewards)
        del sums["count"]  # the trainer divides by the pairs (n_units)
        sums["logps/chosen"] = float(policy[:n].detach().sum())
        sums["logps/rejected"] = float(policy[n:].detach().sum())
        if settings.rpo_alpha:  # RPO, per pair: the mean token NLL of each chosen answer
            nll = -sequence_logps(logps[:n], mask[:n], average=True)  # [n]
            losses = losses + settings.rpo_alpha * nll
            sums["nll_loss"] = float(nll.detach().sum())
        return LossSum(losses.sum(), n, sums)

    return dpo_stage_loss


# ----------------------------------------------------------------------------- the reference


def reference_source(cfg: DPOConfig) -> str:
    """What the reference is, in words (also part of the precomputed log-probs' fingerprint)."""
    if cfg.dpo.reference:
        return cfg.dpo.reference
    start = cfg.model.path or f"preset {cfg.model.preset} (vocab {cfg.model.vocab_size}, seed {cfg.run.seed})"
    return f"{start}, with its LoRA adapters off" if cfg.lora.enabled else f"a frozen copy of {start}"


def build_reference(cfg: DPOConfig, policy: PreTrainedModel) -> Reference:
    """The reference model, before any training: dpo.reference, the policy with adapters off (LoRA), or a copy."""
    if cfg.dpo.reference:
        model = load_causal_lm(cfg.dpo.reference, cfg.model.trust_remote_code, cfg.model.allow_pickle)
        theirs, ours = model.get_input_embeddings().weight.shape[0], policy.get_input_embeddings().weight.shape[0]
        if theirs != ours:
            raise ValueError(f"dpo.reference {cfg.dpo.reference} has {theirs} token embeddings but the model has {ours}; "
                             "the reference must use the model's tokenizer")
    elif cfg.lora.enabled:
        return Reference(adapters_of=policy)
    else:
        model = copy.deepcopy(policy)
    model.requires_grad_(False)
    return Reference(model.eval())


def reference_fingerprint(cfg: DPOConfig, train_data: list[dict], eval_data: list[dict]) -> str:
    """A hash of what the reference log-probs depend on: the reference and every pair's token ids."""
    h = hashlib.sha256(json.dumps({"reference": reference_source(cfg), "bf16": cfg.train.bf16}).encode())
    for split in (train_data, eval_data):
        for x in split:
            h.update(json.dumps([x["chosen_ids"], x["rejected_ids"], x["prompt_len"]]).encode())
        h.update(b"|")
    return h.hexdigest()


def read_reference_logps(path: Path, fingerprint: str) -> dict[str, torch.Tensor]:
    """The stored log-probs of a run, refused when they belong to other data or another reference."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        stored = (f.metadata() or {}).get("fingerprint")
    if stored != fingerprint:
        raise ValueError(f"{path} holds reference log-probs of other data or another reference than this run's "
                         "config; resume with the run's own config, or delete the file to compute them again")
    return load_file(str(path))


def write_reference_logps(path: Path, tensors: dict[str, torch.Tensor], fingerprint: str) -> None:
    """Write the log-probs atomically: a crash leaves the old file or none, never half a file."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"fingerprint": fingerprint})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@torch.no_grad()
def compute_reference_logps(reference: Reference, policy: torch.nn.Module, data: list[dict],
                            collate: Callable[[list], dict[str, Any]], batch_size: int, ranks: Ranks,
                            device: torch.device, bf16: bool, progress: Callable[[int], Any] | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed reference answer log-probs (chosen [n], rejected [n]) of every pair in `data`.

    Each rank scores its share; the shares are summed over the ranks (zeros elsewhere: exact).
    `progress(k)` is called after each batch of k pairs of this rank's share.
    """
    start, end = ranks.share(data)
    values = [0.0] * (2 * len(data))
    for i in range(start, end, batch_size):
        pairs = data[i : min(i + batch_size, end)]
        batch = move_to(collate(pairs), device)
        with autocast_context(device, bf16):
            sums = reference.sums(policy, batch).float().cpu().tolist()  # [2k]
        k = len(pairs)
        values[i : i + k] = sums[:k]
        values[len(data) + i : len(data) + i + k] = sums[k:]
        if progress is not None:
            progress(k)
    values = ranks.sum_floats(values)
    both = torch.tensor(values, dtype=torch.float32)
    return both[: len(data)], both[len(data):]


def precompute_reference_logps(reference: Reference, policy: torch.nn.Module, splits: dict[str, list[dict]],
                               collate: Callable[[list], dict[str, Any]], cfg: DPOConfig, run: Run,
                               path: Path, fingerprint: str) -> dict[str, torch.Tensor]:
    """Reference log-probs of every split's pairs ({split}_chosen, {split}_rejected), written to `path`."""
    policy.to(run.device)
    if reference.model is not None:
        reference.model.to(run.device)
    stored = {}
    shares = [run.ranks.share(data) for data in splits.values()]  # this rank's pairs of each split
    with progress_bar(sum(end - start for start, end in shares), desc="reference log-probs",
                      disable=not run.ranks.is_main) as bar:
        for split, data in splits.items():
            stored[f"{split}_chosen"], stored[f"{split}_rejected"] = compute_reference_logps(
                reference, policy, data, collate, cfg.train.batch_size, run.ranks, run.device, cfg.train.bf16,
                progress=bar.update)
    if run.ranks.is_main:
        write_reference_logps(path, stored, fingerprint)
    run.ranks.barrier()
    run.ranks.print(f"[dpo] reference log-probs of {sum(map(len, splits.values()))} pairs written to {path}")
    return stored


def attach_reference_logps(data: list[dict], chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    """Store each pair's reference log-probs in its dict, where the collate function finds them."""
    for pair, c, r in zip(data, chosen.tolist(), rejected.tolist()):
        pair["ref_chosen_logp"], pair["ref_rejected_logp"] = c, r


# ----------------------------------------------------------------------------- held-out samples


def _decode_answer(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return tokenizer.decode(ids)


@torch.no_grad()
def held_out_samples(module: torch.nn.Module, pairs: list[dict], collate: Callable[[list], dict[str, Any]],
                     reference: Reference, settings: DPOLossConfig, tokenizer: PreTrainedTokenizerBase,
                     device: torch.device, bf16: bool) -> list[dict[str, Any]]:
    """Prompt, chosen, rejected and their implicit rewards under the trained policy, one dict per pair."""
    if not pairs:
        return []
    batch = move_to(collate(pairs), device)
    with eval_mode(module), autocast_context(device, bf16):
        policy, ref, _, _ = policy_and_reference_logps(module, batch, reference, length_normalised(settings))
    n = len(pairs)
    _, chosen, rejected = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], beta=settings.beta,
                                   loss_type=settings.loss_type, label_smoothing=settings.label_smoothing)
    rows = []
    for pair, c, r in zip(pairs, chosen.tolist(), rejected.tolist()):
        p = pair["prompt_len"]
        rows.append({"prompt": tokenizer.decode(pair["chosen_ids"][:p]),
                     "chosen": _decode_answer(tokenizer, pair["chosen_ids"][p:]),
                     "rejected": _decode_answer(tokenizer, pair["rejected_ids"][p:]),
                     "chosen_reward": c, "rejected_reward": r, "margin": c - r})
    return rows


# ----------------------------------------------------------------------------- the stage


def run_dpo(cfg: DPOConfig, resume: bool = False) -> dict[str, Any]:
    """Train the policy described by `cfg` with DPO (or a variant); returns the run summary (also in summary.json)."""
    if not cfg.data.train:
        raise ValueError("data.train is required: a preference file with prompt/chosen/rejected")
    seed_everything(cfg.run.seed)
    run = Run(cfg.run.output_dir, cfg, stage="dpo", resume=resume)
    for role, path in (("model.path", cfg.model.path), ("dpo.reference", cfg.dpo.reference)):
        if path:
            check_model_dir(path, role, cfg.model.allow_pickle)
    tokenizer = resolve_tokenizer(cfg.model, [p for p in (cfg.data.train, cfg.data.eval) if p])
    train_data, eval_data, skipped, stats = load_preference_data(cfg.data, tokenizer, cfg.run.seed, "dpo",
                                                                 run.ranks)

    policy = resolve_causal_lm(cfg.model, tokenizer, cfg.run.seed)
    longest = max((len(x[k]) for x in train_data + eval_data for k in ("chosen_ids", "rejected_ids")), default=0)
    check_context_length(policy, longest, "chosen/rejected sequences", "data.max_length")
    policy = apply_lora(policy, cfg.lora)
    ref_path = run.dir / REF_LOGPS_FILE
    fingerprint = reference_fingerprint(cfg, train_data, eval_data) if cfg.dpo.precompute_ref_logprobs else ""
    stored = None
    if cfg.dpo.precompute_ref_logprobs and resume and ref_path.is_file():
        stored = read_reference_logps(ref_path, fingerprint)  # before the reference would be loaded: it is not
    reference = None if stored is not None else build_reference(cfg, policy)
    pad_id = tokenizer.pad_token_id

    def collate(batch: list[dict]) -> dict[str, Any]:
        return collate_preference_answers(batch, pad_id)

    def save(directory: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
        save_model(policy, tokenizer, directory, state_dict=state_dict)

    check_fsdp_options(run.ranks, lora=cfg.lora.enabled)
    run.start()  # inputs are valid: only now is the output directory touched
    if cfg.dpo.precompute_ref_logprobs:
        if stored is None:
            stored = precompute_reference_logps(reference, policy, {"train": train_data, "eval": eval_data}, collate,
                                                cfg, run, ref_path, fingerprint)
        else:
            run.ranks.print(f"[dpo] reference log-probs read from {ref_path}")
        attach_reference_logps(train_data, stored["train_chosen"], stored["train_rejected"])
        attach_reference_logps(eval_data, stored["eval_chosen"], stored["eval_rejected"])
        reference = Reference()  # every batch carries its reference log-probs: no reference model is kept
    elif reference.model is not None:
        # run.fsdp_frozen: each forward gathers one block of the reference at a time, like the policy's
        run.ranks.shard_frozen(reference.model.to(run.device))
    trainer = SupervisedTrainer(
        policy, train_data, eval_data, collate=collate, loss_fn=make_dpo_loss(cfg.dpo, reference),
        count_units=count_pairs, cfg=cfg.train, run=run, seed=cfg.run.seed, save_model=save,
        postfix_keys=("loss", "accuracies", "margins"),
        frozen=() if reference.model is None else (reference.model,),
    )
    result = trainer.train()
    samples = held_out_samples(trainer.prepared, eval_data[:N_SAMPLES], collate, reference, cfg.dpo, tokenizer,
                               run.device, cfg.train.bf16)
    if run.ranks.is_main and samples:
        with (run.dir / SAMPLES_FILE).open("w", encoding="utf-8") as f:
            for row in samples:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    run.save_final(unwrap_lora(policy), tokenizer, state_dict=trainer.full_state_dict())
    summary = {"stage": "dpo", "final_dir": str(run.final_dir), "n_train": len(train_data), "n_eval": len(eval_data),
               "skipped": skipped, "truncation": vars(stats), "reference": reference_source(cfg),
               "loss_type": cfg.dpo.loss_type, "beta": cfg.dpo.beta, **result}
    run.write_summary(summary)
    run.close()
    run.ranks.print(_summary_line(summary, run.steps_done(summary["steps"], summary["seconds"])))
    return summary



def _summary_line(summary: dict[str, Any], steps_done: str) -> str:
    line = f"[dpo] {steps_done}"
    if "eval/rewards/accuracies" in summary:
        line += (f"; held-out accuracy {summary.get('initial_eval/rewards/accuracies', float('nan')):.3f} -> "
                 f"{summary['eval/rewards/accuracies']:.3f}, margin "
                 f"{summary.get('initial_eval/rewards/margins', float('nan')):.3f} -> {summary['eval/rewards/margins']:.3f}")
    return line + f"; model in {summary['final_dir']}"
