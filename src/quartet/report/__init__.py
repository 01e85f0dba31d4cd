"""Reports of Quartet runs: a self-contained report.html (inlined PNG plots) for an RL run, a DPO run or a demo directory.

The names below load on first use: training imports `quartet.report.samples`, and importing this
package must not pull matplotlib into every run (about 25 MiB of resident memory a process).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {"render_report": "quartet.report.html", "plot_curves": "quartet.report.plots",
         "write_pngs": "quartet.report.plots"}

__all__ = ["plot_curves", "render_report", "write_pngs"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
