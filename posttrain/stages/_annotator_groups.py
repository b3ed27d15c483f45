"""Who the annotators are: the rank stage's figures per annotator group.

Every ranking names its annotator and the annotator's group (a label of the pool's config, or a
human rankings file's "group"). A ranking of n candidates is read as its n(n-1)/2 pairwise
labels ("i", "j" or "tie"); a unit is one candidate pair of one prompt. Per group g:

- `rank/group/<g>/agreement_gold`: the share of g's labels on gold-gap pairs that prefer the
  gold-better response (a tie counts one half), as the stage's per-annotator figure;
- `rank/group/<g>/fleiss_kappa`: Fleiss' kappa among g's annotators on the units two or more of
  them labelled (with `per_prompt` below the pool's size a prompt goes to some annotators only,
  so units may have different numbers of raters: Fleiss' per-unit agreement uses each unit's
  own count, and the chance term the pooled label shares);
- `rank/group/<g>/cohen_kappa`: the mean Cohen's kappa over pairs of g's annotators, and
  `rank/group/<g>~<h>/cohen_kappa` over pairs with one annotator from each group, each pair on
  the units both labelled: within against between, on the same footing;
- `rank/group/<g>/longer_wins`: of g's strict preferences between two responses of different
  lengths, the share that prefer the longer one.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Hashable, Mapping, Sequence
from fractions import Fraction


def fleiss_kappa(units: Sequence[Mapping[Hashable, int]]) -> float:
    """Fleiss' kappa (1971): units[u][label] = how many raters gave unit u that label.

    P_u = sum_k n_uk (n_uk - 1) / (n_u (n_u - 1)) is the share of agreeing rater pairs on unit u
    (units with n_u < 2 are left out); P = mean_u P_u; p_k = sum_u n_uk / sum_u n_u;
    P_e = sum_k p_k^2; kappa = (P - P_e) / (1 - P_e). With the same n_u on every unit this is
    Fleiss' formula exactly. Convention as cohen_kappa: P_e == 1 (one label throughout) gives
    1.0. Raises ValueError when no unit has two ratings."""
    rated = [{k: n for k, n in u.items() if n} for u in units]
    rated = [u for u in rated if sum(u.values()) >= 2]
    if not rated:
        raise ValueError("fleiss_kappa: no unit has two or more ratings")
    p_bar = Fraction(0)
    totals: Counter[Hashable] = Counter()
    for u in rated:
        n = sum(u.values())
        p_bar += Fraction(sum(c * (c - 1) for c in u.values()), n * (n - 1))
        totals.update(u)
    p_bar /= len(rated)
    n_all = sum(totals.values())
    p_e = sum(Fraction(c, n_all) ** 2 for c in totals.values())
    if p_e == 1:
        return 1.0
    return float((p_bar - p_e) / (1 - p_e))


def group_metrics(rankings: list[dict], cands: dict[str, dict]) -> dict[str, float]:
    """The figures above, when the rankings name two or more groups (else {})."""
    from posttrain.eval.agreement import cohen_kappa
    from posttrain.stages.rank import pair_labels

    group_of = {r["annotator"]: r.get("group", "default") for r in rankings}
    groups = sorted(set(group_of.values()))
    if len(groups) < 2:
        return {}
    labels = pair_labels(rankings)  # annotator -> {(prompt_id, i, j): "i" | "j" | "tie"}
    members = {g: sorted(a for a in labels if group_of[a] == g) for g in groups}
    m: dict[str, float] = {}
    for g in groups:
        m[f"rank/group/{g}/annotators"] = len(members[g])
        hits, longer = _gold_hits(labels, members[g], cands), _longer(labels, members[g], cands)
        if hits:
            m[f"rank/group/{g}/agreement_gold"] = sum(hits) / len(hits)
        if longer:
            m[f"rank/group/{g}/longer_wins"] = sum(longer) / len(longer)
        units: dict[tuple, Counter] = defaultdict(Counter)
        for a in members[g]:
            for u, v in labels[a].items():
                units[u][v] += 1
        if any(sum(c.values()) >= 2 for c in units.values()):
            m[f"rank/group/{g}/fleiss_kappa"] = fleiss_kappa(list(units.values()))
    for g, h in itertools.combinations_with_replacement(groups, 2):
        pairs = (itertools.combinations(members[g], 2) if g == h
                 else itertools.product(members[g], members[h]))  # fmt: skip
        kappas = []
        for a, b in pairs:
            common = sorted(set(labels[a]) & set(labels[b]))
            if len(common) >= 2:
                kappas.append(cohen_kappa([labels[a][u] for u in common],
                                          [labels[b][u] for u in common]))  # fmt: skip
        if kappas:
            m[f"rank/group/{g if g == h else f'{g}~{h}'}/cohen_kappa"] = sum(kappas) / len(kappas)
    return m


def _gold_hits(labels: dict, who: list[str], cands: dict[str, dict]) -> list[float]:
    """1 / 0 / 0.5 (a tie) per label of `who` on a pair whose gold differs."""
    out = []
    for a in who:
        for (pid, i, j), v in labels[a].items():
            resp = cands[pid]["responses"]
            if "gold" not in resp[i] or "gold" not in resp[j] or resp[i]["gold"] == resp[j]["gold"]:
                continue
            better = "i" if resp[i]["gold"] > resp[j]["gold"] else "j"
            out.append(0.5 if v == "tie" else float(v == better))
    return out


def _longer(labels: dict, who: list[str], cands: dict[str, dict]) -> list[float]:
    """1 if the preferred response is the longer one, per strict label of `who` on a pair of
    different lengths (n_tokens)."""
    out = []
    for a in who:
        for (pid, i, j), v in labels[a].items():
            resp = cands[pid]["responses"]
            d = resp[i]["n_tokens"] - resp[j]["n_tokens"]
            if v != "tie" and d != 0:
                out.append(float((d > 0) == (v == "i")))
    return out
