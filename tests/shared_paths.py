"""Where the workspace's shared/ folder is: beside the repository (QUARTET_SHARED overrides)."""

import os
from pathlib import Path

SHARED = Path(os.environ.get("QUARTET_SHARED", Path(__file__).resolve().parents[2] / "shared"))
HH_SAMPLE = SHARED / "data" / "hh_rlhf_helpful_sample.jsonl"
STORIES260K = SHARED / "models" / "stories260K"
