"""Data layer: local files -> validated examples -> tokenized ids -> padded batches."""

from quartet.data.collate import (
    collate_preference_answers,
    collate_preferences,
    collate_prompts,
    collate_sft,
    pad_sequences,
)
from quartet.data.errors import DataError
from quartet.data.formats import (
    PreferenceExample,
    PromptExample,
    SFTExample,
    load_preference_examples,
    load_prompts,
    load_sft_examples,
    parse_preference_row,
    parse_prompt_row,
    parse_sft_row,
    preference_to_sft,
)
from quartet.data.readers import Row, read_rows
from quartet.data.tokenize import (
    IGNORE_INDEX,
    TruncationStats,
    tokenize_preferences,
    tokenize_prompt_examples,
    tokenize_prompts,
    tokenize_sft,
)

__all__ = [
    "DataError",
    "IGNORE_INDEX",
    "PreferenceExample",
    "PromptExample",
    "Row",
    "SFTExample",
    "TruncationStats",
    "collate_preference_answers",
    "collate_preferences",
    "collate_prompts",
    "collate_sft",
    "load_preference_examples",
    "load_prompts",
    "load_sft_examples",
    "pad_sequences",
    "parse_preference_row",
    "parse_prompt_row",
    "parse_sft_row",
    "preference_to_sft",
    "read_rows",
    "tokenize_preferences",
    "tokenize_prompt_examples",
    "tokenize_prompts",
    "tokenize_sft",
]
