"""Progress bars with ETA and the main metrics, for every long loop."""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, initial: int = 0, disable: bool = False, unit: str = "it") -> tqdm:
    """A tqdm bar on stderr; QUARTET_PROGRESS=0 turns bars off (logs stay)."""
    disable = disable or os.environ.get("QUARTET_PROGRESS", "1") == "0"
    return tqdm(total=total, desc=desc, initial=initial, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5, disable=disable, leave=True, unit=unit)


def format_postfix(metrics: dict[str, Any], keys: list[str], labels: dict[str, str] | None = None) -> dict[str, str]:
    """Short strings of the chosen metrics for a bar's postfix, each labelled by the last part of its
    key unless `labels` names it."""
    shown = {}
    for key in keys:
        value = metrics.get(key)
        label = (labels or {}).get(key, key.rsplit("/", 1)[-1])
        if isinstance(value, float):
            shown[label] = f"{value:.4g}"
        elif value is not None:
            shown[label] = str(value)
    return shown
