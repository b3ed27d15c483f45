"""One renderer for every stage: stages return structured results; this formats them.

Writes report.json ({"run", "stages": {name: {kind, seconds, metrics...}}}), report.md, and
report.html with plots (plots/*.png, also embedded so the HTML is one portable file).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from posttrain.io import atomic_path, atomic_write_json, atomic_write_text, read_jsonl


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def collect(pipeline, run_dir: Path) -> dict:
    """report.json: per-stage metrics, and one eval summary per evaluated model ("evals")."""
    stages, evals, samples = {}, {}, {}
    for spec in pipeline.stages:
        f = run_dir / spec.name / "result.json"
        if f.is_file():
            r = json.loads(f.read_text())
            stages[spec.name] = {"kind": r["kind"], "seconds": r["seconds"], **r["metrics"]}
            evals |= r.get("evals", {})
            samples |= r.get("samples", {})
    return {"run": pipeline.config.name, "stages": stages, "evals": evals, "samples": samples,
            "lab": lab_verdicts(run_dir)}  # fmt: skip


def lab_verdicts(run_dir: Path) -> dict:
    """The lab's verdicts when `posttrain lab` has written them next to this run (its default
    folder, runs/lab beside runs/<name>): experiment -> verdict, criteria passed, seeds, and
    its report's path relative to the run directory."""
    out = {}
    for f in sorted((run_dir.parent / "lab").glob("*/result.json")):
        try:
            r = json.loads(f.read_text())
            crit = r["criteria"]
            out[r["experiment"]] = {"verdict": r["verdict"], "passed": sum(c["passed"] for c in crit),
                                    "criteria": len(crit), "seeds": r["seeds"], "quick": r["quick"],
                                    "report": f"../lab/{f.parent.name}/report.md"}  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a lab result being written or from another version: not linked
    return out


def _lab_lines(report: dict) -> list[str]:
    """Markdown lines linking the lab's experiments (none when it has not been run)."""
    lab = report.get("lab") or {}
    if not lab:
        return []
    lines = ["## The lab", "", "Experiments of `posttrain lab` (their verdicts are computed from "
             "runs over several world seeds; see each report):", ""]  # fmt: skip
    for name, v in lab.items():
        quick = " (quick sizes: machinery only)" if v["quick"] else ""
        lines.append(f"- [{name}]({v['report']}): **{v['verdict']}**, {v['passed']} of "
                     f"{v['criteria']} criteria, seeds {v['seeds']}{quick}")  # fmt: skip
    return lines + [""]


# The first part of a public benchmark's metric names (evaluate's `<benchmark>/...`).
BENCHMARK_PREFIXES = ("xstest", "simple_safety", "gsm8k", "math500", "truthfulqa", "alpaca_eval")


def card_heading(evals: dict) -> str:
    """What the report card measured: the toy world's held-out prompts (gold scores), public
    benchmarks (named), or both; a run on a user's own model has no toy world to name."""
    keys = {k for m in evals.values() for k in m}
    parts = ["toy-world held-out prompts"] if "gold/mean" in keys else []
    benches = [b for b in BENCHMARK_PREFIXES if any(k.startswith(f"{b}/") for k in keys)]
    if benches:
        parts.append("public benchmarks: " + ", ".join(benches))
    return "Report card" + (f" ({'; '.join(parts)})" if parts else "")


def card_rows(evals: dict) -> list[tuple[str, list]]:
    """Report-card rows: one per metric, one value per evaluated model (None where missing)."""
    labels = list(evals)
    keys: list[str] = []
    for m in evals.values():
        keys += [k for k in m if k not in keys]
    return [(k, [evals[label].get(k) for label in labels]) for k in keys]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    _pyplot().close(fig)
    return out


def plot_rank(run_dir: Path, stage: str, metrics: dict) -> Path | None:
    """Chosen-minus-rejected length histogram, and each annotator's agreement with gold."""
    path = run_dir / stage / "length_diffs.jsonl"
    if not path.is_file():
        return None
    diffs = [r["diff"] for r in read_jsonl(path)]
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    ax.hist(diffs, bins=min(40, max(5, len(set(diffs)))), color="tab:blue", alpha=0.8)
    ax.axvline(0, color="k", lw=0.8)
    share = metrics.get("rank/longer_wins")
    ax.set_title(f"chosen - rejected length (longer wins {share:.2f})" if share is not None
                 else "chosen - rejected length")  # fmt: skip
    ax.set_xlabel("tokens")
    ax.set_ylabel("pairs")
    who = {
        k.rsplit("/", 1)[1]: v for k, v in metrics.items() if k.startswith("rank/agreement_gold/")
    }
    if who:
        ax2.bar(list(who), list(who.values()), color="tab:green", alpha=0.8)
        ax2.axhline(0.5, color="k", lw=0.8, ls="--")
        ax2.set_ylim(0, 1)
    ax2.set_title("agreement with gold, per annotator")
    fig.tight_layout()
    return _save(fig, run_dir / "plots" / f"{stage}_pairs.png")


def _series(run_dir: Path, stage: str, key: str) -> tuple[list, list]:
    path = run_dir / stage / "metrics.jsonl"
    rows = [r for r in read_jsonl(path) if key in r] if path.is_file() else []
    return [r["step"] for r in rows], [r[key] for r in rows]


def plot_lines(run_dir: Path, stage: str, keys: list[str], title: str, name: str) -> Path | None:
    """Several metrics of one stage against step, on one axis."""
    series = {k: _series(run_dir, stage, k) for k in keys}
    if not any(xs for xs, _ in series.values()):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for k, (xs, ys) in series.items():
        if xs:
            ax.plot(xs, ys, "o-" if len(xs) < 30 else "-", ms=3, lw=1.2, label=k)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("step")
    ax.set_title(f"{stage}: {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, run_dir / "plots" / f"{stage}_{name}.png")


def plot_reward(run_dir: Path, stage: str, metrics: dict) -> Path | None:
    return plot_lines(run_dir, stage, ["train/reward/accuracy", "reward/accuracy", "eval/accuracy",
                                       "eval/gold_agreement"], "reward-model accuracy", "accuracy")  # fmt: skip


def plot_dpo(run_dir: Path, stage: str, metrics: dict) -> Path | None:
    return plot_lines(run_dir, stage, ["rewards/chosen", "rewards/rejected", "rewards/margin",
                                       "eval/rewards/margin"], "implicit rewards", "rewards")  # fmt: skip


def plot_rl(run_dir: Path, stage: str, metrics: dict) -> Path | None:
    """Reward, gold and KL to the reference over steps: one figure per RL method."""
    keys = {"reward/mean": "reward (rollouts)", "gold/mean": "gold (rollouts)", "eval/reward": "reward (held-out)",
            "eval/gold": "gold (held-out)"}  # fmt: skip
    series = {k: _series(run_dir, stage, k) for k in [*keys, "kl/ref"]}
    if not series["reward/mean"][0]:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.5), dpi=100)
    for k, label in keys.items():
        xs, ys = series[k]
        if xs:
            ax.plot(xs, ys, "o-" if len(xs) < 30 else "-", ms=3, lw=1.2, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("reward / gold")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    xs, ys = series["kl/ref"]
    ax2.plot(xs, ys, color="tab:red", lw=1, ls="--", label="KL to reference")
    ax2.set_ylabel("KL (sequence)", color="tab:red")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="best")
    ax.set_title(f"{stage} ({metrics['kind']}): reward, gold and KL")
    fig.tight_layout()
    return _save(fig, run_dir / "plots" / f"{stage}_rl.png")


def plot_calibration(run_dir: Path, stage: str, result: dict) -> Path | None:
    """Reliability diagram: accuracy against confidence in its own answer, one line per model."""
    from posttrain.eval.metrics import confidences, reliability

    curves = {}
    for label, rel in result.get("artifacts", {}).items():
        f = run_dir / rel
        if label not in result.get("evals", {}) or not f.is_file():  # a benchmark's records
            continue
        conf, correct = confidences(read_jsonl(f))
        if conf:
            curves[label] = reliability(conf, correct)
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.2), dpi=100)
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":", label="calibrated")
    for label, pts in curves.items():
        ece = result.get("evals", {}).get(label, {}).get("calibration/ece")
        pts = [p for p in pts if p[2] >= 5]  # a bin of fewer answers is noise, not a point
        ax.plot([c for c, _, _ in pts], [a for _, a, _ in pts], "o-", ms=3, lw=1.2,
                label=label if ece is None else f"{label} (ECE {ece:.2f})")  # fmt: skip
    ax.set_xlabel("confidence (probability of its own answer)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"{stage}: calibration (answerable prompts, bins of 5+)")
    fig.tight_layout()
    return _save(fig, run_dir / "plots" / f"{stage}_calibration.png")


def plot_over_optimisation(run_dir: Path, stage: str, result: dict) -> Path | None:
    """Best-of-k gold and proxy reward against the KL bound: over-optimisation at a glance."""
    found = {label: m for label, m in result.get("evals", {}).items() if "overopt/kl@1" in m}
    if not found:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax2 = ax.twinx()
    for label, m in found.items():
        ks = sorted(int(key.split("@")[1]) for key in m if key.startswith("overopt/kl@"))
        kl, gold = [m[f"overopt/kl@{k}"] for k in ks], [m[f"overopt/gold@{k}"] for k in ks]
        ax.plot(kl, gold, "o-", ms=3, label=f"{label}: gold")
        ax2.plot(kl, [m[f"overopt/reward@{k}"] for k in ks], "s--", ms=3, color="tab:red",
                 label=f"{label}: proxy reward")  # fmt: skip
        for k, x, y in zip(ks, kl, gold, strict=True):
            ax.annotate(f"n={k}", (x, y), fontsize=7, textcoords="offset points", xytext=(2, 4))
    ax.set_xlabel("KL bound of best-of-n (nats): log n - (n-1)/n")
    ax.set_ylabel("gold (mean score)")
    ax2.set_ylabel("proxy reward", color="tab:red")
    ax.grid(alpha=0.3)
    lines, lines2 = ax.get_legend_handles_labels(), ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="best")
    ax.set_title(f"{stage}: best-of-n, gold vs the proxy it optimises")
    fig.tight_layout()
    return _save(fig, run_dir / "plots" / f"{stage}_over_optimisation.png")


# (x, y, panel title) of the trade-off scatter: each evaluated model is one point per panel
TRADEOFFS = [
    ("safety/false_refusal_rate", "safety/violation_rate", "safety: violations vs false refusals"),
    ("xstest/false_refusal_rate", "xstest/violation_rate", "XSTest: violations vs false refusals"),
    ("length/mean_tokens", "gold/mean", "length vs gold (length hacking?)"),
    ("knowledge/hallucination_rate", "knowledge/known_accuracy", "hallucination vs known facts"),
]


def plot_tradeoffs(run_dir: Path, stage: str, result: dict) -> Path | None:
    """One point per evaluated model on the trade-offs post-training moves along: safety
    (violations vs false refusals), length vs gold, and abstaining vs knowing."""
    evals = result.get("evals", {})
    panels = [(x, y, t) for x, y, t in TRADEOFFS
              if sum(x in m and y in m for m in evals.values()) >= 2]  # fmt: skip
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(panels), figsize=(3.6 * len(panels), 3.4), dpi=100, squeeze=False
    )
    for ax, (x, y, title) in zip(axes[0], panels, strict=True):
        for label, m in evals.items():
            if x in m and y in m:
                ax.scatter(m[x], m[y], s=18)
                ax.annotate(
                    label, (m[x], m[y]), fontsize=7, textcoords="offset points", xytext=(3, 3)
                )
        ax.set_xlabel(x, fontsize=8)
        ax.set_ylabel(y, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, run_dir / "plots" / f"{stage}_tradeoffs.png")


def plot_evaluate(run_dir: Path, stage: str, metrics: dict) -> list[Path | None]:
    """The evaluate stage's plots, from its result.json (evals and the records it wrote)."""
    result = json.loads((run_dir / stage / "result.json").read_text())
    return [plot(run_dir, stage, result)
            for plot in (plot_tradeoffs, plot_calibration, plot_over_optimisation)]  # fmt: skip


PLOTTERS = {"rank": plot_rank, "reward": plot_reward, "dpo": plot_dpo, "ppo": plot_rl, "grpo": plot_rl,
            "rloo": plot_rl, "online_dpo": plot_rl, "evaluate": plot_evaluate}  # fmt: skip


def stage_plots(run_dir: Path, stage: str, m: dict) -> list[Path]:
    """Every plot of one stage: its loss curve if it trained, then its kind's own plots."""
    found = [plot_curves(run_dir, stage)]
    if m["kind"] in PLOTTERS:
        made = PLOTTERS[m["kind"]](run_dir, stage, m)
        found += made if isinstance(made, list) else [made]
    return [p for p in found if p is not None]


def plot_curves(run_dir: Path, stage: str) -> Path | None:
    """Training loss (and lr) against step, from the stage's metrics.jsonl."""
    path = run_dir / stage / "metrics.jsonl"
    rows = [r for r in read_jsonl(path) if "train/loss" in r] if path.is_file() else []
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["train/loss"] for r in rows], lw=1.2, label="train/loss")
    evals = [r for r in rows if "eval/loss" in r]
    if evals:
        ax.plot(
            [r["step"] for r in evals],
            [r["eval/loss"] for r in evals],
            "o-",
            ms=3,
            label="eval/loss",
        )
        ax.legend(loc="upper center")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(f"{stage}: loss")
    ax.grid(alpha=0.3)
    if "train/lr" in rows[0]:
        ax2 = ax.twinx()
        ax2.plot(
            [r["step"] for r in rows],
            [r["train/lr"] for r in rows],
            color="tab:orange",
            lw=0.8,
            alpha=0.6,
        )
        ax2.set_ylabel("lr", color="tab:orange")
    fig.tight_layout()
    return _save(fig, run_dir / "plots" / f"{stage}_loss.png")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def render_md(report: dict, plots: dict[str, list[Path]]) -> str:
    lines = [f"# posttrain report: {report['run']}", ""]
    if report["evals"]:
        lines += [f"## {card_heading(report['evals'])}", ""]
        rows = [
            [f"`{k}`", *("" if v is None else _fmt(v) for v in vals)]
            for k, vals in card_rows(report["evals"])
        ]
        lines += _md_table(["metric", *report["evals"]], rows) + [""]
        for label, samples in report["samples"].items():
            rows = [
                [r["family"], _cell(r["prompt"]), _cell(r["response"]), _fmt(r["score"])]
                for r in samples
            ]
            lines += [f"### Sample responses: {label}", ""] + _md_table(
                ["family", "prompt", "response", "gold"], rows
            )
            lines.append("")
    lines += _lab_lines(report)
    for name, m in report["stages"].items():
        rows = [[f"`{k}`", _fmt(v)] for k, v in m.items() if k not in ("kind", "seconds")]
        lines += [f"## {name} ({m['kind']}, {m['seconds']:.1f}s)", ""] + _md_table(
            ["metric", "value"], rows
        )
        for p in plots.get(name, []):
            lines += ["", f"![{name}: {p.stem}](plots/{p.name})"]
        lines.append("")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ")[:160]


def _html_card(report: dict) -> list[str]:
    e = html.escape
    if not report["evals"]:
        return []
    labels = list(report["evals"])
    parts = [
        f"<h2>{e(card_heading(report['evals']))}</h2><table><tr><th>metric</th>"
        + "".join(f"<th>{e(x)}</th>" for x in labels)
        + "</tr>"
    ]
    for k, vals in card_rows(report["evals"]):
        cells = "".join(f"<td>{'' if v is None else e(_fmt(v))}</td>" for v in vals)
        parts.append(f"<tr><td><code>{e(k)}</code></td>{cells}</tr>")
    parts.append("</table>")
    for label, rows in report["samples"].items():
        parts.append(
            f"<h3>Sample responses: {e(label)}</h3><table><tr><th>family</th><th>prompt</th><th>response</th><th>gold</th></tr>"
        )
        parts += [f"<tr><td>{e(r['family'])}</td><td>{e(r['prompt'])}</td><td><pre>{e(r['response'])}</pre></td>"
                  f"<td>{e(_fmt(r['score']))}</td></tr>" for r in rows]  # fmt: skip
        parts.append("</table>")
    return parts


def render_html(report: dict, plots: dict[str, list[Path]]) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>posttrain report: {e(report['run'])}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:900px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "code{font-size:90%}</style></head><body>",
        f"<h1>posttrain report: {e(report['run'])}</h1>",
        *_html_card(report),
    ]
    if report.get("lab"):
        parts.append("<h2>The lab</h2><ul>")
        parts += [f"<li><a href='{e(v['report'])}'>{e(name)}</a>: <b>{e(v['verdict'])}</b>, "
                  f"{v['passed']} of {v['criteria']} criteria, seeds {e(str(v['seeds']))}"
                  f"{' (quick sizes)' if v['quick'] else ''}</li>"
                  for name, v in report["lab"].items()]  # fmt: skip
        parts.append("</ul>")
    for name, m in report["stages"].items():
        parts.append(f"<h2>{e(name)} <small>({e(m['kind'])}, {m['seconds']:.1f}s)</small></h2>")
        for p in plots.get(name, []):
            data = base64.b64encode(p.read_bytes()).decode()
            parts.append(f"<img alt='{e(name)}: {e(p.stem)}' src='data:image/png;base64,{data}'>")
        parts.append("<table><tr><th>metric</th><th>value</th></tr>")
        parts += [
            f"<tr><td><code>{e(k)}</code></td><td>{e(_fmt(v))}</td></tr>"
            for k, v in m.items()
            if k not in ("kind", "seconds")
        ]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(pipeline, run_dir: Path) -> dict:
    report = collect(pipeline, run_dir)
    plots = {name: stage_plots(run_dir, name, m) for name, m in report["stages"].items()}
    atomic_write_json(run_dir / "report.json", report)
    atomic_write_text(run_dir / "report.md", render_md(report, plots))
    atomic_write_text(run_dir / "report.html", render_html(report, plots))
    return report
