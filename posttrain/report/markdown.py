"""report.md: the same story, card, samples and figures as report.html, in Markdown."""

from __future__ import annotations

from posttrain.eval.intervals import REFERENCE
from posttrain.report.card import (
    Cell,
    card_groups,
    card_heading,
    gold_mark,
    response_marks,
    sample_prompts,
)
from posttrain.report.glossary import HEADLINE, better_arrow, fmt, fmt_ci, no_interval
from posttrain.report.plots import Plot

MARKS = {"within noise": " ≈", "better": " ▲", "worse": " ▼", "differs": " ◆"}
LEGEND = (f"Each value with its 95% bootstrap interval over the prompts. **Bold**: the best model "
          f"of the row. Against {REFERENCE} (paired bootstrap over the same prompts): ≈ within "
          f"noise (the difference's interval holds 0), ▲ better and ▼ worse beyond noise, ◆ "
          "different (a row with no better direction). ↑ higher is better, ↓ lower is better, "
          "· neither.")  # fmt: skip


def seconds(s: float) -> str:
    """4.4 s, 3 min 58 s, 1 h 02 min."""
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def _cell_text(text: str, n: int = 160) -> str:
    text = text.replace("|", "\\|").replace("\n", " ⏎ ")
    return text if len(text) <= n else text[: n - 1] + "…"


def header_rows(report: dict, code=lambda x: f"`{x}`", esc=lambda x: x) -> list[tuple[str, str]]:
    """(label, value) rows of the report's header, code spans through `code` and text through
    `esc` (Markdown by default; report.html passes its own), [] without a header."""
    h = report.get("header")
    if not h:
        return []
    cfg = code(h["config"])
    if h.get("config_sha256"):
        cfg += f" (sha256 {code(h['config_sha256'][:12])})"
    if h.get("resolved_sha256"):
        cfg += f"; resolved {code('pipeline.yaml')} sha256 {code(h['resolved_sha256'][:12])}"
    times = ", ".join(f"{esc(k)} {seconds(v)}" for k, v in h["seconds"].items())
    return [("run", f"{esc(h['run'])} ({code(h['run_dir'])})"), ("config", cfg),
            ("commit", code(h["commit"]) if h.get("commit") else "not a git checkout"),
            ("versions", esc(", ".join(f"{k} {v}" for k, v in h["versions"].items()))),
            ("device", esc(h["device"])), ("date", esc(h["date"])),
            ("wall time", f"{seconds(h['wall_seconds'])} in all: {times}")]  # fmt: skip


def header_lines(report: dict) -> list[str]:
    rows = header_rows(report)
    return md_table(["", ""], [list(r) for r in rows]) + [""] if rows else []


def toc_lines(report: dict) -> list[str]:
    lines = ["## Contents", ""]
    if report.get("summary"):
        lines.append("- [Summary](#summary)")
    if report["evals"]:
        lines.append("- [Report card](#report-card)")
    if any(report.get("samples", {}).values()):
        lines.append("- [Sample responses](#sample-responses)")
    if report.get("lab"):
        lines.append("- [The lab](#the-lab)")
    if report["stages"]:
        lines.append("- Stages: " + " · ".join(f"[{s}](#stage-{s})" for s in report["stages"]))
    return lines + [""]


def summary_lines(report: dict) -> list[str]:
    said = report.get("summary") or {}
    if not said:
        return []
    lines = ['<a id="summary"></a>', "## Summary", ""]
    for stage, text in said.items():
        secs = report["stages"].get(stage, {}).get("seconds")
        when = f" ({seconds(secs)})" if secs is not None else ""
        lines.append(f"- **[{stage}](#stage-{stage})**{when}: {text}")
    return lines + [""]


def cell_md(c: Cell) -> str:
    if c.value is None:
        return ""
    text = fmt(c.value)
    text = f"**{text}**" if c.best else text
    ci = fmt_ci(c.ci)
    return f"{text} {ci}".rstrip() + MARKS.get(c.verdict, "")


def _meaning(r) -> str:
    text = f"{r.spec.meaning} ({r.spec.unit})" if r.spec.unit else r.spec.meaning
    if not any(c.ci for c in r.cells):
        text += f"; no interval: {no_interval(r.key)}"
    return text


def card_lines(report: dict) -> list[str]:
    evals = report["evals"]
    if not evals:
        return []
    lines = ['<a id="report-card"></a>', f"## {card_heading(evals)}", "", LEGEND, ""]
    for group, rows in card_groups(evals):
        if group != HEADLINE:
            lines += [f"### {group}", ""]
        table = [[f"`{r.key}`", *(cell_md(c) for c in r.cells), better_arrow(r.spec.better),
                  _meaning(r)] for r in rows]  # fmt: skip
        lines += md_table(["metric", *evals, "better", "meaning"], table) + [""]
    return lines


def sample_lines(report: dict) -> list[str]:
    prompts = sample_prompts(report.get("samples", {}))
    if not prompts:
        return []
    labels = list(report["samples"])
    lines = ['<a id="sample-responses"></a>', "## Sample responses", "",
             "Every model's answer to the same prompt side by side: ✓ right, ✗ wrong by gold "
             "(else the partial gold score); empty and truncated responses are marked.", ""]  # fmt: skip
    for family in dict.fromkeys(p["family"] for p in prompts):
        rows = []
        for p in (p for p in prompts if p["family"] == family):
            cells = []
            for label in labels:
                r = p["responses"].get(label)
                if r is None:
                    cells.append("")
                    continue
                parts = [gold_mark(r.get("score")), _cell_text(r["response"].strip()),
                         *(f"*({m})*" for m in response_marks(r))]  # fmt: skip
                cells.append(" ".join(x for x in parts if x))
            rows.append([_cell_text(p["prompt"]), *cells])
        lines += [f"### {family}", ""] + md_table(["prompt", *labels], rows) + [""]
    return lines


def lab_lines(report: dict) -> list[str]:
    """Markdown lines linking the lab's experiments (none when it has not been run)."""
    lab = report.get("lab") or {}
    if not lab:
        return []
    lines = ['<a id="the-lab"></a>', "## The lab", "", "Experiments of `posttrain lab` (their "
             "verdicts are computed from runs over several world seeds; see each report):", ""]  # fmt: skip
    for name, v in lab.items():
        quick = " (quick sizes: machinery only)" if v["quick"] else ""
        lines.append(f"- [{name}]({v['report']}): **{v['verdict']}**, {v['passed']} of "
                     f"{v['criteria']} criteria, seeds {v['seeds']}{quick}")  # fmt: skip
    return lines + [""]


def stage_lines(report: dict, plots: dict[str, list[Plot]]) -> list[str]:
    lines = []
    for name, m in report["stages"].items():
        lines += [f'<a id="stage-{name}"></a>', f"## {name} ({m['kind']}, {seconds(m['seconds'])})",
                  ""]  # fmt: skip
        if report.get("summary", {}).get(name):
            lines += [report["summary"][name], ""]
        for p in plots.get(name, []):
            lines += [f"![{name}: {p.path.stem}](plots/{p.path.name})", "", f"*{p.caption}*", ""]
        rows = [[f"`{k}`", fmt(v)] for k, v in m.items() if k not in ("kind", "seconds")]
        if rows:
            lines += md_table(["metric", "value"], rows) + [""]
    return lines


def render_md(report: dict, plots: dict[str, list[Plot]]) -> str:
    lines = [f"# posttrain report: {report['run']}", ""]
    lines += header_lines(report)
    if report.get("header"):
        lines += toc_lines(report)
    lines += summary_lines(report)
    lines += card_lines(report)
    lines += sample_lines(report)
    lines += lab_lines(report)
    lines += stage_lines(report, plots)
    return "\n".join(lines)
