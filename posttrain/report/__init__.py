"""One renderer for every stage: stages return structured results; this formats them.

write_report(pipeline, run_dir) writes report.json (collect.py), report.md (markdown.py),
report.html (page.py: one self-contained file, plots embedded) and plots/*.png (plots.py).
The story (story.py: a sentence per stage) and the card (card.py: headline metrics, groups,
intervals, the best model, differences from SFT within noise) are built from report.json alone,
so every figure the report shows is one report.json holds.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.io import atomic_write_json, atomic_write_text
from posttrain.report.card import card_heading, card_rows
from posttrain.report.collect import collect, lab_verdicts
from posttrain.report.glossary import BENCHMARKS as BENCHMARK_PREFIXES
from posttrain.report.markdown import lab_lines as _lab_lines
from posttrain.report.markdown import render_md
from posttrain.report.page import render_html
from posttrain.report.plots import Plot, stage_plots
from posttrain.report.story import summary

__all__ = ["BENCHMARK_PREFIXES", "Plot", "_lab_lines", "card_heading", "card_rows", "collect",
           "lab_verdicts", "render_html", "render_md", "render_report", "write_report"]  # fmt: skip


def render_report(report: dict, src: Path, out: Path) -> dict:
    """Plots of the run in `src`, then report.json, report.md and report.html, all in `out`."""
    plots = {name: stage_plots(src, out / "plots", name, m, report["evals"])
             for name, m in report["stages"].items()}  # fmt: skip
    report["summary"] = summary(report)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_md(report, plots))
    atomic_write_text(out / "report.html", render_html(report, plots))
    return report


def write_report(pipeline, run_dir: Path, out: Path | None = None) -> dict:
    """The run's report, in the run directory (or in `out`: a copy rendered elsewhere)."""
    out = Path(out) if out is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    return render_report(collect(pipeline, run_dir), run_dir, out)
