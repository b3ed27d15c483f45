"""The rank stage: annotators order each prompt's candidates; rankings become preference pairs.

Input: a sample stage's `candidates.jsonl`. Labels come from a simulated annotator pool
(`pool:`, see posttrain.world.annotators) or from human rankings exported by the annotation app
(`labels:`, a rankings.jsonl). Writes

- `rankings.jsonl`: `{"prompt_id", "annotator", "group", "order"}`, order best first, a tie as a
  list of candidate indices;
- `pairs.jsonl`: `{"prompt_id", "messages", "chosen", "rejected", "annotator", "margin"?}`.

Pairs come from each prompt's consensus ranking (`pairs.aggregate: borda`, the mean tier of each
candidate over the prompt's annotators; equal means tie) or from every annotator's ranking
(`each`); the strategy picks all ordered pairs, best-vs-worst, or adjacent tiers; tied
candidates never form a pair. `margin` is the tier distance (or Borda-score gap).

Reported: agreement of each annotator with gold (on candidate pairs with a gold gap; a tie counts
one half), Cohen's kappa for every pair of annotators on the candidate pairs both labelled,
Krippendorff's alpha for the pool, the share of pairs whose chosen response is the longer one,
and the gold gap between chosen and rejected; and, when the annotators come from two or more
groups, the same per group (gold agreement, Fleiss' kappa within each group, Cohen's kappa
within and between groups, longer-wins share: stages/_annotator_groups.py).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from posttrain.eval.judge import JudgeConfig
from posttrain.settings import SettingError, StrictModel, is_set
from posttrain.stages._annotator_groups import group_metrics
from posttrain.stages.base import StageContext, StageResult, resolve_input
from posttrain.world.annotators import AnnotatorConfig, PoolConfig


def default_pool() -> PoolConfig:
    """Three annotators, each flipping 25% of pairwise labels (AlpacaFarm's noise level), with a
    mild length bias of differing strength (a small population whose tastes differ a little),
    who call two responses a tie when their utilities differ by at most 0.25, as people say
    "about the same" of two equally good answers."""
    return PoolConfig(
        annotators=[
            AnnotatorConfig(
                name="a1", group="g1", length=0.1, noise=0.25, temperature=0.1, tie_margin=0.25
            ),
            AnnotatorConfig(
                name="a2", group="g1", length=0.2, noise=0.25, temperature=0.1, tie_margin=0.25
            ),
            AnnotatorConfig(
                name="a3", group="g2", length=0.3, noise=0.25, temperature=0.1, tie_margin=0.25
            ),
        ],
        per_prompt=3,
        seed=0,
    )


class PairSettings(StrictModel):
    strategy: Literal["all", "best_worst", "adjacent"] = Field(
        "all", description="Which pairs a ranking yields: all, best-vs-worst, adjacent tiers."
    )
    aggregate: Literal["borda", "each"] = Field(
        "borda",
        description="Pairs from each prompt's consensus ranking, or from every annotator's.",
    )
    min_margin: float = Field(
        0.0, ge=0, description="Drop pairs whose margin (tier distance) is below this."
    )
    margin: bool = Field(True, description="Write each pair's margin into pairs.jsonl.")


class Config(StrictModel):
    candidates: str | None = Field(
        None, description="candidates.jsonl to rank (default: the sample stage's)."
    )
    sample_stage: str = Field("sample", description="Stage whose candidates.jsonl is ranked.")
    world_stage: str = Field("world", description="Stage holding the world's task files (gold).")
    labels: str | None = Field(
        None, description="Human rankings.jsonl to use instead of the simulated pool."
    )
    pool: PoolConfig = Field(default_factory=default_pool, description="Simulated annotators.")
    judge: JudgeConfig | None = Field(
        None,
        description="An LLM judge ranks the candidates instead of the simulated pool (RLAIF): "
        "every pair compared (in both orders by default), ranked by wins + half the ties.",
        exclude_if=lambda v: v is None,
    )
    pairs: PairSettings = Field(default_factory=PairSettings, description="Pair building.")

    @model_validator(mode="after")
    def _labels_or_pool(self) -> Config:
        if self.labels is not None and is_set(self, "pool"):
            raise SettingError("pool", "{at}labels names human rankings, which are used instead "
                               "of the simulated pool: drop one")  # fmt: skip
        if self.judge is not None and self.labels is not None:
            raise SettingError("judge", "{at}and {at}labels both replace the simulated pool: "
                               "give one")  # fmt: skip
        if self.judge is not None and is_set(self, "pool"):
            raise SettingError("pool", "{at}judge ranks the candidates instead of the simulated "
                               "pool: drop one")  # fmt: skip
        return self


def inputs(cfg: Config, ctx: StageContext) -> dict[str, Path]:
    found = {"candidates": resolve_input(cfg.candidates, ctx, cfg.sample_stage, "candidates.jsonl")}
    if cfg.labels:
        found["labels"] = Path(cfg.labels)
    elif cfg.judge is not None:
        pass  # the judge is part of the settings (a local judge's weights: its client's cache key)
    else:
        found["world"] = ctx.stage_path(cfg.world_stage, "config.yaml")
    return found


# ----------------------------------------------------------------------------- orders and pairs


def tiers(order: list) -> list[list[int]]:
    """[2, [0, 3], 1] -> [[2], [0, 3], [1]]."""
    return [list(x) if isinstance(x, list) else [x] for x in order]


def check_order(order, n: int, where: str) -> None:
    """An order must name every candidate index 0..n-1 exactly once."""
    if not isinstance(order, list) or not order:
        raise ValueError(f"{where}: 'order' must be a non-empty list")
    flat = [i for t in tiers(order) for i in t]
    if any(not isinstance(i, int) or isinstance(i, bool) for i in flat):
        raise ValueError(f"{where}: 'order' must hold candidate indices (ints or lists of ints)")
    if sorted(flat) != list(range(n)):
        raise ValueError(
            f"{where}: 'order' {order} is not a permutation of the {n} candidates 0..{n - 1}"
        )


def borda(orders: list[list]) -> list:
    """Consensus order: candidates sorted by their mean tier across orders; equal means tie."""
    pos: dict[int, list[int]] = defaultdict(list)
    for order in orders:
        for t, group in enumerate(tiers(order)):
            for i in group:
                pos[i].append(t)
    mean = {i: sum(p) / len(p) for i, p in pos.items()}
    out = []
    for _, group in itertools.groupby(sorted(mean, key=lambda i: (mean[i], i)), key=mean.get):
        g = sorted(group)
        out.append(g[0] if len(g) == 1 else g)
    return out


def order_pairs(order: list, strategy: str) -> list[tuple[int, int, int]]:
    """(chosen, rejected, tier distance) for the strategy; tied candidates never pair."""
    ts = tiers(order)
    if len(ts) < 2:
        return []
    if strategy == "best_worst":
        tier_pairs = [(0, len(ts) - 1)]
    elif strategy == "adjacent":
        tier_pairs = [(a, a + 1) for a in range(len(ts) - 1)]
    else:
        tier_pairs = list(itertools.combinations(range(len(ts)), 2))
    return [(i, j, b - a) for a, b in tier_pairs for i in ts[a] for j in ts[b]]


def build_pairs(cands: dict[str, dict], rankings: list[dict], settings: PairSettings) -> list[dict]:
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for r in rankings:
        by_prompt[r["prompt_id"]].append(r)
    out = []
    for pid, rs in by_prompt.items():
        rec = cands[pid]
        if settings.aggregate == "borda":
            sources = [(borda([r["order"] for r in rs]), "+".join(r["annotator"] for r in rs))]
        else:
            sources = [(r["order"], r["annotator"]) for r in rs]
        # An empty reply ranks like any other; it just cannot stand in a pair record.
        for order, who in sources:
            for i, j, dist in order_pairs(order, settings.strategy):
                if dist < settings.min_margin:
                    continue
                chosen, rejected = rec["responses"][i]["text"], rec["responses"][j]["text"]
                if chosen == rejected:  # identical samples carry no preference
                    continue
                if not chosen.strip() or not rejected.strip():  # an empty reply makes no pair
                    continue
                pair = {"prompt_id": pid, "messages": rec["messages"], "chosen": chosen,
                        "rejected": rejected, "annotator": who, "candidates": [i, j]}  # fmt: skip
                if settings.margin:
                    pair["margin"] = float(dist)
                out.append(pair)
    return out


# ----------------------------------------------------------------------------- agreement


def pair_labels(rankings: list[dict]) -> dict[str, dict[tuple, str]]:
    """annotator -> {(prompt_id, i, j): "i" | "j" | "tie"} over all candidate pairs i < j."""
    from posttrain.eval.agreement import pair_label

    out: dict[str, dict[tuple, str]] = defaultdict(dict)
    for r in rankings:
        idx = sorted(i for t in tiers(r["order"]) for i in t)
        for i, j in itertools.combinations(idx, 2):
            out[r["annotator"]][(r["prompt_id"], i, j)] = pair_label(r["order"], i, j)
    return out


def agreement_metrics(rankings: list[dict], cands: dict[str, dict]) -> dict[str, float]:
    from posttrain.eval.agreement import cohen_kappa, krippendorff_alpha

    labels = pair_labels(rankings)
    m: dict[str, float] = {}
    hits: dict[str, list[float]] = defaultdict(list)
    for who, lab in labels.items():
        for (pid, i, j), v in lab.items():
            resp = cands[pid]["responses"]
            if "gold" not in resp[i] or resp[i]["gold"] == resp[j]["gold"]:
                continue
            better = "i" if resp[i]["gold"] > resp[j]["gold"] else "j"
            hits[who].append(0.5 if v == "tie" else float(v == better))
    if hits:
        every = [h for hs in hits.values() for h in hs]
        m["rank/agreement_gold"] = sum(every) / len(every)
        m["rank/gold_gap_pairs"] = len(every)
        for who, hs in sorted(hits.items()):
            m[f"rank/agreement_gold/{who}"] = sum(hs) / len(hs)
    kappas = []
    for a, b in itertools.combinations(sorted(labels), 2):
        common = sorted(set(labels[a]) & set(labels[b]))
        if len(common) >= 2:
            k = cohen_kappa([labels[a][u] for u in common], [labels[b][u] for u in common])
            m[f"rank/kappa/{a}~{b}"] = k
            kappas.append(k)
    if kappas:
        m["rank/kappa_mean"] = sum(kappas) / len(kappas)
    coders = sorted(labels)
    units = sorted({u for lab in labels.values() for u in lab})
    table = [[labels[c].get(u) for c in coders] for u in units]
    if any(sum(v is not None for v in row) >= 2 for row in table):
        m["rank/alpha"] = krippendorff_alpha(table)
    return m


def pair_metrics(pairs: list[dict], cands: dict[str, dict]) -> tuple[dict[str, float], list[int]]:
    """Longer-wins share, gold gap, and the chosen-minus-rejected length (tokens) of each pair."""
    diffs, gaps = [], []
    for p in pairs:
        resp = cands[p["prompt_id"]]["responses"]
        c, r = (resp[k] for k in p["candidates"])
        diffs.append(c["n_tokens"] - r["n_tokens"])
        if "gold" in c and "gold" in r:
            gaps.append(c["gold"] - r["gold"])
    unequal = [d for d in diffs if d != 0]
    m = {"rank/pairs": len(pairs)}
    if unequal:
        m["rank/longer_wins"] = sum(d > 0 for d in unequal) / len(unequal)
    if diffs:
        m["rank/length_diff_mean"] = sum(diffs) / len(diffs)
    if gaps:
        m["rank/gold_gap"] = sum(gaps) / len(gaps)
    return m, diffs


# ----------------------------------------------------------------------------- the stage


def load_candidates(path: Path) -> dict[str, dict]:
    from posttrain.data.schema import DataError
    from posttrain.io import read_jsonl

    out = {}
    for i, rec in enumerate(read_jsonl(path), 1):
        where = f"{path}:{i}"
        for key in ("prompt_id", "messages", "responses"):
            if key not in rec:
                raise DataError(f"{where}: candidates record is missing '{key}'")
        if not rec["responses"] or not all(
            isinstance(r, dict) and isinstance(r.get("text"), str) for r in rec["responses"]
        ):
            raise DataError(f"{where}: 'responses' must be a non-empty list of {{'text': str}}")
        if rec["prompt_id"] in out:
            raise DataError(f"{where}: duplicate prompt_id {rec['prompt_id']!r}")
        for r in rec["responses"]:
            r.setdefault("n_tokens", len(r["text"].split()))
        out[rec["prompt_id"]] = rec
    return out


def load_rankings(path: Path, cands: dict[str, dict]) -> list[dict]:
    """Human (or exported) rankings, checked against the candidates they rank."""
    from posttrain.data.schema import DataError
    from posttrain.io import read_jsonl

    out, seen = [], set()
    for i, rec in enumerate(read_jsonl(path), 1):
        where = f"{path}:{i}"
        for key in ("prompt_id", "annotator", "order"):
            if key not in rec:
                raise DataError(f"{where}: ranking record is missing '{key}'")
        if rec["prompt_id"] not in cands:
            raise DataError(f"{where}: prompt_id {rec['prompt_id']!r} is not among the candidates")
        try:
            check_order(rec["order"], len(cands[rec["prompt_id"]]["responses"]), where)
        except ValueError as e:
            raise DataError(str(e)) from None
        key = (rec["prompt_id"], rec["annotator"])
        if key in seen:
            raise DataError(f"{where}: a second ranking of {key[0]!r} by {key[1]!r}")
        seen.add(key)
        out.append({"prompt_id": rec["prompt_id"], "annotator": str(rec["annotator"]),
                    "group": rec.get("group", "default"), "order": rec["order"]})  # fmt: skip
    return out


def simulate(cfg: Config, ctx: StageContext, cands: dict[str, dict]) -> list[dict]:
    from posttrain.io import read_jsonl
    from posttrain.world import Task
    from posttrain.world.annotators import Pool

    tasks = {}
    for split in ("train", "rl", "eval"):
        f = ctx.stage_path(cfg.world_stage, f"tasks_{split}.jsonl")
        if f.is_file():
            tasks |= {r["prompt_id"]: Task.from_dict(r) for r in read_jsonl(f)}
    missing = [pid for pid in cands if pid not in tasks]
    if missing:
        raise ValueError(
            f"{ctx.name}: simulated annotators need toy-world prompts with gold, but "
            f"{len(missing)} candidates (e.g. {missing[0]!r}) are not world tasks; "
            "give human labels with rank.labels instead"
        )
    pool = Pool(cfg.pool)
    out = []
    for pid, rec in cands.items():
        out += pool.rank(tasks[pid], [r["text"].strip() for r in rec["responses"]])
    return out


def judge_rankings(judge_cfg, ctx: StageContext, cands: dict[str, dict]):
    """Each prompt's candidates ranked by an LLM judge: every pair compared, a candidate's score
    its wins plus half its ties; equal scores share a tier. Returns (rankings, metrics)."""
    from posttrain.eval.judge import Judge

    judge = Judge(judge_cfg, cache_dir=ctx.stage_dir / "judge_cache")
    items, where = [], []
    for pid, rec in cands.items():
        texts = [r["text"].strip() for r in rec["responses"]]
        for i, j in itertools.combinations(range(len(texts)), 2):
            items.append((rec["messages"], texts[i], texts[j]))
            where.append((pid, i, j))
    verdicts = judge.compare(items)
    score = {pid: [0.0] * len(rec["responses"]) for pid, rec in cands.items()}
    for (pid, i, j), v in zip(where, verdicts, strict=True):
        if v.winner == "tie":
            score[pid][i] += 0.5
            score[pid][j] += 0.5
        else:
            score[pid][i if v.winner == "1" else j] += 1.0
    rankings = []
    for pid, s in score.items():
        tiers = sorted(set(s), reverse=True)
        order = []
        for t in tiers:
            members = [k for k, x in enumerate(s) if x == t]
            order.append(members[0] if len(members) == 1 else members)
        rankings.append({"prompt_id": pid, "annotator": f"judge:{judge.name}", "group": "judge",
                         "order": order})  # fmt: skip
    n = max(len(verdicts), 1)
    metrics = {
        "name": judge.name,
        "rank/judge/comparisons": len(verdicts),
        "rank/judge/position_consistent": sum(v.consistent for v in verdicts) / n,
        "rank/judge/ties": sum(v.winner == "tie" for v in verdicts) / n,
        "rank/judge/unreadable": judge.unreadable,
    }
    return rankings, metrics


def run(cfg: Config, ctx: StageContext) -> StageResult:
    from posttrain.io import atomic_write_jsonl

    paths = inputs(cfg, ctx)
    cands = load_candidates(paths["candidates"])
    if cfg.labels:
        rankings = load_rankings(paths["labels"], cands)
        cands = {pid: c for pid, c in cands.items() if any(r["prompt_id"] == pid for r in rankings)}
        source = f"human labels {paths['labels']}"
    elif cfg.judge is not None:
        rankings, judge_metrics = judge_rankings(cfg.judge, ctx, cands)
        source = f"the LLM judge {judge_metrics.pop('name')}"
    else:
        rankings = simulate(cfg, ctx, cands)
        source = f"a pool of {len(cfg.pool.annotators)} simulated annotators"
    ctx.logger.info(f"{ctx.name}: {len(rankings)} rankings of {len(cands)} prompts by {source}")
    pairs = build_pairs(cands, rankings, cfg.pairs)
    if not pairs:
        raise ValueError(f"{ctx.name}: the rankings yield no preference pairs (all ties?)")
    metrics: dict = {"rank/rankings": len(rankings), "rank/prompts": len(cands)}
    if cfg.judge is not None:
        metrics |= judge_metrics
    metrics |= agreement_metrics(rankings, cands)
    metrics |= group_metrics(rankings, cands)
    pm, diffs = pair_metrics(pairs, cands)
    metrics |= pm
    atomic_write_jsonl(ctx.stage_dir / "rankings.jsonl", rankings)
    atomic_write_jsonl(ctx.stage_dir / "pairs.jsonl", pairs)
    atomic_write_jsonl(ctx.stage_dir / "length_diffs.jsonl", [{"diff": d} for d in diffs])
    return StageResult(
        metrics,
        {"rankings": f"{ctx.name}/rankings.jsonl", "pairs": f"{ctx.name}/pairs.jsonl"},
    )
