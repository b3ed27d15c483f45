"""The app's pages (Jinja2, autoescaped), its stylesheet and its one script.

Prompts and responses are untrusted text: every value goes through Jinja2's autoescape, the
script only ever sets `textContent` and `value`, and the Content-Security-Policy the server sends
allows no inline script, so a response holding `<script>` shows as text.
"""

from __future__ import annotations

import jinja2

TEMPLATES = {
    "base.html": """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }} - posttrain annotate</title>
<link rel="stylesheet" href="/static/app.css"></head>
<body><header><span class="brand">posttrain annotate</span>
{% if me %}<span class="who">{{ me.name }} <small>({{ me.role }}, group {{ me.group }})</small></span>
{% if me.role == "admin" %}<a href="/admin">Progress</a>{% else %}<a href="/">My queue</a>{% endif %}
<form method="post" action="/logout" class="inline"><input type="hidden" name="csrf" value="{{ csrf }}">
<button type="submit" id="logout">Log out</button></form>{% endif %}
</header><main>{% block main %}{% endblock %}</main>
<script src="/static/app.js"></script></body></html>""",
    "error.html": """{% extends "base.html" %}{% block main %}
<h1>{{ title }}</h1><p class="error" role="alert">{{ message }}</p>{% endblock %}""",
    "login.html": """{% extends "base.html" %}{% block main %}
<h1>Log in</h1>
{% if token %}<p>This login link works once. Log in on the browser you will annotate with.</p>
<form method="post" action="/login"><input type="hidden" name="token" value="{{ token }}">
<button type="submit" id="login" class="primary">Log in</button></form>
{% else %}<p>Open the login link you were given. Each link works once; if yours was used or
lost, ask the admin for a new one (<code>posttrain annotate add-annotator NAME</code>).</p>{% endif %}
{% endblock %}""",
    "home.html": """{% extends "base.html" %}{% block main %}
<h1>My queue</h1>
<p class="progress" id="progress">{{ p.ranked }} of {{ p.assigned }} ranked{% if p.skipped %},
{{ p.skipped }} skipped{% endif %}</p>
<progress max="{{ p.assigned or 1 }}" value="{{ p.ranked }}"></progress>
{% if p.queued %}<p><a class="button primary" id="start" href="/rank/next">
{% if p.ranked or p.skipped %}Continue{% else %}Start{% endif %} ranking ({{ p.queued }} to go)</a></p>
{% else %}<p id="done">All done: nothing left in your queue. Thank you!</p>{% endif %}
{% if skipped %}<h2>Skipped</h2><ul>{% for s in skipped %}
<li><a href="/rank/{{ s.index }}">{{ s.prompt_id }}</a></li>{% endfor %}</ul>{% endif %}
{% endblock %}""",
    "rank.html": """{% extends "base.html" %}{% block main %}
<p class="progress">{{ p.ranked }} of {{ p.assigned }} ranked{% if p.skipped %}, {{ p.skipped }}
skipped{% endif %}{% if previous %} &middot; you ranked this prompt before; submitting
replaces your ranking{% endif %}</p>
<h1>Prompt <code>{{ prompt_id }}</code></h1>
<section class="guidelines" id="guidelines" aria-label="Ranking guidelines"><h2>How to rank</h2>
{% for b in guidelines %}{% if b.kind == "ul" %}<ul>{% for item in b["items"] %}<li>{{ item }}</li>
{% endfor %}</ul>{% else %}<p>{{ b["items"][0] }}</p>{% endif %}{% endfor %}</section>
<section class="prompt">{% for m in messages %}<div class="msg {{ m.role }}">
<div class="role">{{ m.role }}</div><div class="text">{{ m.text }}</div></div>{% endfor %}</section>
{% if error %}<p class="error" role="alert" id="error">{{ error }}</p>{% endif %}
<p class="help">Press <b>Pick</b> on the responses from best to worst, or type a number
for each (1 = best). Equal numbers are a tie; <b>Tie with last pick</b> makes the next pick share
the previous number.</p>
<p class="keys" id="keys">Keys: <kbd>1</kbd>&ndash;<kbd>9</kbd> pick response 1&ndash;9 (as
numbered below) &middot; <kbd>t</kbd> tie with last pick &middot; <kbd>u</kbd> undo last pick
&middot; <kbd>Enter</kbd> submit &middot; <kbd>s</kbd> skip</p>
<form id="rank-form" method="post" action="/rank/{{ index }}">
<input type="hidden" name="csrf" value="{{ csrf }}">
<div class="cands">{% for c in cands %}
<div class="cand" data-index="{{ c.index }}"><div class="cand-head">
{% if loop.index <= 9 %}<kbd class="key" title="press {{ loop.index }} to pick">{{ loop.index }}</kbd>{% endif %}
<span class="label">Response {{ c.label }}</span><span class="badge"></span>
<button type="button" class="pick" data-target="rank_{{ c.index }}">Pick</button>
<label>Rank <input class="rank" type="number" min="1" max="{{ cands|length }}"
id="rank_{{ c.index }}" name="rank_{{ c.index }}" value="{{ c.value }}"></label></div>
<div class="text">{{ c.text }}</div></div>{% endfor %}</div>
<div class="actions"><button type="button" id="tie">Tie with last pick</button>
<button type="button" id="undo">Undo last pick</button>
<button type="button" id="clear">Clear</button>
<button type="submit" id="submit" class="primary">Submit ranking</button></div>
</form>
<form method="post" action="/skip/{{ index }}" class="skip" id="skip-form">
<input type="hidden" name="csrf" value="{{ csrf }}">
<button type="submit" id="skip">Skip this prompt</button></form>
{% endblock %}""",
    "admin.html": """{% extends "base.html" %}{% block main %}
<h1>Progress</h1>
<p>Stage <code>{{ stage }}</code>: {{ n_prompts }} prompts, each for {{ k }} annotator(s);
{{ total }} rankings; {{ covered }} prompts ranked at least once, {{ complete }} by all
{{ k }} of their annotators.</p>
{% if invalid %}<div class="error" id="invalid" role="alert"><p>{{ invalid|length }} stored
ranking(s) are invalid: they are left out of the counts above, the agreement figures and the
export. The annotator can rank the prompt again to replace one.</p><ul>
{% for r in invalid[:50] %}<li>ranking id {{ r.id }}: {{ r.problem }}</li>{% endfor %}
{% if invalid|length > 50 %}<li>... and {{ invalid|length - 50 }} more</li>{% endif %}</ul></div>
{% endif %}
<table id="progress"><tr><th>annotator</th><th>group</th><th>assigned</th><th>ranked</th>
<th>skipped</th><th>re-submitted</th></tr>{% for a in rows %}<tr><td>{{ a.name }}</td>
<td>{{ a.group }}</td><td>{{ a.assigned }}</td><td>{{ a.ranked }}</td><td>{{ a.skipped }}</td>
<td>{{ a.revisions }}</td></tr>{% endfor %}</table>
<h2>Agreement</h2>{% if metrics %}<table id="agreement">{% for k, v in metrics %}
<tr><td><code>{{ k }}</code></td><td>{{ v }}</td></tr>{% endfor %}</table>
{% elif total %}<p>No agreement figures yet: they need two annotators on the same prompts, or
candidates with gold scores.</p>{% else %}<p>No rankings yet.</p>{% endif %}
<h2>Ranking guidelines</h2>
<p>Shown to every annotator above the candidates. A line starting with "- " is a bullet; empty
text restores the default.</p>
<form method="post" action="/admin/guidelines" id="guidelines-form">
<input type="hidden" name="csrf" value="{{ csrf }}">
<textarea name="guidelines" id="guidelines-text" rows="8">{{ guidelines }}</textarea>
<p><button type="submit" id="save-guidelines">Save guidelines</button></p></form>
<h2>Export</h2>
{% if exported %}<p id="exported">Wrote {{ exported.rankings }} rankings and {{ exported.pairs }}
pairs at {{ exported.when }}:</p><ul>{% for name, path in exported.paths.items() %}
<li><code>{{ path }}</code></li>{% endfor %}</ul>
{% if exported.invalid %}<p class="error">Left out {{ exported.invalid|length }} invalid
ranking(s): ids {{ exported.invalid|map(attribute="id")|join(", ") }}.</p>{% endif %}
{% elif show_export %}<p id="exported">No export yet.</p>{% endif %}
<form method="post" action="/admin/export"><input type="hidden" name="csrf" value="{{ csrf }}">
<button type="submit" id="export" class="primary">Export rankings.jsonl and pairs.jsonl</button>
</form>{% endblock %}""",
}

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0; color: #1d232a; background: #f6f7f9; }
header { display: flex; gap: 1em; align-items: center; padding: .6em 1.2em; background: #243447;
  color: #fff; }
header a { color: #cfe3ff; } header .who { margin-left: auto; } header small { color: #b8c4d0; }
.brand { font-weight: 600; } form.inline { display: inline; margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 1em 1.2em 3em; }
h1 { font-size: 1.35em; } code { background: #e8ebef; padding: 0 .25em; border-radius: 3px; }
.progress { color: #55606b; margin: .2em 0; } progress { width: 100%; max-width: 420px; }
.prompt .msg { background: #fff; border: 1px solid #d8dde3; border-radius: 6px; padding: .5em .8em;
  margin: .4em 0; }
.msg .role { font-size: .8em; text-transform: uppercase; color: #6b7680; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; font-family: ui-monospace, monospace;
  font-size: .93em; }
.cands { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: .8em; }
.cand { background: #fff; border: 2px solid #d8dde3; border-radius: 8px; padding: .6em .8em; }
.cand.picked { border-color: #2f7d4f; background: #f2fbf5; }
.cand-head { display: flex; gap: .6em; align-items: center; margin-bottom: .4em; }
.cand-head .label { font-weight: 600; white-space: nowrap; } .badge { color: #2f7d4f; font-weight: 700; }
.cand-head label { margin-left: auto; } input.rank { width: 3.5em; }
button, a.button { font: inherit; padding: .35em .9em; border-radius: 5px; border: 1px solid #8a96a3;
  background: #fff; cursor: pointer; text-decoration: none; color: #1d232a; display: inline-block; }
button.primary, a.button.primary { background: #2563c9; border-color: #2563c9; color: #fff; }
button.active { background: #ffe9a8; } button:disabled { opacity: .5; cursor: default; }
.actions { display: flex; gap: .6em; margin: 1em 0 .5em; } form.skip { margin-top: .4em; }
.error { background: #fdecec; border: 1px solid #e3a0a0; color: #8a1c1c; padding: .5em .8em;
  border-radius: 6px; }
.help { color: #55606b; }
.guidelines { background: #fffbea; border: 1px solid #ecd98b; border-radius: 6px; padding: .3em 1em;
  margin: .6em 0; }
.guidelines h2 { font-size: 1em; margin: .4em 0; } .guidelines ul { margin: .3em 0; padding-left: 1.3em; }
.guidelines p { margin: .3em 0; }
kbd { font: .85em ui-monospace, monospace; border: 1px solid #8a96a3; border-bottom-width: 2px;
  border-radius: 3px; padding: 0 .35em; background: #fff; }
.keys { color: #55606b; font-size: .92em; } .cand-head kbd.key { background: #eef3fb; }
textarea { width: 100%; max-width: 60em; font: inherit; }
table { border-collapse: collapse; background: #fff; }
td, th { border: 1px solid #d8dde3; padding: .25em .7em; text-align: left; }
"""

JS = """"use strict";
// Click-to-order: "Pick" gives a response the next rank number; "Tie with last pick" makes the
// next pick share the previous number; "Undo last pick" takes the last pick back. The numbers are
// ordinary form fields, so the form also works without this script. Keys: 1-9 pick the response
// numbered so, t tie, u undo, Enter submit, s skip (not while typing in a field). Only .value and
// .textContent are ever set (no HTML).
(function () {
  const form = document.getElementById("rank-form");
  if (!form) return;
  const inputs = Array.from(form.querySelectorAll("input.rank"));
  const picks = Array.from(form.querySelectorAll("button.pick"));
  const tieBtn = document.getElementById("tie");
  const undoBtn = document.getElementById("undo");
  let last = 0, tie = false;
  const history = [];  // the picks made on this page, last one last: {input, tie}
  function refresh() {
    last = Math.max(0, ...inputs.map((i) => parseInt(i.value, 10) || 0));
    for (const input of inputs) {
      const card = input.closest(".cand");
      card.classList.toggle("picked", input.value !== "");
      card.querySelector(".badge").textContent = input.value ? "#" + input.value : "";
    }
    if (last === 0) tie = false;
    tieBtn.classList.toggle("active", tie);
    tieBtn.disabled = last === 0;
    undoBtn.disabled = history.length === 0;
  }
  function pick(btn) {
    const input = document.getElementById(btn.dataset.target);
    if (input.value !== "") return;
    history.push({ input: input, tie: tie });
    input.value = String(tie ? last : last + 1);
    tie = false;
    refresh();
  }
  function undo() {
    const h = history.pop();
    if (!h) return;
    h.input.value = "";
    tie = h.tie;  // the tie that pick used is pending again
    refresh();
  }
  form.addEventListener("click", (ev) => {
    const btn = ev.target.closest("button.pick");
    if (btn) pick(btn);
  });
  tieBtn.addEventListener("click", () => { tie = !tie; refresh(); });
  undoBtn.addEventListener("click", undo);
  document.getElementById("clear").addEventListener("click", () => {
    inputs.forEach((i) => { i.value = ""; });
    history.length = 0;
    tie = false;
    refresh();
  });
  inputs.forEach((i) => i.addEventListener("input", () => { history.length = 0; refresh(); }));
  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey || ev.isComposing) return;
    const t = ev.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.isContentEditable)) return;
    if (/^[1-9]$/.test(ev.key) && picks[Number(ev.key) - 1]) {
      pick(picks[Number(ev.key) - 1]);
    } else if (ev.key === "t" && !tieBtn.disabled) {
      tie = !tie;
      refresh();
    } else if (ev.key === "u") {
      undo();
    } else if (ev.key === "Enter" && !(t && t.tagName === "BUTTON")) {
      form.requestSubmit();
    } else if (ev.key === "s") {
      document.getElementById("skip-form").requestSubmit();
    } else {
      return;
    }
    ev.preventDefault();
  });
  refresh();
})();
"""

ENV = jinja2.Environment(
    loader=jinja2.DictLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
)


DEFAULTS = {
    "me": None,
    "csrf": "",
    "error": None,
    "previous": False,
    "exported": None,
    "show_export": False,
    "token": None,
}


def render(name: str, **ctx) -> str:
    return ENV.get_template(name).render(**(DEFAULTS | ctx))
