"""Stage 1, supervised fine-tuning: produces the initial actor and the frozen reference.

Cross-entropy on completion tokens (the prompt is masked by default), through the shared
supervised training loop. `final/` is a plain Hugging Face causal LM directory.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from quartet.config import SFTConfig
from quartet.data import collate_sft, load_sft_examples, tokenize_sft
from quartet.models.forward import causal_lm_logits
from quartet.models.loading import check_model_dir, save_model
from quartet.runs.run import Run, seed_everything
from quartet.runs.supervised import LossSum, SupervisedTrainer
from quartet.stages.common import (
    apply_lora,
    check_context_length,
    check_fsdp_options,
    resolve_causal_lm,
    resolve_tokenizer,
    split_held_out,
    unwrap_lora,
)


def sft_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> LossSum:
    """Summed next-token cross-entropy over label tokens (labels -100 are ignored)."""
    logits = causal_lm_logits(model, batch["input_ids"], batch["attention_mask"])  # [batch, seq, vocab]
    shifted_logits = logits[:, :-1].float()
    shifted_labels = batch["labels"][:, 1:]
    loss_sum = F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1),
                               ignore_index=-100, reduction="sum")
    return LossSum(loss_sum, count_label_tokens(batch))


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the SFT loss is summed over: labels after the shift that are not -100."""
    return int((batch["labels"][:, 1:] != -100).sum())


def run_sft(cfg: SFTConfig, resume: bool = False) -> dict[str, Any]:
    """Train the SFT model described by `cfg`; returns the run summary (also in summary.json)."""
    if not cfg.data.train:
        raise ValueError("data.train is required: a local JSONL/JSON/Parquet/CSV file or save_to_disk directory")
    seed_everything(cfg.run.seed)
    run = Run(cfg.run.output_dir, cfg, stage="sft", resume=resume)
    if cfg.model.path:
        check_model_dir(cfg.model.path, "model.path", cfg.model.allow_pickle)
    corpus = [p for p in (cfg.data.train, cfg.data.eval) if p]
    tokenizer = resolve_tokenizer(cfg.model, corpus)
    train_examples = load_sft_examples(cfg.data.train, tokenizer, completion_field=cfg.data.completion_field)
    if cfg.data.limit:
        train_examples = train_examples[: cfg.data.limit]
    if cfg.data.eval:
        eval_examples = load_sft_examples(cfg.data.eval, tokenizer, completion_field=cfg.data.completion_field)
    else:
        train_examples, eval_examples = split_held_out(train_examples, cfg.data.eval_fraction, cfg.run.seed)
    train_data, train_stats = tokenize_sft(train_examples, tokenizer, cfg.data.max_length, cfg.data.max_prompt_length,
                                           mask_prompt=cfg.train.mask_prompt)
    eval_data, _ = tokenize_sft(eval_examples, tokenizer, cfg.data.max_length, cfg.data.max_prompt_length,
                                mask_prompt=cfg.train.mask_prompt)
    run.ranks.print(f"[sft] {len(train_data)} training / {len(eval_data)} held-out examples; {train_stats.summary()}")

    model = apply_lora(resolve_causal_lm(cfg.model, tokenizer, cfg.run.seed), cfg.lora)
    longest = max((len(x["input_ids"]) for x in train_data + eval_data), default=0)
    check_context_length(model, longest, "examples", "data.max_length")
    pad_id = tokenizer.pad_token_id

    def save(directory: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
        save_model(model, tokenizer, directory, state_dict=state_dict)

    check_fsdp_options(run.ranks, lora=cfg.lora.enabled)
    run.start()  # inputs are valid: only now is the output directory touched
    trainer = SupervisedTrainer(
        model, train_data, eval_data, collate=lambda b: collate_sft(b, pad_id), loss_fn=sft_loss,
        count_units=count_label_tokens, cfg=cfg.train, run=run, seed=cfg.run.seed, save_model=save, postfix_keys=("loss", "lr"),
    )
    result = trainer.train()
    run.save_final(unwrap_lora(model), tokenizer, state_dict=trainer.full_state_dict())
    summary = {
        "stage": "sft",
        "final_dir": str(run.final_dir),
        "n_train": len(train_data),
        "n_eval": len(eval_data),
        "truncation": vars(train_stats),
        **result,
    }
    for key in ("initial_eval/loss", "eval/loss"):
        if key in summary:
            summary[key.replace("loss", "perplexity")] = math.exp(min(summary[key], 50.0))
    run.write_summary(summary)
    run.close()
    if run.ranks.is_main:
        _print_summary(summary, run.steps_done(summary["steps"], summary["seconds"]))
    return summary


def _print_summary(summary: dict[str, Any], steps_done: str) -> None:
    before, after = summary.get("initial_eval/loss"), summary.get("eval/loss")
    line = f"[sft] {steps_done}"
    if before is not None and after is not None:
        line += (f"; held-out loss {before:.3f} -> {after:.3f} "
                 f"(perplexity {summary['initial_eval/perplexity']:.1f} -> {summary['eval/perplexity']:.1f})")
    print(line + f"; model in {summary['final_dir']}")
