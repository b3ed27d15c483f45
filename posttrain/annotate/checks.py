"""What the app accepts as input: names, orders, request bodies; and how much of it an error echoes.

`check_ranking` is the one check of an order. Every write (`db.save_ranking`, which the JSON API
and the rank form both go through) and every read for the admin pages and the export
(`export.human_rankings`) uses it, so nothing is stored that agreement or export would refuse.
"""

from __future__ import annotations

import re

# Request bodies, JSON and forms alike: starlette's own limit on a form field (Request.form's
# max_part_size), applied to the whole body. A ranking of 20 candidates is under 100 bytes.
MAX_BODY = 1024 * 1024
# A ranking request is 3 levels deep ({"order": [[0, 1], 2]}); deeper is never a ranking.
MAX_DEPTH = 16
# How much of a value an error message quotes back: enough to recognise it.
ECHO = 40

# No '+' or '~' in names: the rank stage joins annotator names with them. The first character is
# a letter, digit or '_' and there is no '..', so no name reads as a path ('.', '..', '.x') or
# an option ('-x').
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def clip(value, limit: int = ECHO) -> str:
    """repr(value), cut to `limit` characters: what an error message may quote of the input."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def clip_text(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... (cut at {limit} characters)"


def check_name(value, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value) or ".." in value:
        raise ValueError(
            f"{what} {clip(value)} must be 1-64 characters of letters, digits, '_', '.' or '-', "
            "start with a letter, digit or '_', and hold no '..' (it must not look like a path)"
        )
    return value


def check_ranking(order, n: int, where: str) -> None:
    """An order of n candidates, best first, ties as lists: the rank stage's `check_order` (every
    index 0..n-1 exactly once) and agreement's `rank_positions` (no empty tie group).

    The checks that quote the order run here first, on a clipped copy, so that no message holds
    more than a short prefix of what was sent.
    """
    from posttrain.eval.agreement import rank_positions
    from posttrain.stages.rank import check_order, tiers

    if isinstance(order, list) and order:
        empty = [t for t, x in enumerate(order) if isinstance(x, list) and not x]
        if empty:
            raise ValueError(
                f"{where}: 'order' {clip(order)} has an empty tie group at position "
                f"{empty[0] + 1}: a tie group lists the candidates that are tied"
            )
        flat = [i for t in tiers(order) for i in t]
        ints = all(isinstance(i, int) and not isinstance(i, bool) for i in flat)
        if ints and len(flat) != n:  # (not ints: check_order says so, quoting nothing)
            raise ValueError(
                f"{where}: 'order' {clip(order)} is not a permutation of the {n} candidates "
                f"0..{n - 1}: it names {len(flat)}"
            )
    check_order(order, n, where)  # what it quotes now is n indices at most
    rank_positions(order)


def same_ranking(a, b) -> bool:
    """Two orders rank alike: the same tiers, whatever the order inside a tie. False where
    either is not an order at all (a stored row that no check ever saw)."""
    from posttrain.stages.rank import tiers

    if not isinstance(a, list) or not isinstance(b, list):
        return False
    try:
        return [sorted(t) for t in tiers(a)] == [sorted(t) for t in tiers(b)]
    except TypeError:  # indices that do not compare: not an order
        return False


def too_deep(value, limit: int = MAX_DEPTH) -> bool:
    """Whether parsed JSON nests lists and objects more than `limit` levels (no recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            if depth > limit:
                return True
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False
