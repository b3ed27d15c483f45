"""style_vs_capability: style that looks like capability, and the length-controlled win rate
that sees through it (Dubois et al. 2404.04475, "Length-Controlled AlpacaEval").

Per world seed, one policy in three styles. The SFT model is tuned once more (stage
`style_sft`) on the world's SFT data plus every open training request twice more: once under
the system prompt of `concise` with a shortened reference reply (its first `concise_words`
words, trailing function words dropped: the topic's keyword, all that gold asks for, stays),
once under the system prompt of `verbose` with the reference and `verbose_sentences` padding
sentences about the topic (PADDING, words the annotators count and gold ignores). The three
variants are that one model prompted with each style's system prompt (`standard`: none), so
their weights, and with them their capability, are the same by construction; their gold on
the held-out prompts shows it. (Three models tuned on one style each would differ in their
training noise too; the world has no decoding-time length control.)

Each variant answers the world's held-out open requests (greedy), and every annotator of the
toy's rank pool (length bias 0.1-0.3 on log1p(words), 25% flips, ties) compares its reply with
a fixed baseline, the world's reference reply, as AlpacaEval compares with a reference model.
Raw win rate: the mean preference (a tie 0.5). LC win rate: eval/lc_winrate.py's GLM per
variant, delta_len in words, the instruction difficulty fit jointly on the three variants,
regularised to the baseline (AlpacaEval's length_controlled_v1) by the annotators'
judgements of the reference made concise and verbose by the same rules (its padding drawn
from GAMED_PADDING, sentences the policy never saw), weight lambda / 2 each. The same GLM
without them (`lc_noreg`, AlpacaEval's length_controlled_noreg) is reported beside it.

Criteria (the issue's): the raw win rate's spread over the variants (max - min, pooled) is at
least 15 points; the LC spread is at most a third of it (their ratio <= 1/3). Intervals: the
lab's stratified bootstrap over held-out prompts within seeds (all of a prompt's judgements
together), every GLM refit on every resample with its seed's C and instruction difficulty
fixed (as AlpacaEval fixes both), pooled figures the mean over seeds.
"""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path

import numpy as np
from pydantic import Field, field_validator

from posttrain.lab.base import (
    Criterion,
    Lab,
    at_least,
    at_most,
    save_figure,
    write_outputs,
)
from posttrain.lab.stats import N_BOOT, Estimate
from posttrain.settings import StrictModel

NAME = "style_vs_capability"
TITLE = "Style versus capability: length-controlled win rates (Dubois et al. 2404.04475)"
STAGE, TEMPLATE, DATA_DIR, EVAL_FILE = "style_sft", "style_sft", "style_data", "style_eval.json"
RAW_SPREAD, LC_SHARE = 0.15, 1 / 3
GAMED = ("baseline_concise", "baseline_verbose")
STOPWORDS = {"a", "an", "the", "is", "are", "of", "and", "to", "from", "with", "that", "where",
             "by", "on", "at", "in", "for", "can", "be", "or", "its", "it"}  # fmt: skip
PADDING = (
    "There is a lot more to say about {t}.", "Many people like to learn about {t}.",
    "People have talked about {t} for a very long time.", "Each part of {t} has a story of its own.",
    "There are many kinds of {t} in the world.", "You can read more about {t} in books.",
    "Children often ask questions about {t}.", "Everyone has seen {t} at some time.",
)  # fmt: skip
GAMED_PADDING = (
    "Some people spend their whole lives on {t}.", "Much has been written about {t}.",
    "There is always something new to learn about {t}.", "Old stories often tell of {t}.",
    "In every land people know about {t}.", "A long talk about {t} can fill a whole day.",
)  # fmt: skip


class Settings(StrictModel):
    """The config's `lab:` section."""

    styles: dict[str, str | None] = Field(
        description="Variant -> its system prompt (null: none); exactly concise, standard, verbose."
    )
    concise_words: int = Field(3, ge=1, description="Words kept of the reference, concise style.")
    verbose_sentences: tuple[int, int] = Field(
        (2, 5), description="Padding sentences added to the reference, verbose style (min, max)."
    )
    max_new_tokens: int = Field(160, ge=1, description="Tokens a reply may have (greedy).")
    batch_size: int = Field(64, ge=1, description="Prompts decoded together.")
    lam: float = Field(0.2, ge=0, description="AlpacaEval's regularize_to_baseline_lambda.")
    n_boot: int = Field(N_BOOT, ge=0, description="Bootstrap resamples (GLMs refit on each).")

    @field_validator("styles")
    @classmethod
    def _three(cls, v: dict) -> dict:
        if list(v) != ["concise", "standard", "verbose"]:
            raise ValueError(f"must name concise, standard, verbose in that order, got {list(v)}")
        return v

    @field_validator("verbose_sentences")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= v[0] <= v[1] <= len(PADDING):
            raise ValueError(f"need 1 <= min <= max <= {len(PADDING)}, got {v}")
        return v


# ---------------------------------------------------------------- the styles


def concise(reference: str, words: int) -> str:
    """The reference's first `words` words, trailing function words dropped, and a full stop."""
    w = reference.rstrip(".").split()[:words]
    while len(w) > 1 and w[-1].lower().strip(",") in STOPWORDS:
        w = w[:-1]
    return " ".join(w).rstrip(",") + "."


def verbose(reference: str, topic: str, n: int, rng: random.Random, pool=PADDING) -> str:
    """The reference and n padding sentences about the topic, drawn without replacement."""
    return " ".join([reference, *(p.format(t=topic) for p in rng.sample(pool, n))])


def style_examples(train_tasks: list[dict], s: Settings, seed: int) -> dict[str, list[dict]]:
    """Chat examples of the styled open training requests: variant -> examples (standard:
    the world's own, for the style statistics)."""
    rng = random.Random(f"{seed}/style/train")
    out: dict[str, list[dict]] = {v: [] for v in s.styles}
    lo, hi = s.verbose_sentences
    for t in (t for t in train_tasks if t["family"] == "open"):
        replies = {"concise": concise(t["reference"], s.concise_words),
                   "standard": t["reference"],
                   "verbose": verbose(t["reference"], t["gold"]["topic"], rng.randint(lo, hi), rng)}  # fmt: skip
        for v, reply in replies.items():
            system = [{"role": "system", "content": s.styles[v]}] if s.styles[v] else []
            msgs = [*system, {"role": "user", "content": t["prompt"]},
                    {"role": "assistant", "content": reply}]  # fmt: skip
            out[v].append({"prompt_id": t["prompt_id"], "messages": msgs})
    return out


def write_style_data(seed_dir: Path, examples: dict[str, list[dict]]) -> Path:
    """The style stage's data: the world's SFT examples and the non-standard styled ones,
    rewritten only when its content changes (so the stage stays cached)."""
    from posttrain.io import atomic_write_text

    base = (seed_dir / "world" / "sft_train.jsonl").read_text()
    extra = [ex for v, exs in examples.items() if v != "standard" for ex in exs]
    text = base + "".join(json.dumps(ex, ensure_ascii=True) + "\n" for ex in extra)
    path = seed_dir / DATA_DIR / "train.jsonl"
    if not (path.is_file() and path.read_text() == text):
        atomic_write_text(path, text)
    return path


# ---------------------------------------------------------------- replies and judgements


def replies(seed_dir: Path, tasks: list[dict], s: Settings, device: str) -> dict:
    """variant -> greedy replies of the style model to `tasks`, cached in <seed>/EVAL_FILE
    under a key of the settings and the hashes of the model and tasks."""
    from posttrain.generate import SamplingParams, generate_chat
    from posttrain.io import atomic_write_json, hash_path
    from posttrain.models.load import load_model
    from posttrain.models.tokenizer import load_tokenizer

    model_dir = seed_dir / STAGE / "model"
    key = {"styles": s.styles, "max_new_tokens": s.max_new_tokens, "model": hash_path(model_dir),
           "tasks": [t["prompt_id"] + t["prompt"] for t in tasks]}  # fmt: skip
    path = seed_dir / EVAL_FILE
    if path.is_file() and (found := json.loads(path.read_text())).get("key") == key:
        return found["replies"]
    model, tok = load_model(model_dir, device).eval(), load_tokenizer(model_dir)
    params = SamplingParams(max_new_tokens=s.max_new_tokens, greedy=True, batch_size=s.batch_size)
    out = {}
    for v, system in s.styles.items():
        sys_msg = [{"role": "system", "content": system}] if system else []
        convs = [[*sys_msg, {"role": "user", "content": t["prompt"]}] for t in tasks]
        out[v] = [g.text.strip() for g in generate_chat(model, tok, convs, params)]
    atomic_write_json(path, {"key": key, "replies": out})
    return out


def judge(tasks: list[dict], texts: dict[str, list[str]], pool) -> tuple[np.ndarray, np.ndarray]:
    """(pref, delta), both (P, G, A): every annotator's preference for generator g's reply
    over the reference (1 win, 0 loss, 0.5 tie) and its length minus the reference's, in words."""
    G, A = len(texts), len(pool.annotators)
    pref, delta = np.zeros((len(tasks), G, A)), np.zeros((len(tasks), G, A))
    for p, t in enumerate(tasks):
        for g, reply in enumerate(r[p] for r in texts.values()):
            recs = pool.rank(t, [reply, t["reference"]])
            if len(recs) != A:
                raise ValueError(f"{NAME}: every annotator must judge every prompt "
                                 "(set rank.pool.per_prompt to the number of annotators)")  # fmt: skip
            for a, rec in enumerate(recs):
                first = rec["order"][0]
                pref[p, g, a] = 0.5 if isinstance(first, list) else float(first == 0)
            delta[p, g, :] = len(reply.split()) - len(t["reference"].split())
    return pref, delta


def gamed_replies(tasks: list[dict], s: Settings, seed: int) -> dict[str, list[str]]:
    """The baseline (the reference) made concise and verbose by the styles' rules, its padding
    from GAMED_PADDING: AlpacaEval's gamed baselines."""
    rng = random.Random(f"{seed}/style/gamed")
    lo, hi = s.verbose_sentences
    return {"baseline_concise": [concise(t["reference"], s.concise_words) for t in tasks],
            "baseline_verbose": [verbose(t["reference"], t["gold"]["topic"],
                                         rng.randint(lo, min(hi, len(GAMED_PADDING))), rng,
                                         GAMED_PADDING) for t in tasks]}  # fmt: skip


# ---------------------------------------------------------------- figures


class SeedData:
    """One seed's per-prompt measurements, packed into one (P, F) array so that a bootstrap
    resample of prompts keeps each prompt's columns together: pref and delta (G, A) each, the
    instruction difficulty gamma, and the variants' gold and words (V each)."""

    def __init__(self, G: int, A: int, V: int):
        self.G, self.A, self.V = G, A, V

    def pack(self, pref, delta, gamma, gold, words) -> np.ndarray:
        P = len(gamma)
        return np.concatenate([pref.reshape(P, -1), delta.reshape(P, -1), gamma[:, None],
                               gold, words], 1)  # fmt: skip

    def unpack(self, arr: np.ndarray):
        P, GA = len(arr), self.G * self.A
        pref = arr[:, :GA].reshape(P, self.G, self.A)
        delta = arr[:, GA : 2 * GA].reshape(P, self.G, self.A)
        gold = arr[:, 2 * GA + 1 : 2 * GA + 1 + self.V]
        return pref, delta, arr[:, 2 * GA], gold, arr[:, 2 * GA + 1 + self.V :]


def judgements(pref, delta, gens: dict[int, str]):
    """The judgements of generators gens (index -> name), rows prompt-major and annotator-minor
    per generator, instructions numbered by position (the difficulty is looked up by it)."""
    from posttrain.eval.lc_winrate import Judgements, concat

    P, A = pref.shape[0], pref.shape[2]
    return concat([Judgements(np.repeat(np.arange(P), A), [name] * (P * A), pref[:, g].ravel(),
                              delta[:, g].ravel()) for g, name in gens.items()])  # fmt: skip


def seed_figures(arr: np.ndarray, sd: SeedData, variants: list[str], Cs: dict, lam: float) -> dict:
    """Every figure of one seed from its packed array: per variant raw, LC (regularised to the
    gamed baselines, and not), gold and mean words; fits at the given C per (kind, variant)."""
    from posttrain.eval.lc_winrate import fit_glm

    pref, delta, gamma, gold, words = sd.unpack(arr)
    diff = dict(enumerate(gamma))
    gamed = judgements(pref, delta, {len(variants) + k: n for k, n in enumerate(GAMED)})
    out = {}
    for v, name in enumerate(variants):
        j = judgements(pref, delta, {v: name})
        out[f"raw[{name}]"] = float(pref[:, v].mean())
        for kind, g in (("lc", gamed), ("lc_noreg", None)):
            fit = fit_glm(j, diff, g, lam, C=Cs[kind][name])
            out[f"{kind}[{name}]"] = fit.lc
            out |= {f"{k}_{kind}[{name}]": getattr(fit, k) for k in ("theta", "phi", "psi")}
        out[f"gold[{name}]"] = float(gold[:, v].mean())
        out[f"words[{name}]"] = float(words[:, v].mean())
    return out


def spreads(f: dict, variants: list[str]) -> dict:
    """max - min over the variants of raw, LC, LC without the gamed baselines and gold; the
    LC spreads as shares of the raw spread."""
    out = {}
    for kind in ("raw", "lc", "lc_noreg", "gold"):
        vals = [f[f"{kind}[{v}]"] for v in variants]
        out[f"{kind}_spread"] = max(vals) - min(vals)
    for kind in ("lc", "lc_noreg"):
        raw = out["raw_spread"]
        out[f"{kind}_ratio"] = out[f"{kind}_spread"] / raw if raw > 0 else float("nan")
    return out


def pooled(per_seed: list[dict], variants: list[str]) -> dict:
    """Figures pooled over seeds: each per-variant figure the mean over seeds (seeds weighted
    equally), the spreads recomputed from those means."""
    keys = [k for k in per_seed[0] if "[" in k]
    out = {k: float(np.mean([f[k] for f in per_seed])) for k in keys}
    return out | spreads(out, variants)


def bootstrap_figures(groups: list[np.ndarray], fn, n_boot: int, seed: int = 0,
                      level: float = 0.95) -> dict[str, Estimate]:  # fmt: skip
    """posttrain.lab.stats.bootstrap for a statistic returning many figures at once (each
    resample refits the GLMs once for all of them): the same stratified resampling of prompts
    within each seed, the same percentile interval, and the same rule that an interval with
    more than a tenth of its resamples not finite is (nan, nan)."""
    value = fn(groups)
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in value}
    for _ in range(n_boot):
        f = fn([g[rng.integers(0, len(g), len(g))] for g in groups])
        for k in draws:
            draws[k].append(f[k])
    a = (1 - level) / 2
    out = {}
    for k, v in value.items():
        d = np.asarray(draws[k], float)
        d = d[np.isfinite(d)]
        lo, hi = np.quantile(d, [a, 1 - a]) if n_boot and len(d) >= 0.9 * n_boot else (np.nan,) * 2
        out[k] = Estimate(float(v), float(lo), float(hi))
    return out


def choose_Cs(arr: np.ndarray, sd: SeedData, variants: list[str], lam: float) -> tuple[dict, dict]:
    """One seed's instruction difficulty (joint fit on the variants) and each GLM's C by
    cross-validation on all of its prompts; kind -> variant -> C, and prompt -> gamma."""
    from posttrain.eval.lc_winrate import fit_glm, instruction_difficulty

    pref, delta, _, _, _ = sd.unpack(arr)
    gamma = instruction_difficulty(judgements(pref, delta, dict(enumerate(variants))))
    gamed = judgements(pref, delta, {len(variants) + k: n for k, n in enumerate(GAMED)})
    Cs = {kind: {n: fit_glm(judgements(pref, delta, {v: n}), gamma, g, lam).C
                 for v, n in enumerate(variants)}
          for kind, g in (("lc", gamed), ("lc_noreg", None))}  # fmt: skip
    return Cs, gamma


# ---------------------------------------------------------------- the experiment


def prepare(lab: Lab, seed: int, raw: dict, template: dict, s: Settings, device: str):
    """One seed: the style stage (cached), the variants' replies and every judgement. Returns
    (packed array without gamma, SeedData, info)."""
    from posttrain.data.curate import style_stats
    from posttrain.io import read_jsonl
    from posttrain.world import check
    from posttrain.world.annotators import Pool, PoolConfig

    seed_dir = lab.run_stages(seed, raw, [])
    train = list(read_jsonl(seed_dir / "world" / "tasks_train.jsonl"))
    tasks = [
        t for t in read_jsonl(seed_dir / "world" / "tasks_eval.jsonl") if t["family"] == "open"
    ]
    examples = style_examples(train, s, seed)
    sec = copy.deepcopy(template) | {"kind": "sft"}
    sec["data"] = dict(sec.get("data") or {}) | {"path": str(write_style_data(seed_dir, examples).resolve())}  # fmt: skip
    lab.run_stages(seed, raw | {STAGE: sec}, [STAGE])
    texts = replies(seed_dir, tasks, s, device) | gamed_replies(tasks, s, seed)
    pool = Pool(PoolConfig(**(dict(raw["rank"]["pool"]) | {"seed": seed})))
    pref, delta = judge(tasks, texts, pool)
    variants = list(s.styles)
    gold = np.array([[check(t, texts[v][p]).score for v in variants] for p, t in enumerate(tasks)])
    words = np.array([[len(texts[v][p].split()) for v in variants] for p in range(len(tasks))])
    sd = SeedData(len(texts), len(pool.annotators), len(variants))
    info = {"prompts": len(tasks), "annotators": [a.name for a in pool.annotators],
            "style_data": {v: style_stats(exs) for v, exs in examples.items()},
            "examples": [{"prompt": t["prompt"], "reference": t["reference"]}
                         | {g: texts[g][p] for g in texts} for p, t in enumerate(tasks[:3])]}  # fmt: skip
    return sd.pack(pref, delta, np.zeros(len(tasks)), gold, words), sd, info


def run(lab: Lab) -> dict:
    started = time.perf_counter()
    from posttrain.models.load import resolve_device

    raw, s, template = lab.settings(NAME, Settings, TEMPLATE, "the style stage's sft section")
    variants, device = list(s.styles), resolve_device(raw.get("device", "auto"))
    arrays, Cs, info, sd = {}, {}, {}, None
    for seed in lab.seeds:
        arr, sd, info[seed] = prepare(lab, seed, raw, template, s, device)
        Cs[seed], gamma = choose_Cs(arr, sd, variants, s.lam)
        arr[:, 2 * sd.G * sd.A] = [gamma[p] for p in range(len(arr))]
        arrays[seed] = arr
        info[seed]["C"] = Cs[seed]
        f = seed_figures(arr, sd, variants, Cs[seed], s.lam)
        lab.logger.info(f"{NAME}: seed {seed}: " + "; ".join(
            f"{v} words {f[f'words[{v}]']:.1f} gold {f[f'gold[{v}]']:.2f} raw {f[f'raw[{v}]']:.3f} "
            f"LC {f[f'lc[{v}]']:.3f}" for v in variants))  # fmt: skip
    seeds = list(arrays)

    def pooled_fn(gs):
        return pooled([seed_figures(g, sd, variants, Cs[sd_], s.lam)
                       for g, sd_ in zip(gs, seeds, strict=True)], variants)  # fmt: skip

    figures = {"variants": variants, "styles": s.styles, "baseline": "the world's reference reply",
               "pooled": bootstrap_figures([arrays[x] for x in seeds], pooled_fn, s.n_boot),
               "per_seed": {}}  # fmt: skip
    for x in seeds:
        fn = lambda gs, x=x: pooled([seed_figures(gs[0], sd, variants, Cs[x], s.lam)], variants)  # noqa: E731
        figures["per_seed"][x] = {"figures": bootstrap_figures([arrays[x]], fn, s.n_boot)} | info[x]
    criteria = _criteria(figures["pooled"])
    plots = _plot(lab, figures, variants)
    return write_outputs(lab, NAME, TITLE, figures, criteria, plots, started=started,
                         body=_body(figures, variants, seeds))  # fmt: skip


def _criteria(P: dict) -> list[Criterion]:
    return [
        at_least("raw_spread", "the raw win rate moves with style: max - min over concise, "
                 "standard and verbose is at least 15 points", P["raw_spread"], RAW_SPREAD),
        at_most("lc_spread_share", "the length-controlled win rate does not: its spread is at "
                "most a third of the raw spread (LC spread / raw spread)", P["lc_ratio"], LC_SHARE),
    ]  # fmt: skip


def _est(e: Estimate, pct: bool = False) -> str:
    k = 100 if pct else 1
    return f"{k * e.value:.3g} [{k * e.lo:.3g}, {k * e.hi:.3g}]"


def _body(fig: dict, variants: list[str], seeds: list) -> str:
    P = fig["pooled"]
    rows = ["| variant | system prompt | words | gold | raw win rate | LC win rate | LC, no "
            "regularisation to the baseline |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for v in variants:
        rows.append(f"| {v} | {fig['styles'][v] or '(none)'} | {P[f'words[{v}]'].value:.1f} | "
                    + " | ".join(_est(P[f"{k}[{v}]"]) for k in ("gold", "raw", "lc", "lc_noreg"))
                    + " |")  # fmt: skip
    rows += ["", "Spreads (max - min over the variants): " + "; ".join(
        f"{k} {_est(P[f'{k}_spread'])}" for k in ("raw", "lc", "lc_noreg", "gold"))
        + f". LC spread / raw spread {_est(P['lc_ratio'])}; without the regularisation "
        f"{_est(P['lc_noreg_ratio'])}.", "",
        "GLM per seed (logit = theta + phi tanh(delta words / std) + psi gamma; C chosen by "
        "5-fold cross-validation):", "",
        "| seed | variant | theta | phi | psi | C | theta, no reg. | phi, no reg. | C, no reg. |",
        "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for x in seeds:
        f, C = fig["per_seed"][x]["figures"], fig["per_seed"][x]["C"]
        for v in variants:
            rows.append(f"| {x} | {v} | " + " | ".join(
                f"{f[f'{k}_{kind}[{v}]'].value:.3g}" for kind in ("lc",) for k in ("theta", "phi", "psi"))
                + f" | {C['lc'][v]:.3g} | {f[f'theta_lc_noreg[{v}]'].value:.3g} | "
                f"{f[f'phi_lc_noreg[{v}]'].value:.3g} | {C['lc_noreg'][v]:.3g} |")  # fmt: skip
    first = fig["per_seed"][seeds[0]]
    rows += ["", f"Style statistics of the style stage's open-request replies (seed {seeds[0]}; "
             "posttrain/data/curate.py `style_stats`, as `posttrain data curate` prints them):", "",
             "| variant | replies | mean words | median words | bullet share | markdown share |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for v, st in first["style_data"].items():
        rows.append(f"| {v} | {st['style/replies']} | {st['style/mean_words']:.1f} | "
                    f"{st['style/median_words']:.1f} | {st['style/bullet_share']:.2f} | "
                    f"{st['style/markdown_share']:.2f} |")  # fmt: skip
    rows += ["", f"Replies to the first held-out prompts (seed {seeds[0]}):", ""]
    for ex in first["examples"]:
        rows.append(f"- *{ex['prompt']}* reference: {ex['reference']!r}; "
                    + "; ".join(f"{v}: {ex[v]!r}" for v in variants))  # fmt: skip
    return "\n".join(rows)


def _plot(lab: Lab, fig: dict, variants: list[str]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    P = fig["pooled"]
    f, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    kinds = {"raw": "raw win rate", "lc": "LC win rate", "lc_noreg": "LC, no reg. to baseline"}
    x = np.arange(len(variants))
    for i, (k, label) in enumerate(kinds.items()):
        e = [P[f"{k}[{v}]"] for v in variants]
        ax1.bar(x + (i - 1) * 0.27, [a.value for a in e], 0.27, label=label,
                yerr=[[a.value - a.lo for a in e], [a.hi - a.value for a in e]], capsize=3)  # fmt: skip
    ax1.plot(x, [P[f"gold[{v}]"].value for v in variants], "kD", label="gold (capability)")
    ax1.axhline(0.5, color="grey", ls=":")
    ax1.set(xticks=x, xticklabels=variants, ylim=(0, 1.3), ylabel="against the reference",
            title="one policy, three styles")  # fmt: skip
    ax1.legend(fontsize=8, ncol=2, loc="upper center")
    words = [P[f"words[{v}]"].value for v in variants]
    for k in ("raw", "lc"):
        e = [P[f"{k}[{v}]"] for v in variants]
        ax2.errorbar(words, [a.value for a in e], [[a.value - a.lo for a in e],
                     [a.hi - a.value for a in e]], fmt="o-", capsize=3, label=kinds[k])  # fmt: skip
    for w, v in zip(words, variants, strict=True):
        ax2.annotate(v, (w, 0.02), xycoords=("data", "axes fraction"), ha="center")
    ax2.axhline(0.5, color="grey", ls=":")
    ax2.set(xlabel="mean reply length (words)", ylabel="win rate", title="win rate by length")
    ax2.legend(fontsize=8)
    save_figure(f, lab.out / NAME / "plots" / "winrates.png")
    return {"winrates.png": "Left: raw and length-controlled win rates against the world's "
            "reference reply (95% intervals) and gold of each style of the same policy. Right: "
            "the same against mean reply length. Look for the raw win rate climbing with length "
            "while the LC win rate and gold stay flat."}  # fmt: skip
