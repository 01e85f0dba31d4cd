"""Reports of Quartet runs: a self-contained report.html (inlined PNG plots) for an RL run, a DPO run or a demo directory."""

from quartet.report.html import render_report
from quartet.report.plots import plot_curves, write_pngs

__all__ = ["plot_curves", "render_report", "write_pngs"]
