"""The report's story: one generated sentence per stage (what went in, what it did, the key figure
that came out), from report.json alone: its stages' metrics, their settings and the card."""

from __future__ import annotations

from posttrain.eval.intervals import REFERENCE
from posttrain.report.card import verdict
from posttrain.report.glossary import fmt, fmt_ci, fmt_signed, spec

DPO_LOSSES = {"sigmoid": "DPO", "ipo": "IPO", "hinge": "SLiC (hinge)", "simpo": "SimPO",
              "orpo": "ORPO"}  # fmt: skip
RL_REWARDS = {"reward_model": "the learned reward", "verifier": "the gold checker (a verifier)",
              "gsm8k": "GSM8K's answer checker", "function": "a reward function"}  # fmt: skip


def _part(m: dict, template: str, *keys: str) -> str:
    """template.format(*values) when every key is in m (numbers rounded for reading), else ""."""
    if not all(m.get(k) is not None for k in keys):
        return ""
    return template.format(*(fmt(m[k]) if isinstance(m[k], int | float) else m[k] for k in keys))


def _join(*parts: str, sep: str = ", ") -> str:
    return sep.join(p for p in parts if p)


def evaluated_as(report: dict, stage: str) -> list[str]:
    """The card's labels whose model is this stage's (greedy, chat), in card order."""
    out = []
    for ev_stage, s in report.get("settings", {}).items():
        if report["stages"].get(ev_stage, {}).get("kind") != "evaluate":
            continue
        for key, model in s.items():
            if key.startswith("models.") and key.endswith(".model") and model == stage:
                label = key[len("models.") : -len(".model")]
                if (
                    s.get(f"models.{label}.policy", "greedy") == "greedy"
                    and label in report["evals"]
                ):
                    out.append(label)
    return out


def card_change(report: dict, label: str, key: str = "gold/mean") -> str:
    """ "gold sft 0.838 -> dpo 0.842 (+0.004 [-0.016, +0.025], within noise)", from the card."""
    evals = report["evals"]
    m = evals.get(label, {})
    if key not in m:
        return ""
    name = key.split("/")[0]
    ref = evals.get(REFERENCE, {})
    diff = m.get(f"vs_{REFERENCE}", {}).get(key)
    if label == REFERENCE or key not in ref or diff is None:
        return f"on the card {name} {fmt(m[key])} {fmt_ci(m.get('ci95', {}).get(key))}".rstrip()
    d, lo, hi = diff
    said = verdict(diff, spec(key).better)
    return (f"{name} {REFERENCE} {fmt(ref[key])} -> {label} {fmt(m[key])} ({fmt_signed(d)} "
            f"[{fmt_signed(lo)}, {fmt_signed(hi)}], {said})")  # fmt: skip


def _card(report: dict, stage: str, against: bool = True) -> str:
    """The card's word on the models this stage made: against the reference (SFT) for the
    stages after it, else the plain value with its interval."""
    labels = evaluated_as(report, stage)
    if against:
        return "; ".join(card_change(report, label) for label in labels)
    found = [(x, report["evals"][x]) for x in labels if "gold/mean" in report["evals"][x]]
    return ("on the card gold " + ", ".join(
        f"{x} {fmt(m['gold/mean'])} {fmt_ci(m.get('ci95', {}).get('gold/mean'))}".rstrip()
        for x, m in found)) if found else ""  # fmt: skip


def _pct(m: dict, template: str, key: str) -> str:
    """template.format("62%") for a share in [0, 1]."""
    return template.format(f"{m[key]:.0%}") if isinstance(m.get(key), int | float) else ""


def _set(v) -> str:
    """A setting as the config file spells it (0.3, 2e-05, sft)."""
    return str(v)


def _world(m, s, report, stage):
    return "Built the toy world: " + _join(
        _part(m, "{} fictional people ({} known to the corpus)", "world/entities",
              "world/known_entities"),
        _part(m, "a pre-training corpus of {} documents ({} tokens, {} of them conversations)",
              "world/corpus_docs", "world/corpus_tokens", "world/corpus_chat_docs"),
        _part(m, "{} SFT, {} RL and {} held-out prompts", "world/tasks_train", "world/tasks_rl",
              "world/tasks_eval"))  # fmt: skip


def _pretrain(m, s, report, stage):
    return _join(
        f"Pre-trained {s.get('model', 'a model')}"
        + _part(m, " on {} tokens ({} steps, {} epochs)", "train/tokens", "train/steps", "train/epochs"),
        _part(m, "final train loss {}", "train/loss"),
        _part(m, "held-out perplexity {}", "eval/perplexity"),
        _part(m, "few-shot gold {}", "eval/gold/mean"), _card(report, stage, False), sep="; ")  # fmt: skip


def _sft(m, s, report, stage):
    return _join(
        f"Fine-tuned {s.get('model', 'the base')} on "
        + _part(m, "{} conversations", "data/kept") + _part(m, " ({} steps)", "train/steps"),
        _part(m, "held-out loss {}", "eval/loss"), _card(report, stage, False), sep="; ")  # fmt: skip


def _sample(m, s, report, stage):
    n = s.get("n")
    return _join(
        f"Sampled {n} responses per prompt from {s.get('model')} at temperature "
        f"{_set(s.get('temperature'))}" + _part(m, " for {} prompts ({} candidates)", "sample/prompts",
                                          "sample/candidates"),
        _part(m, "mean gold {}", "sample/gold_mean"),
        _part(m, f"the best of {n} by gold {{}}", "sample/gold_best_of_n"),
        _pct(m, "{} of prompts have candidates that differ in gold", "sample/gold_spread_frac"),
        sep="; ")  # fmt: skip


def _rank(m, s, report, stage):
    pool = s.get("pool.annotators")
    n = (
        len(pool)
        if isinstance(pool, list)
        else sum(k.startswith("rank/agreement_gold/") for k in m)
    )
    who = "human labels" if s.get("labels") else f"{n} simulated annotators"
    return _join(
        f"Ranked the candidates with {who}" + _part(m, ": {} rankings of {} prompts",
                                                     "rank/rankings", "rank/prompts"),
        _part(m, "{} preference pairs", "rank/pairs"),
        _part(m, "agreement with gold {}", "rank/agreement_gold"),
        _part(m, "between annotators Cohen's kappa {}", "rank/kappa_mean"),
        _pct(m, "the longer response won {} of the pairs", "rank/longer_wins"), sep="; ")  # fmt: skip


def _reward(m, s, report, stage):
    return _join(
        f"Trained a reward model from {s.get('model')}" + _part(m, " on {} pairs",
                                                                 "data/train_pairs"),
        _part(m, "held-out accuracy {} on the annotators' labels", "eval/accuracy"),
        _part(m, "agreement with gold {} on {} gold-gap pairs", "eval/gold_agreement",
              "eval/gold_pairs"),
        _part(m, "reward-length correlation {}", "eval/length_corr"), sep="; ")  # fmt: skip


def _dpo(m, s, report, stage):
    loss = DPO_LOSSES.get(s.get("loss"), s.get("loss") or "DPO")
    return _join(
        f"{loss} (beta {_set(s.get('beta'))}) from {s.get('model')}"
        + _part(m, " on {} pairs", "data/train_pairs"),
        _part(m, "held-out pair accuracy {}", "eval/rewards/accuracy"),
        _part(m, "held-out margin {}", "eval/rewards/margin"), _card(report, stage), sep="; ")  # fmt: skip


def _kto(m, s, report, stage):
    return _join(
        f"KTO (beta {_set(s.get('beta'))}) from {s.get('model')}"
        + _part(m, " on {} replies ({} desirable)", "data/train_replies", "data/desirable"),
        _part(m, "final train loss {}", "train/loss"), _card(report, stage), sep="; ")  # fmt: skip


def _rl(m, s, report, stage):
    reward = RL_REWARDS.get(s.get("reward.kind"), s.get("reward.kind"))
    k = s.get("rollout.k")
    return _join(
        f"{m['kind'].upper().replace('_', ' ')} from {s.get('model')} on {reward}: "
        f"{s.get('steps')} steps of {s.get('rollout.prompts_per_step')} prompts"
        + (f" x {k} samples" if k and k > 1 else "") + f", KL coefficient {_set(s.get('kl.coef'))}",
        _part(m, "held-out reward {} -> {}", "eval/initial_reward", "eval/reward"),
        _part(m, "its own held-out gold {} -> {}", "eval/initial_gold", "eval/gold"),
        _part(m, "KL to the reference {} nats", "kl/ref"), _card(report, stage), sep="; ")  # fmt: skip


def _best_of_n(m, s, report, stage):
    return _join(
        _part(m, "Best-of-{} under the reward model on {} prompts", "bon/n", "bon/prompts"),
        _part(m, "reward of the chosen {} against {} over all samples", "bon/reward_best",
              "bon/reward_mean"),
        _part(m, "gold of the chosen {} against {}", "bon/gold_best", "bon/gold_mean"), sep="; ")  # fmt: skip


def _evaluate(m, s, report, stage):
    labels = [x for x in report["evals"] if f"models.{x}.model" in s] or list(report["evals"])
    evals = {x: report["evals"][x] for x in labels if x in report["evals"]}
    n = max((report.get("eval_prompts", {}).get(x) or 0 for x in labels), default=0)
    parts = [f"Evaluated {len(evals)} models" + (f" on {n:,} held-out prompts" if n else "")]
    golds = {x: e["gold/mean"] for x, e in evals.items() if "gold/mean" in e}
    if golds:
        top = max(golds, key=golds.get)
        parts.append(f"highest gold {top} {fmt(golds[top])} "
                     f"{fmt_ci(evals[top].get('ci95', {}).get('gold/mean'))}".rstrip())  # fmt: skip
    said = {x: verdict(e.get(f"vs_{REFERENCE}", {}).get("gold/mean"), 1) for x, e in evals.items()}
    noise = [x for x, v in said.items() if v == "within noise"]
    beyond = [f"{x} ({v})" for x, v in said.items() if v in ("better", "worse")]
    if noise or beyond:
        parts.append(f"gold against {REFERENCE}: " + _join(
            f"within noise for {', '.join(noise)}" if noise else "",
            f"beyond noise for {', '.join(beyond)}" if beyond else ""))  # fmt: skip
    return "; ".join(parts)


def _self_instruct(m, s, report, stage):
    dropped = {k.rsplit("/", 1)[1]: v for k, v in m.items()
               if k.startswith("self_instruct/instructions_dropped/")}  # fmt: skip
    why = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in sorted(dropped.items(),
                                                                  key=lambda kv: -kv[1]))  # fmt: skip
    return _join(
        f"{s.get('proposer') or s.get('teacher')} wrote new instructions and "
        f"{s.get('teacher')} answered them"
        + _part(m, ": {} conversations", "self_instruct/examples_written")
        + _part(m, " from {} proposed in {} rounds", "self_instruct/instructions_proposed",
                "self_instruct/rounds"),
        f"dropped {why}" if why else "", sep="; ")  # fmt: skip


SENTENCES = {"world": _world, "self_instruct": _self_instruct, "pretrain": _pretrain, "sft": _sft, "sample": _sample, "rank": _rank,
             "reward": _reward, "dpo": _dpo, "kto": _kto, "ppo": _rl, "grpo": _rl, "rloo": _rl,
             "online_dpo": _rl, "best_of_n": _best_of_n, "evaluate": _evaluate}  # fmt: skip


def stage_sentence(report: dict, stage: str) -> str:
    """One sentence for one stage; a kind without its own falls back to its first figures."""
    m = report["stages"][stage]
    s = report.get("settings", {}).get(stage, {})
    make = SENTENCES.get(m["kind"])
    text = make(m, s, report, stage) if make else ""
    if not text:
        figures = [(k, v) for k, v in m.items() if k not in ("kind", "seconds")][:3]
        text = f"{m['kind']}: " + ", ".join(f"{k} {fmt(v)}" for k, v in figures)
    return text.rstrip(".; ") + "."


def summary(report: dict) -> dict[str, str]:
    return {stage: stage_sentence(report, stage) for stage in report["stages"]}
