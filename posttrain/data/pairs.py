"""Preference pairs as model inputs: tokenised chosen/rejected sequences and their batches.

A pair {"messages", "chosen", "rejected"} becomes two chat examples (prompt + one reply) whose
loss mask covers exactly the final assistant turn (content and end-of-turn), derived from the
tokenizer's chat template like SFT. A micro-batch of B pairs holds its 2B sequences in one
tensor (chosen 0..B-1, then rejected 0..B-1) so one forward pass serves both, either
right-padded or packed several to a row (positions restart per sequence, no padding between).

Over-long sequences are cut as TRL cuts them: the prompt loses its start (its end, next to the
reply, is kept) and the reply loses its end, with one prompt budget for all replies of a prompt,
so chosen and rejected keep the same context and the start of their reply.

`SeqBatch.target_seq` maps every target position (row-major over labels != IGNORE_INDEX, the
order `models.forward.target_logps` returns) to its sequence, so per-sequence sums are one
`index_add`, whatever the layout; `last` holds (row, column) of each sequence's final token,
where a reward head reads.

`length_balanced` curates pair records before tokenising: Singhal et al.'s (2310.03716) length
balancing of a reward model's training pairs.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from posttrain.data.chat import TokenizedExample, tokenize_chat
from posttrain.data.collate import Batch, pack_rows, packed_batch, pad_batch
from posttrain.ops.lm import IGNORE_INDEX


@dataclass
class TokenizedPair:
    chosen: TokenizedExample
    rejected: TokenizedExample
    margin: float | None = None
    prompt_id: str = ""
    # KTO (`tokenize_feedback`): chosen is the judged reply, rejected the mismatched reply whose
    # log-ratio estimates the KL reference point, desirable the judgement.
    desirable: bool | None = None


@dataclass
class PairStats:
    """What fitting to max_length did to `pairs` pairs (or feedback records, rankings): each is
    kept or dropped for one reason, so kept == pairs - dropped_overlong - dropped_no_reply;
    `truncated` counts the kept ones that were cut."""

    pairs: int = 0
    truncated: int = 0
    dropped_overlong: int = 0  # overlong: drop, and longer than max_length
    dropped_no_reply: int = 0  # overlong: truncate, and no reply token would be left to train on

    @property
    def kept(self) -> int:
        return self.pairs - self.dropped_overlong - self.dropped_no_reply

    def drop(self, overlong: str) -> None:
        """Count one that `fit_replies` dropped under policy `overlong` (that is its reason)."""
        if overlong == "drop":
            self.dropped_overlong += 1
        else:
            self.dropped_no_reply += 1

    def metrics(self, prefix: str = "") -> dict:
        """data/{prefix}kept, ...truncated, ...dropped_overlong, ...dropped_no_reply."""
        counts = (("kept", self.kept), ("truncated", self.truncated),
                  ("dropped_overlong", self.dropped_overlong),
                  ("dropped_no_reply", self.dropped_no_reply))  # fmt: skip
        return {f"data/{prefix}{k}": v for k, v in counts}

    def describe(self, max_length: int, overlong: str, what: str = "pairs") -> str:
        """One console line with every count of `metrics` (the numbers result.json holds)."""
        line = (f"{what}: {self.kept:,} of {self.pairs:,} kept within max_length {max_length} "
                f"(overlong: {overlong})")  # fmt: skip
        if self.truncated:
            line += (f", {self.truncated:,} of them truncated (prompt cut from the left, reply "
                     "from the right)")  # fmt: skip
        if self.dropped_overlong:
            line += (f"; {self.dropped_overlong:,} dropped as longer than max_length (overlong: "
                     "truncate would cut them to fit)")  # fmt: skip
        if self.dropped_no_reply:
            line += f"; {self.dropped_no_reply:,} dropped with no reply token left to train on"
        if self.truncated or self.dropped_overlong or self.dropped_no_reply:
            line += "; raise max_length to keep them whole"
        return line


def tokenize_reply(tokenizer, messages: list[dict], reply: str) -> TokenizedExample:
    """Prompt messages + one assistant reply, trained on the reply only; the sequence ends at the
    reply's last trained token (its end-of-turn), where a reward head reads, not at whatever the
    template renders after it (a newline)."""
    ex = tokenize_chat(
        tokenizer, {"messages": [*messages, {"role": "assistant", "content": reply}]},
        "last_assistant",
    )  # fmt: skip
    end = max((t for t, m in enumerate(ex.loss_mask) if m), default=len(ex) - 1) + 1
    return TokenizedExample(ex.input_ids[:end], ex.loss_mask[:end], ex.truncated)


def fit_replies(
    seqs: list[TokenizedExample], max_length: int, policy: str = "truncate"
) -> list[TokenizedExample] | None:
    """Fit replies to one prompt (each a `tokenize_reply` sequence) into max_length together,
    as TRL does: the prompt keeps its last tokens, at most max(max_length - longest reply,
    max_length // 2) of them, the same budget for every reply; each reply keeps its start. None
    under policy "drop" when any is over-long, or when a reply would keep no trained token."""
    if max(len(s) for s in seqs) <= max_length:
        return seqs
    if policy == "drop":
        return None
    starts = [next((t for t, m in enumerate(s.loss_mask) if m), len(s)) for s in seqs]
    longest_reply = max(len(s) - st for s, st in zip(seqs, starts, strict=True))
    prompt_budget = max(max_length - longest_reply, max_length // 2)
    out = []
    for s, st in zip(seqs, starts, strict=True):
        a = st - min(st, prompt_budget)  # the prompt's kept tokens begin here
        b = a + max_length  # and the reply's end is cut here
        cut = TokenizedExample(s.input_ids[a:b], s.loss_mask[a:b], a > 0 or b < len(s))
        if cut.n_trained == 0:
            return None
        out.append(cut)
    return out


def tokenize_pairs(
    tokenizer, pairs: list[dict], max_length: int, overlong: str = "truncate"
) -> tuple[list[TokenizedPair], PairStats]:
    stats = PairStats(pairs=len(pairs))
    out = []
    for p in pairs:
        fitted = fit_replies(
            [tokenize_reply(tokenizer, p["messages"], p[k]) for k in ("chosen", "rejected")],
            max_length, overlong,
        )  # fmt: skip
        if fitted is None:
            stats.drop(overlong)
            continue
        c, r = fitted
        stats.truncated += c.truncated or r.truncated
        out.append(TokenizedPair(c, r, p.get("margin"), str(p.get("prompt_id", ""))))
    if not out:
        raise ValueError(
            f"no preference pairs left (of {len(pairs)}) within max_length {max_length} "
            f"(overlong: {overlong}): raise max_length, or set overlong: truncate"
        )
    return out, stats


def length_balanced(pairs: list[dict], seed: int) -> tuple[list[dict], dict]:
    """Pairs whose chosen reply is longer (in words) and pairs whose chosen reply is shorter made
    equally many, by dropping pairs at random (seeded) from the larger side; pairs of equal
    length carry no length preference and are all kept (Singhal et al. 2310.03716, whose code
    keeps min(#longer, #shorter) of each). Returns the kept pairs in their order, and counts
    {"data/chosen_longer", "data/chosen_shorter", "data/length_balance_dropped"} (before)."""
    words = [(len(p["chosen"].split()), len(p["rejected"].split())) for p in pairs]
    longer = [i for i, (c, r) in enumerate(words) if c > r]
    shorter = [i for i, (c, r) in enumerate(words) if c < r]
    big, small = (longer, shorter) if len(longer) >= len(shorter) else (shorter, longer)
    drop = set(random.Random(seed).sample(big, len(big) - len(small)))
    kept = [p for i, p in enumerate(pairs) if i not in drop]
    return kept, {"data/chosen_longer": len(longer), "data/chosen_shorter": len(shorter),
                  "data/length_balance_dropped": len(drop)}  # fmt: skip


def tokenize_feedback(
    tokenizer, records: list[dict], max_length: int, overlong: str = "truncate"
) -> tuple[list[TokenizedPair], PairStats]:
    """KTO's inputs: each feedback record's reply, paired with a mismatched sequence (its prompt
    with the next record's reply, fixed once) whose policy-minus-reference log-ratio estimates
    the KL reference point z0, as in the KTO paper and TRL. The two are fitted to max_length
    together (`fit_replies`); a record that cannot be is dropped (counted)."""
    stats = PairStats(pairs=len(records))
    out = []
    for i, r in enumerate(records):
        other = records[(i + 1) % len(records)]["completion"]
        fitted = fit_replies(
            [tokenize_reply(tokenizer, r["messages"], reply) for reply in (r["completion"], other)],
            max_length, overlong,
        )  # fmt: skip
        if fitted is None:
            stats.drop(overlong)
            continue
        ex, kl = fitted
        stats.truncated += ex.truncated or kl.truncated
        out.append(TokenizedPair(ex, kl, None, str(r.get("prompt_id", "")), bool(r["label"])))
    if not out:
        raise ValueError(
            f"no feedback records left (of {len(records)}) within max_length {max_length} "
            f"(overlong: {overlong}): raise max_length, or set overlong: truncate"
        )
    return out, stats


@dataclass
class SeqBatch:
    batch: Batch  # (R, T) rows holding the sequences, padded or packed
    target_seq: torch.Tensor  # (N,) sequence index of each target position, row-major
    last: torch.Tensor  # (S, 2) row and column of each sequence's last token
    n_seqs: int
    index: torch.Tensor  # (B,) indices of the pairs in this micro-batch (into the pair list)
    margin: torch.Tensor | None = None  # (B,) per-pair margins, when every pair has one
    desirable: torch.Tensor | None = None  # (B,) bool, KTO: the judgement of each reply

    def to(self, device) -> SeqBatch:
        return SeqBatch(
            self.batch.to(device), self.target_seq.to(device), self.last.to(device), self.n_seqs,
            self.index, None if self.margin is None else self.margin.to(device),
            None if self.desirable is None else self.desirable.to(device),
        )  # fmt: skip

    @property
    def n_pairs(self) -> int:
        return self.n_seqs // 2


def sequence_batch(
    seqs: list[TokenizedExample], pad_id: int, packing: bool = False, row_len: int | None = None
) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    """(batch, target_seq, last) for a list of sequences, padded one per row or packed."""
    if packing:
        rows = pack_rows([len(s) for s in seqs], row_len or max(len(s) for s in seqs))
        batch = packed_batch([[seqs[i] for i in row] for row in rows], pad_id, row_len)
    else:
        rows = [[i] for i in range(len(seqs))]
        batch = pad_batch(seqs, pad_id)
    seg = torch.full(batch.labels.shape, -1, dtype=torch.long)
    last = torch.zeros((len(seqs), 2), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(seqs[i])
            seg[r, at : at + n] = i
            last[i] = torch.tensor([r, at + n - 1])
            at += n
    target_seq = seg[batch.labels != IGNORE_INDEX]
    return batch, target_seq, last


def pair_batch(
    pairs: list[TokenizedPair], index: list[int], pad_id: int, packing: bool, row_len: int | None
) -> SeqBatch:
    """The 2B sequences of B pairs: chosen first, then rejected, in pair order."""
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    batch, target_seq, last = sequence_batch(seqs, pad_id, packing, row_len)
    margins = [p.margin for p in pairs]
    margin = None if any(m is None for m in margins) else torch.tensor(margins, dtype=torch.float)
    labels = [p.desirable for p in pairs]
    desirable = None if any(x is None for x in labels) else torch.tensor(labels, dtype=torch.bool)
    return SeqBatch(batch, target_seq, last, len(seqs), torch.tensor(index), margin, desirable)


class PairBatches:
    """Micro-batches of `batch_size` pairs in a seeded order, reshuffled each epoch (length-
    grouped when padded); micro-batch k is a pure function of k, so resume sees the same data."""

    def __init__(self, pairs: list[TokenizedPair], *, batch_size: int, pad_id: int,
                 packing: bool, row_len: int, seed: int):  # fmt: skip
        self.pairs, self.batch_size, self.pad_id = pairs, batch_size, pad_id
        self.packing, self.row_len, self.seed = packing, row_len, seed
        self.per_epoch = math.ceil(len(pairs) / batch_size)
        self._cache: dict[int, list[list[int]]] = {}

    def _plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._cache:
            rng = random.Random(self.seed * 7919 + epoch)
            idx = list(range(len(self.pairs)))
            rng.shuffle(idx)
            if not self.packing:  # similar lengths together: less padding
                size = lambda i: max(len(self.pairs[i].chosen), len(self.pairs[i].rejected))  # noqa: E731
                mega = self.batch_size * 50
                idx = [
                    j for c in range(0, len(idx), mega) for j in sorted(idx[c : c + mega], key=size)
                ]
            plan = [idx[b : b + self.batch_size] for b in range(0, len(idx), self.batch_size)]
            rng.shuffle(plan)
            self._cache = {epoch: plan}
        return self._cache[epoch]

    def indices(self, k: int) -> list[int]:
        """The pairs of micro-batch k."""
        epoch, i = divmod(k, self.per_epoch)
        return self._plan(epoch)[i]

    def micro(self, k: int) -> SeqBatch:
        index = self.indices(k)
        return pair_batch(
            [self.pairs[j] for j in index], index, self.pad_id, self.packing, self.row_len
        )

    def all(self, batch_size: int | None = None) -> list[SeqBatch]:
        """Every pair once, in file order (for evaluation and reference log-probs)."""
        bs = batch_size or self.batch_size
        return [
            pair_batch(
                self.pairs[s : s + bs],
                list(range(s, min(s + bs, len(self.pairs)))),
                self.pad_id,
                self.packing,
                self.row_len,
            )  # fmt: skip
            for s in range(0, len(self.pairs), bs)
        ]

    def steps_for(self, epochs: float, grad_accum: int) -> int:
        return max(1, math.ceil(epochs * self.per_epoch / grad_accum))


def sequence_logps(model, sb: SeqBatch, mean: bool = False) -> torch.Tensor:
    """Summed (or mean) log-prob of each sequence's trained tokens: (S,). Only target positions
    go through the LM head, and padding never enters any sum."""
    from posttrain.models.forward import target_logps

    b = sb.batch
    lp, _, _ = target_logps(model, b.input_ids, b.labels, b.attention_mask, b.position_ids)  # (N,)
    sums = torch.zeros(sb.n_seqs, dtype=lp.dtype, device=lp.device).index_add(0, sb.target_seq, lp)
    if not mean:
        return sums
    counts = torch.zeros(sb.n_seqs, dtype=lp.dtype, device=lp.device).index_add(
        0, sb.target_seq, torch.ones_like(lp)
    )
    return sums / counts.clamp(min=1)
