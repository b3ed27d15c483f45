"""report.html: one self-contained page (styles inline, plots embedded as data URIs, no script,
nothing fetched), readable offline. The same figures as report.md, from report.json."""

from __future__ import annotations

import base64
import html

from posttrain.eval.intervals import REFERENCE
from posttrain.report.card import (
    Cell,
    card_groups,
    card_heading,
    gold_mark,
    response_marks,
    sample_prompts,
)
from posttrain.report.glossary import (
    HEADLINE,
    better_arrow,
    better_word,
    fmt,
    fmt_ci,
    fmt_signed,
    no_interval,
)
from posttrain.report.markdown import LEGEND, header_rows, seconds
from posttrain.report.plots import Plot

e = html.escape

CSS = """
body{font:15px/1.45 system-ui,sans-serif;color:#1d232a;background:#f6f7f9;margin:0}
main{max-width:1200px;margin:0 auto;padding:1em 1.5em 4em}
h1{font-size:1.6em;margin:.4em 0}h2{margin-top:1.8em;border-bottom:1px solid #d8dde3}
section{scroll-margin-top:1em}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #d8dde3;padding:4px 8px;
text-align:left;vertical-align:top}code{font-size:90%;background:#eef0f3;padding:0 .2em}
table.meta{margin-bottom:1em}table.meta th{background:#eef0f3;white-space:nowrap}
nav#toc{background:#fff;border:1px solid #d8dde3;border-radius:6px;padding:.4em 1.2em;
display:inline-block}nav#toc ol{margin:.3em 0;padding-left:1.4em}nav#toc h2{border:0;margin:.3em 0;
font-size:1.1em}.stages a{margin-right:.6em}
ul.story li{margin:.35em 0}.secs{color:#6b7680}
.scroll{overflow-x:auto;max-width:100%}
table.card td{text-align:right;white-space:nowrap}table.card th.metric{min-width:16em;max-width:26em}
.meaning{font-weight:normal;font-size:.82em;color:#55606b;white-space:normal}
.val{font-variant-numeric:tabular-nums}.ci{display:block;font-size:.78em;color:#6b7680}
td.best .val{font-weight:700}td.best .val::after{content:" ★";color:#c28a00}
.vs{display:block;font-size:.75em}.noise{color:#8a96a3}.better{color:#1d7a3e}.worse{color:#b3261e}
.differs{color:#5b4ab3}.ref{color:#8a96a3;font-style:italic}
details{margin:.6em 0}summary{cursor:pointer;font-weight:600}
.legend{font-size:.88em;color:#44505c;max-width:60em}
figure{margin:1em 0;background:#fff;border:1px solid #d8dde3;border-radius:6px;padding:.5em;
display:inline-block;max-width:100%}figure img{max-width:100%;height:auto}
figcaption{font-size:.88em;color:#44505c;max-width:60em}
table.samples{width:100%;table-layout:fixed}table.samples th.prompt{width:11em}
.resp{white-space:pre-wrap;overflow-wrap:anywhere;font-family:ui-monospace,monospace;font-size:.8em}
.gold{font-weight:700;margin-right:.3em}.right{color:#1d7a3e}.wrong{color:#b3261e}
.mark{display:inline-block;font-size:.75em;background:#fff1c2;border:1px solid #e0c36a;
border-radius:3px;padding:0 .3em;margin-top:.2em}
"""


def _header(report: dict) -> list[str]:
    rows = header_rows(report, lambda x: f"<code>{e(x)}</code>", e)
    if not rows:
        return []
    return ["<table class='meta' id='header'>"] + [
        f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows
    ] + ["</table>"]  # fmt: skip


def _toc(report: dict) -> list[str]:
    items = []
    if report.get("summary"):
        items.append("<li><a href='#summary'>Summary</a>: one sentence per stage</li>")
    if report["evals"]:
        items.append("<li><a href='#card'>Report card</a>: headline metrics, then groups</li>")
    if any(report.get("samples", {}).values()):
        items.append("<li><a href='#samples'>Sample responses</a>: side by side per prompt</li>")
    if report.get("lab"):
        items.append("<li><a href='#lab'>The lab</a></li>")
    if report["stages"]:
        links = "".join(f"<a href='#stage-{e(s)}'>{e(s)}</a>" for s in report["stages"])
        items.append(f"<li>Stages: <span class='stages'>{links}</span></li>")
    return ["<nav id='toc'><h2>Contents</h2><ol>", *items, "</ol></nav>"]


def _summary(report: dict) -> list[str]:
    said = report.get("summary") or {}
    if not said:
        return []
    out = ["<section id='summary'><h2>Summary</h2><ul class='story'>"]
    for stage, text in said.items():
        secs = report["stages"].get(stage, {}).get("seconds")
        when = f" <span class='secs'>({seconds(secs)})</span>" if secs is not None else ""
        out.append(f"<li><a href='#stage-{e(stage)}'><b>{e(stage)}</b></a>{when}: {e(text)}</li>")
    return out + ["</ul></section>"]


def _cell(c: Cell, label: str) -> str:
    if c.value is None:
        return "<td></td>"
    cls = "v best" if c.best else "v"
    ci = f"<span class='ci'>{e(fmt_ci(c.ci))}</span>" if c.ci else ""
    vs, title = "", ""
    if c.verdict == "reference":
        vs = "<span class='vs ref'>reference</span>"
    elif c.diff is not None:
        d, lo, hi = c.diff
        title = f" title='{e(label)} - {REFERENCE}: {fmt_signed(d)} [{fmt_signed(lo)}, {fmt_signed(hi)}]'"
        word = {"within noise": "≈ " + REFERENCE, "better": f"{fmt_signed(d)} better",
                "worse": f"{fmt_signed(d)} worse", "differs": f"{fmt_signed(d)}"}[c.verdict]  # fmt: skip
        vs = f"<span class='vs {'noise' if c.verdict == 'within noise' else c.verdict}'>{e(word)}</span>"
    return f"<td class='{cls}'{title}><span class='val'>{e(fmt(c.value))}</span>{ci}{vs}</td>"


def _card(report: dict) -> list[str]:
    evals = report["evals"]
    if not evals:
        return []
    labels = list(evals)
    head = "<tr><th>metric</th>" + "".join(f"<th>{e(x)}</th>" for x in labels) + "</tr>"
    out = [f"<section id='card'><h2>{e(card_heading(evals))}</h2>",
           f"<p class='legend'>{e(LEGEND).replace('**Bold**', '<b>Bold ★</b>')}</p>"]  # fmt: skip
    for group, rows in card_groups(evals):
        body = []
        for r in rows:
            unit = f" · {e(r.spec.unit)}" if r.spec.unit else ""
            if not any(c.ci for c in r.cells):
                unit += f" · <i>no interval: {e(no_interval(r.key))}</i>"
            meaning = (f"<div class='meaning'>{e(r.spec.meaning)} <span>{better_arrow(r.spec.better)} "
                       f"{better_word(r.spec.better)}</span>{unit}</div>")  # fmt: skip
            cells = "".join(_cell(c, x) for c, x in zip(r.cells, labels, strict=True))
            body.append(f"<tr><th class='metric'><code>{e(r.key)}</code>{meaning}</th>{cells}</tr>")
        table = f"<div class='scroll'><table class='card'>{head}{''.join(body)}</table></div>"
        if group == HEADLINE:
            out.append(f"<div id='card-headline'>{table}</div>")
        else:
            n = f"{len(rows)} metric" + ("s" if len(rows) > 1 else "")
            out.append(f"<details><summary>{e(group)} ({n})</summary>{table}</details>")
    plots = [s for s, m in report["stages"].items() if m["kind"] == "evaluate"]
    if plots:
        out.append("<p>Plots of these figures: " + ", ".join(
            f"<a href='#stage-{e(s)}'>{e(s)}</a>" for s in plots) + ".</p>")  # fmt: skip
    return out + ["</section>"]


def _response(r: dict | None) -> str:
    if r is None:
        return "<td></td>"
    g = gold_mark(r.get("score"))
    cls = "right" if g == "✓" else "wrong" if g == "✗" else ""
    marks = "".join(f"<span class='mark'>{e(m)}</span>" for m in response_marks(r))
    gold = (
        f"<span class='gold {cls}' title='gold {e(fmt(r.get('score')))}'>{e(g)}</span>" if g else ""
    )
    return f"<td>{gold}<span class='resp'>{e(r['response'])}</span>{marks}</td>"


def _samples(report: dict) -> list[str]:
    prompts = sample_prompts(report.get("samples", {}))
    if not prompts:
        return []
    labels = list(report["samples"])
    head = (
        "<tr><th class='prompt'>prompt</th>" + "".join(f"<th>{e(x)}</th>" for x in labels) + "</tr>"
    )
    out = ["<section id='samples'><h2>Sample responses</h2><p class='legend'>Every model's answer "
           "to the same prompt side by side: ✓ right, ✗ wrong by gold (else the partial gold "
           "score); empty and truncated responses are marked.</p>"]  # fmt: skip
    for family in dict.fromkeys(p["family"] for p in prompts):
        rows = [f"<tr><th class='prompt'>{e(p['prompt'])}</th>"
                + "".join(_response(p["responses"].get(x)) for x in labels) + "</tr>"
                for p in prompts if p["family"] == family]  # fmt: skip
        out.append(f"<h3>{e(family)}</h3><div class='scroll'><table class='samples'>{head}"
                   f"{''.join(rows)}</table></div>")  # fmt: skip
    return out + ["</section>"]


def _lab(report: dict) -> list[str]:
    if not report.get("lab"):
        return []
    out = ["<section id='lab'><h2>The lab</h2><ul>"]
    out += [f"<li><a href='{e(v['report'])}'>{e(name)}</a>: <b>{e(v['verdict'])}</b>, "
            f"{v['passed']} of {v['criteria']} criteria, seeds {e(str(v['seeds']))}"
            f"{' (quick sizes)' if v['quick'] else ''}</li>"
            for name, v in report["lab"].items()]  # fmt: skip
    return out + ["</ul></section>"]


def _stage(report: dict, name: str, m: dict, plots: list[Plot]) -> list[str]:
    out = [f"<section id='stage-{e(name)}' class='stage'><h2>{e(name)} <small>({e(m['kind'])}, "
           f"{seconds(m['seconds'])})</small></h2>"]  # fmt: skip
    if report.get("summary", {}).get(name):
        out.append(f"<p class='sentence'>{e(report['summary'][name])}</p>")
    for p in plots:
        data = base64.b64encode(p.path.read_bytes()).decode()
        out.append(f"<figure><img alt='{e(name)}: {e(p.path.stem)}' src='data:image/png;base64,"
                   f"{data}'><figcaption>{e(p.caption)}</figcaption></figure>")  # fmt: skip
    rows = [(k, v) for k, v in m.items() if k not in ("kind", "seconds")]
    if rows:
        body = "".join(
            f"<tr><td><code>{e(k)}</code></td><td>{e(fmt(v))}</td></tr>" for k, v in rows
        )
        out.append(f"<details><summary>All {len(rows)} figures of {e(name)}</summary>"
                   f"<table><tr><th>metric</th><th>value</th></tr>{body}</table></details>")  # fmt: skip
    settings = report.get("settings", {}).get(name)
    if settings:
        body = "".join(f"<tr><td><code>{e(k)}</code></td><td>{e(str(v))}</td></tr>"
                       for k, v in settings.items())  # fmt: skip
        out.append(
            f"<details><summary>Settings of {e(name)}</summary><table>{body}</table></details>"
        )
    return out + ["</section>"]


def render_html(report: dict, plots: dict[str, list[Plot]]) -> str:
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>posttrain report: {e(report['run'])}</title><style>{CSS}</style></head>",
             f"<body><main><h1>posttrain report: {e(report['run'])}</h1>",
             *_header(report), *_toc(report), *_summary(report), *_card(report),
             *_samples(report), *_lab(report)]  # fmt: skip
    for name, m in report["stages"].items():
        parts += _stage(report, name, m, plots.get(name, []))
    parts.append("</main></body></html>")
    return "\n".join(parts)
