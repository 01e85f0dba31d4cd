"""Stage 2, the reward model: a one-output sequence classifier trained on human preferences.

Loss per pair: -log sigmoid(r_chosen - r_rejected - margin) (+ optional centering).
Chosen and rejected are padded together and scored in one forward pass. After training,
the mean and std of the scores over the training responses are stored in the checkpoint's
config (`reward_mean`, `reward_std`) so PPO can normalise rewards with them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from quartet.config import RewardConfig
from quartet.data import (
    collate_preferences,
)
from quartet.models.forward import TokenValueModel, scores_at_last_token, sequence_scores
from quartet.models.loading import check_model_dir, load_scalar_model, save_model
from quartet.models.presets import build_preset_model
from quartet.rl.losses import pairwise_loss
from quartet.runs.distributed import strip_prefix
from quartet.runs.run import Run, seed_everything
from quartet.runs.supervised import LossSum, SupervisedTrainer, move_to
from quartet.stages.common import (
    apply_lora,
    check_context_length,
    check_fsdp_options,
    load_preference_data,
    resolve_tokenizer,
    unwrap_lora,
)


def make_reward_loss(use_margin: bool, center_coef: float):
    """The reward stage's loss function over one concatenated (chosen; rejected) batch."""

    def reward_loss(values_model: torch.nn.Module, batch: dict[str, Any]) -> LossSum:
        """`values_model` maps (input_ids, attention_mask) to per-token values (a TokenValueModel)."""
        values = values_model(batch["input_ids"], batch["attention_mask"])
        scores = scores_at_last_token(values, batch["attention_mask"])  # [2 * pairs]
        n_pairs = scores.shape[0] // 2
        chosen, rejected = scores[:n_pairs], scores[n_pairs:]
        margin = batch.get("margin") if use_margin else None
        loss = pairwise_loss(chosen, rejected, margin=margin, center_coef=center_coef)
        with torch.no_grad():
            sums = {
                "accuracy": float((chosen > rejected).float().sum()),
                "margin": float((chosen - rejected).sum()),
                "reward_mean": float((chosen + rejected).sum() / 2),
                "reward_sq": float((chosen.pow(2) + rejected.pow(2)).sum() / 2),
            }
        return LossSum(loss * n_pairs, n_pairs, sums)

    return reward_loss


def count_pairs(batch: dict[str, Any]) -> int:
    """Pairs in a concatenated (chosen; rejected) batch."""
    return batch["input_ids"].shape[0] // 2


def reward_std_from_moments(metrics: dict[str, float]) -> dict[str, float]:
    """Replace the mean square by the std of the scores (both per pair-averaged response)."""
    metrics = dict(metrics)
    mean_sq = metrics.pop("reward_sq", None)
    if mean_sq is not None:
        metrics["reward_std"] = math.sqrt(max(mean_sq - metrics["reward_mean"] ** 2, 0.0))
    return metrics


def resolve_scalar_model(cfg: RewardConfig, tokenizer) -> PreTrainedModel:
    if cfg.model.path:
        model = load_scalar_model(cfg.model.path, cfg.model.trust_remote_code, cfg.model.allow_pickle,
                                  pad_token_id=tokenizer.pad_token_id)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    else:
        model = build_preset_model(cfg.model.preset, tokenizer, seed=cfg.run.seed, scalar=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


@torch.no_grad()
def score_statistics(model: PreTrainedModel, data: list[dict], collate, batch_size: int,
                     device: torch.device, max_pairs: int = 1024) -> tuple[float, float]:
    """Mean and std of the model's scores over the responses (chosen and rejected) in `data`.

    At most `max_pairs` evenly spaced pairs are scored: enough for two statistics.
    """
    model.eval()
    data = data[:: max(1, len(data) // max_pairs)][:max_pairs]
    scores = []
    for start in range(0, len(data), batch_size):
        batch = move_to(collate(data[start : start + batch_size]), device)
        scores.append(sequence_scores(model, batch["input_ids"], batch["attention_mask"]).float().cpu())
    all_scores = torch.cat(scores)
    return float(all_scores.mean()), float(all_scores.std()) if all_scores.numel() > 1 else 1.0


def run_reward(cfg: RewardConfig, resume: bool = False) -> dict[str, Any]:
    """Train the reward model described by `cfg`; returns the run summary (also in summary.json)."""
    if not cfg.data.train:
        raise ValueError("data.train is required: a preference file with prompt/chosen/rejected")
    seed_everything(cfg.run.seed)
    run = Run(cfg.run.output_dir, cfg, stage="reward", resume=resume)
    if cfg.model.path:
        check_model_dir(cfg.model.path, "model.path", cfg.model.allow_pickle)
    tokenizer = resolve_tokenizer(cfg.model, [p for p in (cfg.data.train, cfg.data.eval) if p])
    train_data, eval_data, skipped, stats = load_preference_data(cfg.data, tokenizer, cfg.run.seed, "reward",
                                                                 run.ranks)

    model = apply_lora(resolve_scalar_model(cfg, tokenizer), cfg.lora, task_type="SEQ_CLS")
    longest = max((len(x[k]) for x in train_data + eval_data for k in ("chosen_ids", "rejected_ids")), default=0)
    check_context_length(model, longest, "chosen/rejected sequences", "data.max_length")
    pad_id = tokenizer.pad_token_id

    def collate(batch):
        return collate_preferences(batch, pad_id)

    def save(directory: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
        save_model(model, tokenizer, directory, state_dict=strip_prefix(state_dict, "model."))

    check_fsdp_options(run.ranks, lora=cfg.lora.enabled)
    run.start()  # inputs are valid: only now is the output directory touched
    trainer = SupervisedTrainer(
        model, train_data, eval_data, collate=collate, module=TokenValueModel(model),
        loss_fn=make_reward_loss(cfg.loss.use_margin, cfg.loss.center_coef), count_units=count_pairs,
        cfg=cfg.train, run=run,
        seed=cfg.run.seed, save_model=save, postfix_keys=("loss", "accuracy"), finalize_metrics=reward_std_from_moments,
    )
    result = trainer.train()
    full_state = strip_prefix(trainer.full_state_dict(), "model.")
    final_model = unwrap_lora(model)
    mean, std = float("nan"), float("nan")  # only the main rank writes them
    if run.ranks.fsdp is not None:  # every rank gathers the weights; the main rank scores with them
        with run.ranks.full_parameters(trainer.prepared):
            if run.ranks.is_main:
                mean, std = score_statistics(final_model, train_data, collate, cfg.train.batch_size, run.device)
    else:
        if full_state is not None:  # DeepSpeed: the main rank scores with the gathered weights
            final_model.load_state_dict(full_state, strict=False)
        if run.ranks.is_main:
            mean, std = score_statistics(final_model, train_data, collate, cfg.train.batch_size, run.device)
    final_model.config.reward_mean = mean
    final_model.config.reward_std = std
    run.save_final(final_model, tokenizer, state_dict=full_state)
    summary = {"stage": "reward", "final_dir": str(run.final_dir), "n_train": len(train_data),
               "n_eval": len(eval_data), "skipped": skipped, "truncation": vars(stats),
               "reward_mean": mean, "reward_std": std, **result}
    run.write_summary(summary)
    run.close()
    acc = summary.get("eval/accuracy")
    run.ranks.print(f"[reward] {run.steps_done(summary['steps'], summary['seconds'])}"
          + (f"; held-out accuracy {summary.get('initial_eval/accuracy', float('nan')):.3f} -> {acc:.3f}" if acc is not None else "")
          + f"; score mean {mean:.3f} std {std:.3f}; model in {run.final_dir}")
    return summary


@torch.no_grad()
def score_texts(model: PreTrainedModel, tokenizer, texts: list[str], batch_size: int = 16,
                max_length: int = 1024) -> list[float]:
    """Reward-model scores of whole texts (prompt + response), EOS appended as in training.

    Texts longer than `max_length` tokens keep their end, where the score is read.
    """
    from quartet.data.collate import pad_sequences

    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token or ""
    scores: list[float] = []
    for start in range(0, len(texts), batch_size):
        chunk = [t if t.endswith(eos) else t + eos for t in texts[start : start + batch_size]]
        ids = [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"][-max_length:]) for t in chunk]
        input_ids = pad_sequences(ids, tokenizer.pad_token_id, side="right").to(device)
        attention = pad_sequences([torch.ones_like(x) for x in ids], 0, side="right").to(device)
        scores.extend(sequence_scores(model, input_ids, attention).tolist())
    return scores


def score_file(model_dir: str | Path, input_path: str | Path, output_path: str | Path, batch_size: int = 16,
               max_length: int = 1024) -> list[float]:
    """Score every prompt/response row of `input_path` with the reward model; write rows + 'score' as JSONL.

    Rows use the SFT conventions (prompt + response/completion, messages, or text).
    """
    import json

    from quartet.data import parse_sft_row, read_rows
    from quartet.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = load_scalar_model(model_dir, pad_token_id=tokenizer.pad_token_id, require_trained_head=True)
    rows = read_rows(input_path)
    texts = []
    for row in rows:
        example = parse_sft_row(row, tokenizer)
        texts.append((example.prompt or "") + example.completion)
    scores = score_texts(model, tokenizer, texts, batch_size, max_length)
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    with open(output_path, "w", encoding="utf-8") as f:
        for row, score in zip(rows, scores):
            f.write(json.dumps({**row.data, "score": score}, ensure_ascii=False) + "\n")
    print(f"[score] {len(scores)} rows scored; mean {sum(scores) / max(len(scores), 1):.4f}; written to {output_path}")
    return scores
