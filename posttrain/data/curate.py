"""SFT data curation: quality filters, benchmark decontamination, exact and near deduplication.

`curate(examples, settings)` takes chat examples (`{"messages": [...]}`, as `load_chat_data`
returns them) and keeps a subset in the original order. The steps run in this order, and an
example is counted under the first step that drops it, so the counts add up:

1. **length / pattern filters** (`dropped_length`, `dropped_pattern`): the words of the
   assistant turns (content plus tool-call names and arguments) must number at least
   `min_response_words` and at most `max_response_words`; an example whose assistant content
   matches any `drop_patterns` regex (case-insensitive, `re.search`) is dropped.
2. **decontamination** (`dropped_contaminated`): an example is dropped when any of its user turns
   shares a word n-gram (`ngram`, 13 as in GPT-3, Brown et al. 2020, appendix C) with any
   eval text. Words are lowercased `\\w+` runs, so punctuation and case do not matter. An eval
   text shorter than n words is matched whole, as a contiguous run of words in a user turn, if
   it has at least `min_match_words` (8) words: a 3-word question is no evidence of leakage.
3. **exact dedup** (`dropped_exact_duplicate`, with `dedup: exact` or `near`): the normalised
   text of every turn (role, content lowercased with whitespace collapsed, tool calls as
   sorted JSON) must not have been seen in an earlier kept example.
4. **near dedup** (`dropped_near_duplicate`, with `dedup: near`): MinHash over word 5-gram
   shingles of the whole conversation, with LSH banding to find candidates; an example is dropped
   when its estimated Jaccard similarity with an earlier *kept* example is at least
   `near_threshold` (Broder 1997; the recipe of Lee et al. 2022, "Deduplicating training data").

Eval files for decontamination (`decontaminate`): a benchmark name of
`posttrain.eval.benchmarks.READERS` (e.g. "gsm8k") means its `DEFAULT_PATHS` file under
`data_dir`; a path that ends with one of those default paths is read with that benchmark's
reader; any other JSONL / JSON list is read record by record (the user turns of "messages", or
the string fields "prompt", "question", "problem", "instruction", "input"), and a CSV by the
first of the columns "prompt", "question", "problem", "instruction", "prompts_final".
"""

from __future__ import annotations

import csv
import json
import re
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from posttrain.settings import StrictModel

PRIME = (1 << 31) - 1  # Mersenne prime of the MinHash permutations (a, b < PRIME, x < 2^32)
SHINGLE = 5  # words per near-dedup shingle
SEED = 1234  # the permutations' fixed seed: signatures are the same from run to run
PROMPT_FIELDS = ("prompt", "question", "problem", "instruction", "input")
CSV_FIELDS = ("prompt", "question", "problem", "instruction", "prompts_final")
STAT_KEYS = (
    "curate/in",
    "curate/kept",
    "curate/dropped_length",
    "curate/dropped_pattern",
    "curate/dropped_contaminated",
    "curate/dropped_exact_duplicate",
    "curate/dropped_near_duplicate",
)

_WORD = re.compile(r"\w+")


class CurateSettings(StrictModel):
    dedup: Literal["none", "exact", "near"] = Field(
        "exact",
        description="Deduplication: none; exact (same normalised text of every turn); near "
        "(also MinHash/LSH near-duplicates of an earlier kept example).",
    )
    near_threshold: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Estimated Jaccard similarity of word 5-gram shingles at or above which the "
        "later example is a near-duplicate.",
    )
    num_perm: int = Field(64, ge=1, description="MinHash permutations (signature length).")
    bands: int = Field(
        16, ge=1, description="LSH bands; num_perm must be divisible by it (rows = num_perm/bands)."
    )
    decontaminate: list[str] = Field(
        [],
        description="Eval files whose prompts must not leak into training: benchmark names "
        "(e.g. gsm8k: its file under data_dir) or paths to JSONL/JSON/CSV files.",
    )
    data_dir: str = Field(
        "../shared/data", description="Where the benchmark files of named benchmarks are."
    )
    ngram: int = Field(
        13,
        ge=1,
        description="Decontamination n-gram in lowercased words: a user turn sharing one with an "
        "eval text is contaminated (shorter eval texts are matched whole).",
    )
    min_match_words: int = Field(
        8,
        ge=1,
        description="Eval texts shorter than ngram are matched whole only from this many words "
        "(a 3-word question such as 'Who are you?' is no evidence of leakage).",
    )
    min_response_words: int = Field(
        1, ge=0, description="Drop an example whose assistant turns have fewer words in all."
    )
    max_response_words: int | None = Field(
        None,
        ge=1,
        description="Drop an example whose assistant turns have more words (null: no cap).",
    )
    drop_patterns: list[str] = Field(
        [],
        description="Regexes (case-insensitive); an example whose assistant text matches any is "
        "dropped, e.g. 'as an ai language model'.",
    )

    @field_validator("drop_patterns")
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        for p in value:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"drop_patterns: bad regex {p!r}: {e}") from None
        return value

    @model_validator(mode="after")
    def _check(self) -> CurateSettings:
        if self.num_perm % self.bands:
            raise ValueError(
                f"num_perm ({self.num_perm}) must be divisible by bands ({self.bands})"
            )
        if (
            self.max_response_words is not None
            and self.max_response_words < self.min_response_words
        ):
            raise ValueError(
                f"max_response_words ({self.max_response_words}) is below "
                f"min_response_words ({self.min_response_words})"
            )
        return self


# ---------------------------------------------------------------------------------------------
# Text views of an example


def words(text: str) -> list[str]:
    """Lowercased word tokens (`\\w+` runs): what n-grams and shingles are made of."""
    return _WORD.findall(text.lower())


def _tool_text(msg: dict) -> str:
    calls = msg.get("tool_calls") or []
    return json.dumps(calls, sort_keys=True, ensure_ascii=False) if calls else ""


def normalized_text(example: dict) -> str:
    """Every turn's role, content (lowercased, whitespace collapsed) and tool calls, one string."""
    parts = []
    for m in example["messages"]:
        content = " ".join((m.get("content") or "").lower().split())
        parts.append(f"{m['role']}\x00{content}\x00{_tool_text(m)}")
    return "\x01".join(parts)


def response_words(example: dict) -> int:
    """Words of the assistant turns: their content plus their tool calls' names and arguments."""
    n = 0
    for m in example["messages"]:
        if m["role"] == "assistant":
            n += len(words(m.get("content") or "")) + len(words(_tool_text(m)))
    return n


def _assistant_texts(example: dict) -> list[str]:
    return [m.get("content") or "" for m in example["messages"] if m["role"] == "assistant"]


def _user_texts(example: dict) -> list[str]:
    return [m.get("content") or "" for m in example["messages"] if m["role"] == "user"]


# ---------------------------------------------------------------------------------------------
# MinHash / LSH


def shingle_hashes(text: str, k: int = SHINGLE) -> np.ndarray:
    """crc32 of each distinct word k-gram (fewer than k words: the whole text), as uint64."""
    w = words(text)
    grams = (
        {" ".join(w[i : i + k]) for i in range(len(w) - k + 1)} if len(w) >= k else {" ".join(w)}
    )
    return np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64, count=len(grams))


def permutations(num_perm: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of h_i(x) = (a_i x + b_i) mod (2^31 - 1), 1 <= a_i < p, 0 <= b_i < p, shape (P, 1).

    With x < 2^32 and a, b < 2^31 - 1, a x + b < 2^63: exact in uint64 (no silent wrap)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, PRIME, size=(num_perm, 1), dtype=np.uint64)
    b = rng.integers(0, PRIME, size=(num_perm, 1), dtype=np.uint64)
    return a, b


def minhash(hashes: np.ndarray, num_perm: int, seed: int = SEED) -> np.ndarray:
    """The MinHash signature (num_perm,) of one set of uint64 shingle hashes (< 2^32)."""
    a, b = permutations(num_perm, seed)
    return ((a * hashes[None, :] + b) % np.uint64(PRIME)).min(axis=1)


def signatures(texts: Sequence[str], num_perm: int, seed: int = SEED) -> np.ndarray:
    """MinHash signatures (len(texts), num_perm) of many texts, vectorised over chunks of texts
    whose (permutations x shingles) table stays near 32 MB (every text has a shingle)."""
    a, b = permutations(num_perm, seed)
    chunk = max(1, (1 << 22) // num_perm)
    out = np.empty((len(texts), num_perm), dtype=np.uint64)
    sets = [shingle_hashes(t) for t in texts]
    start = 0
    while start < len(sets):
        stop, total = start, 0
        while stop < len(sets) and (total == 0 or total + len(sets[stop]) <= chunk):
            total += len(sets[stop])
            stop += 1
        block = sets[start:stop]
        flat = np.concatenate(block)
        offsets = np.cumsum([0] + [len(s) for s in block[:-1]])
        values = (a * flat[None, :] + b) % np.uint64(PRIME)  # (P, shingles)
        out[start:stop] = np.minimum.reduceat(values, offsets, axis=1).T
        start = stop
    return out


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The fraction of equal MinHash values: an unbiased estimate of the Jaccard similarity."""
    return float(np.mean(sig_a == sig_b))


def near_duplicates(
    texts: Sequence[str], threshold: float, num_perm: int, bands: int
) -> list[bool]:
    """For each text in order, whether it is a near-duplicate (estimated Jaccard >= threshold)
    of an earlier text that was not itself one. Candidates share an LSH band bucket."""
    sigs = signatures(texts, num_perm)
    rows = num_perm // bands
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
    dup = []
    for i, sig in enumerate(sigs):
        keys = [sig[j * rows : (j + 1) * rows].tobytes() for j in range(bands)]
        seen: set[int] = set()
        is_dup = False
        for j, key in enumerate(keys):
            for c in buckets[j].get(key, ()):
                if c in seen:
                    continue
                seen.add(c)
                if estimated_jaccard(sig, sigs[c]) >= threshold:
                    is_dup = True
                    break
            if is_dup:
                break
        dup.append(is_dup)
        if not is_dup:
            for j, key in enumerate(keys):
                buckets[j].setdefault(key, []).append(i)
    return dup


# ---------------------------------------------------------------------------------------------
# Decontamination


def resolve_eval_file(entry: str, data_dir: str | Path) -> Path:
    """The file of one `decontaminate` entry: a benchmark name's default file under data_dir,
    else the entry as a path (not checked for existence here)."""
    from posttrain.eval.benchmarks import DEFAULT_PATHS

    if entry in DEFAULT_PATHS:
        return Path(data_dir) / DEFAULT_PATHS[entry]
    return Path(entry)


def _benchmark_of(path: Path) -> str | None:
    from posttrain.eval.benchmarks import DEFAULT_PATHS

    posix = path.as_posix()
    for name, suffix in DEFAULT_PATHS.items():
        if posix == suffix or posix.endswith("/" + suffix):
            return name
    return None


def eval_texts(path: str | Path) -> list[str]:
    """The prompts of one eval file (see the module docstring); DataError "FILE:LINE: ..." for
    a record with none."""
    from posttrain.data.readers import _records
    from posttrain.data.schema import DataError
    from posttrain.eval.benchmarks import READERS

    path = Path(path)
    name = _benchmark_of(path)
    if name is not None:
        items = READERS[name](path)
        return [getattr(it, "prompt", None) or it.question for it in items]
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            column = next((c for c in CSV_FIELDS if c in (reader.fieldnames or [])), None)
            if column is None:
                raise DataError(
                    f"{path}:1: no prompt column (expected one of {', '.join(CSV_FIELDS)})"
                )
            return [row[column] for row in reader if (row.get(column) or "").strip()]
    texts = []
    for where, rec in _records(path):
        if isinstance(rec, DataError):
            raise rec
        if not isinstance(rec, dict):
            raise DataError(f"{where}: record is not an object (got {type(rec).__name__})")
        found = []
        if isinstance(rec.get("messages"), list):
            found = [
                m.get("content")
                for m in rec["messages"]
                if isinstance(m, dict) and m.get("role") == "user"
            ]
        found += [rec[k] for k in PROMPT_FIELDS if isinstance(rec.get(k), str)]
        found = [t for t in found if isinstance(t, str) and t.strip()]
        if not found:
            keys = ", ".join(sorted(rec)) or "none"
            raise DataError(f'{where}: no prompt text (expected "messages" or one of '
                            f"{', '.join(PROMPT_FIELDS)}; keys: {keys})")  # fmt: skip
        texts += found
    return texts


class EvalNgrams:
    """The n-grams of a set of eval texts, and the whole word sequences of those shorter than n."""

    def __init__(self, texts: Iterable[str], n: int, min_words: int = 1):
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        self.short: dict[int, set[tuple[str, ...]]] = {}
        for t in texts:
            w = words(t)
            if len(w) < min(n, min_words):
                continue
            if len(w) < n:
                self.short.setdefault(len(w), set()).add(tuple(w))
            else:
                self.grams.update(tuple(w[i : i + n]) for i in range(len(w) - n + 1))

    def __len__(self) -> int:
        return len(self.grams) + sum(len(s) for s in self.short.values())

    def matches(self, text: str) -> bool:
        """Whether `text` holds one of the n-grams, or one of the short texts as a word run."""
        w = words(text)
        lengths = [(self.n, self.grams)] + list(self.short.items())
        for k, table in lengths:
            if table and any(tuple(w[i : i + k]) in table for i in range(len(w) - k + 1)):
                return True
        return False


def decontamination_ngrams(entries: Sequence[str], settings: CurateSettings) -> EvalNgrams:
    """The eval n-grams of `decontaminate` entries (names or paths); FileNotFoundError naming
    the entry and the file when one is missing."""
    from posttrain.eval.benchmarks import DEFAULT_PATHS

    texts: list[str] = []
    for i, entry in enumerate(entries):
        path = resolve_eval_file(entry, settings.data_dir)
        if not path.is_file():
            how = (f"benchmark '{entry}' is {DEFAULT_PATHS[entry]} under data_dir {settings.data_dir}"
                   if entry in DEFAULT_PATHS else
                   f"not a benchmark name ({', '.join(DEFAULT_PATHS)}) nor an existing file")  # fmt: skip
            raise FileNotFoundError(
                f"curate.decontaminate[{i}] {entry!r}: {path} not found ({how})"
            )
        texts += eval_texts(path)
    return EvalNgrams(texts, settings.ngram, settings.min_match_words)


# ---------------------------------------------------------------------------------------------
# The whole pass


def curate(examples: list[dict], settings: CurateSettings) -> tuple[list[dict], dict]:
    """(kept examples in their original order, stats with every STAT_KEYS key); see the module
    docstring for the order of the steps."""
    stats = dict.fromkeys(STAT_KEYS, 0)
    stats["curate/in"] = len(examples)
    patterns = [re.compile(p, re.IGNORECASE) for p in settings.drop_patterns]
    ngrams = (
        decontamination_ngrams(settings.decontaminate, settings) if settings.decontaminate else None
    )
    lo, hi = settings.min_response_words, settings.max_response_words
    kept, texts, seen = [], [], set()
    for ex in examples:
        n = response_words(ex)
        if n < lo or (hi is not None and n > hi):
            stats["curate/dropped_length"] += 1
            continue
        if patterns and any(p.search(t) for t in _assistant_texts(ex) for p in patterns):
            stats["curate/dropped_pattern"] += 1
            continue
        if ngrams is not None and any(ngrams.matches(t) for t in _user_texts(ex)):
            stats["curate/dropped_contaminated"] += 1
            continue
        if settings.dedup != "none":
            key = normalized_text(ex)
            if key in seen:
                stats["curate/dropped_exact_duplicate"] += 1
                continue
            seen.add(key)
            texts.append(key)  # near dedup shingles it too (its separators are not words)
        kept.append(ex)
    if settings.dedup == "near" and kept:
        dup = near_duplicates(texts, settings.near_threshold, settings.num_perm, settings.bands)
        stats["curate/dropped_near_duplicate"] = sum(dup)
        kept = [ex for ex, d in zip(kept, dup, strict=True) if not d]
    stats["curate/kept"] = len(kept)
    return kept, stats


_LIST_LINE = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+", re.MULTILINE)
MARKDOWN = {  # what `style_stats` counts as markdown, by kind
    "header": re.compile(r"^\s{0,3}#{1,6}\s+\S", re.MULTILINE),
    "bold": re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__"),
    "code": re.compile(r"```|`[^`\n]+`"),
}


def style_stats(examples: Iterable[dict]) -> dict:
    """Style of the assistant replies (turns with content), the surface that judges like and
    that is not capability (Dubois et al. 2404.04475): mean and median length in words (as the
    length filters count them), the share with a bullet or numbered list line, and the share
    with markdown (a header, bold text or code), also by kind. Zero replies: counts 0, the
    rest None."""
    replies = [m.get("content") or "" for ex in examples for m in ex["messages"]
               if m["role"] == "assistant" and (m.get("content") or "").strip()]  # fmt: skip
    out: dict = {"style/replies": len(replies)}
    n_words = [len(words(r)) for r in replies]
    kinds = {k: [bool(rx.search(r)) for r in replies] for k, rx in MARKDOWN.items()}
    share = (lambda flags: sum(flags) / len(flags)) if replies else (lambda flags: None)
    out["style/mean_words"] = float(np.mean(n_words)) if replies else None
    out["style/median_words"] = float(np.median(n_words)) if replies else None
    out["style/bullet_share"] = share([bool(_LIST_LINE.search(r)) for r in replies])
    out["style/markdown_share"] = share([any(f) for f in zip(*kinds.values(), strict=True)])
    out |= {f"style/{k}_share": share(flags) for k, flags in kinds.items()}
    return out


def curate_file(data: str | Path, out: str | Path, format: str, settings: CurateSettings) -> dict:
    """Read a chat file, curate it and write the kept examples as messages JSONL (atomically);
    returns the stats and the kept replies' `style_stats`. A malformed record raises DataError
    naming FILE:LINE."""
    from posttrain.data.readers import load_chat_data
    from posttrain.io import atomic_write_jsonl

    examples, _ = load_chat_data(data, format, "raise")
    kept, stats = curate(examples, settings)
    atomic_write_jsonl(out, kept)
    return stats | style_stats(kept)
