"""Metrics of a run: one JSON object per logged step in metrics.jsonl, mirrored to TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as text
    return value


class MetricsLogger:
    """Append-only metrics log. `log(step, {...})` writes a line and TensorBoard scalars."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / "metrics.jsonl"
        self._writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        if not self.enabled:
            return record
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, step)
        return record

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (logged after the checkpoint a resumed run starts from)."""
        if self.enabled:
            truncate_jsonl_after(self.path, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file, in order (a torn last line from a crash is ignored)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def truncate_jsonl_after(path: str | Path, step: int) -> None:
    """Keep only the records of a JSONL log whose `step` is at most `step` (atomically rewritten)."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    tmp.replace(path)
