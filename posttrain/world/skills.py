"""Verifiable skills: two-digit arithmetic and string/list operations.

Arithmetic: operands 10..99, "plus" and "minus"; subtraction keeps a >= b so every answer is a
non-negative integer (0..198). String: reverse a made-up word, give its first letter, or sort a
list of 3-5 single digits. One prompt phrasing per operation, so a prompt is one instance and
excluding an eval prompt from the corpus excludes that instance.
"""

from __future__ import annotations

import random
from typing import Any

ARITH_OPS = ("plus", "minus")
STRING_OPS = ("reverse", "first_letter", "sort")
ARITH_STATEMENTS = {  # every phrasing contains "{a} {op} {b}" literally
    "plus": ("{a} plus {b} is {c}.", "{a} plus {b} equals {c}.", "Adding up, {a} plus {b} gives {c}."),
    "minus": ("{a} minus {b} is {c}.", "{a} minus {b} equals {c}.", "If you work out {a} minus {b}, you get {c}."),
}  # fmt: skip
STRING_STATEMENTS = {
    "reverse": ("The word {w} reversed is {c}.", "Spelled backwards, {w} is {c}."),
    "first_letter": ("The first letter of {w} is {c}.", "The word {w} starts with {c}."),
    "sort": ("Sorted, {w} becomes {c}.", "In order, {w} is {c}."),
}
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "gl", "st")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "l", "m", "n", "r", "s", "k")


def arith_prompt(op: str, a: int, b: int) -> str:
    return f"What is {a} {op} {b}?"


def arith_answer(op: str, a: int, b: int) -> int:
    return a + b if op == "plus" else a - b


def arith_instances() -> list[tuple[str, int, int]]:
    """All (op, a, b): 8,100 additions and 4,095 subtractions with a >= b."""
    out = [("plus", a, b) for a in range(10, 100) for b in range(10, 100)]
    return out + [("minus", a, b) for a in range(10, 100) for b in range(10, a + 1)]


def arith_worked(op: str, a: int, b: int) -> str:
    """The answer worked digit by digit, ones then tens, ending with the result.

    A tiny model cannot carry in one step; written out, each step is a one-digit fact
    (the lecture's point that SFT data can teach *how* to answer, not just what).
      43 plus 78  -> "ones: 3 plus 8 is 11; tens: 4 plus 7 plus 1 is 12; so 121"
      43 minus 26 -> "ones: 13 minus 6 is 7; tens: 4 minus 2 minus 1 is 1; so 17"
    """
    a1, a0, b1, b0 = a // 10, a % 10, b // 10, b % 10
    if op == "plus":
        ones, carry = a0 + b0, (a0 + b0) // 10
        tens = a1 + b1 + carry
        steps = f"ones: {a0} plus {b0} is {ones}; tens: {a1} plus {b1} plus {carry} is {tens}"
    else:
        borrow = int(a0 < b0)
        ones = a0 + 10 * borrow - b0
        tens = a1 - b1 - borrow
        steps = f"ones: {a0 + 10 * borrow} minus {b0} is {ones}; tens: {a1} minus {b1} minus {borrow} is {tens}"
    return f"{steps}; so {arith_answer(op, a, b)}"


def arith_item(inst: tuple[str, int, int]) -> tuple[str, str, dict[str, Any]]:
    op, a, b = inst
    answer = arith_answer(op, a, b)
    gold = {"op": op, "a": a, "b": b, "answer": answer}
    return arith_prompt(op, a, b), arith_worked(op, a, b), gold


def arith_statement(rng: random.Random, inst: tuple[str, int, int]) -> str:
    op, a, b = inst
    return rng.choice(ARITH_STATEMENTS[op]).format(a=a, b=b, c=arith_answer(op, a, b))


def make_words(rng: random.Random, n: int, reserved: set[str]) -> list[str]:
    """`n` unique made-up lowercase words of 2 syllables (4-7 letters), none in `reserved`."""
    words: list[str] = []
    seen = set(reserved)
    while len(words) < n:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(2))
        word += rng.choice(_CODAS)
        if word not in seen and len(word) >= 4:
            seen.add(word)
            words.append(word)
    return words


def string_prompt(op: str, arg: str) -> str:
    if op == "reverse":
        return f"Reverse the word {arg}."
    if op == "first_letter":
        return f"What is the first letter of {arg}?"
    return f"Sort {arg}."


def string_answer(op: str, arg: str) -> str:
    if op == "reverse":
        return arg[::-1]
    if op == "first_letter":
        return arg[0]
    return " ".join(sorted(arg.split()))


def string_instances(rng: random.Random, words: list[str], n_lists: int) -> list[tuple[str, str]]:
    """(op, arg) for every word x {reverse, first_letter} plus `n_lists` unique digit lists."""
    out = [(op, w) for w in words for op in ("reverse", "first_letter")]
    lists: set[str] = set()
    while len(lists) < n_lists:
        lists.add(" ".join(str(rng.randrange(10)) for _ in range(rng.randint(3, 5))))
    return out + [("sort", arg) for arg in sorted(lists)]


def string_item(inst: tuple[str, str]) -> tuple[str, str, dict[str, Any]]:
    op, arg = inst
    answer = string_answer(op, arg)
    return string_prompt(op, arg), answer, {"op": op, "arg": arg, "answer": answer}


def string_statement(rng: random.Random, inst: tuple[str, str]) -> str:
    op, arg = inst
    return rng.choice(STRING_STATEMENTS[op]).format(w=arg, c=string_answer(op, arg))
