"""Paths of the data and model files the tests read, kept in the repository's assets/ folder.

`assets/hh_rlhf/` holds the HH-RLHF preference sample and `assets/stories260K/` the llama2.c
checkpoint and tokenizer, each with its README (source, checksums, format) and LICENSE.
Set QUARTET_ASSETS to a folder with the same layout to read the files from elsewhere.
"""

import os
from pathlib import Path

ASSETS = Path(os.environ.get("QUARTET_ASSETS") or Path(__file__).resolve().parents[1] / "assets")
HH_SAMPLE = ASSETS / "hh_rlhf" / "hh_rlhf_helpful_sample.jsonl"
STORIES260K = ASSETS / "stories260K"
