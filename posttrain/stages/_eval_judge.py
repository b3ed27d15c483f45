"""The evaluate stage's judge win rates (cfg.win_rate): an LLM judge's pairwise verdicts against
a baseline model, raw and length-controlled."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from posttrain.stages.base import StageContext
    from posttrain.stages.evaluate import WinRateSettings


def judge_win_rates(settings: WinRateSettings, ctx: StageContext, tasks, replies) -> dict:
    """label -> {"judge/win_rate": (value, lo, hi), "judge/lc_win_rate": (...)} against the
    baseline, from an LLM judge's pairwise verdicts (both orders unless the judge says not);
    the judgements are written to judge_<label>.jsonl."""
    from posttrain.eval.judge import Judge
    from posttrain.eval.lc_winrate import Judgements, length_controlled
    from posttrain.io import atomic_write_jsonl

    judge = Judge(settings.judge, cache_dir=ctx.stage_dir / "judge_cache")
    base = replies[settings.baseline]
    out = {}
    for label, mine in replies.items():
        if label == settings.baseline:
            continue
        items = [(t.messages(), a, b) for t, a, b in zip(tasks, mine, base, strict=True)]
        verdicts = judge.compare(items)
        pref = [{"1": 1.0, "2": 0.0, "tie": 0.5}[v.winner] for v in verdicts]
        j = Judgements([t.prompt_id for t in tasks], [label] * len(tasks), pref,
                       [len(a) - len(b) for _, a, b in items])  # fmt: skip
        fit = length_controlled(j, difficulty=None, seed=ctx.seed)[label]
        out[label] = {"judge/win_rate": fit["raw"], "judge/lc_win_rate": fit["lc"]}
        atomic_write_jsonl(ctx.stage_dir / f"judge_{label}.jsonl", [
            {"prompt_id": t.prompt_id, "model": a, "baseline": b, "winner": v.winner,
             "votes": v.votes, "judge_replies": v.raw}
            for t, (_, a, b), v in zip(tasks, items, verdicts, strict=True)])  # fmt: skip
        ctx.logger.info(f"{ctx.name}: {label} vs {settings.baseline} by the judge "
                        f"{judge.name}: win rate {fit['raw'][0]:.3f}, "
                        f"length-controlled {fit['lc'][0]:.3f}")  # fmt: skip
    return out
