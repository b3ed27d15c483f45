"""SFT data: read chat examples, tokenise them with loss masks, and serve training batches."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from posttrain.data.chat import TokenizedExample, fit_length, tokenize_chat
from posttrain.data.collate import Batch, length_grouped, pack_rows, packed_batch, pad_batch


@dataclass
class SFTDataStats:
    examples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_untrained: int = 0
    trained_tokens: int = 0
    total_tokens: int = 0
    read: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        return {f"data/{k}": v for k, v in self.__dict__.items() if k != "read"} | {
            f"data/read_{k}": v for k, v in self.read.items() if isinstance(v, int)
        }

    def describe(self, max_length: int, overlong: str) -> str | None:
        """One console line on the examples cut or dropped; None when every one was kept whole."""
        parts = []
        if self.truncated:
            parts.append(f"truncated {self.truncated} to their first {max_length} tokens")
        if self.dropped_overlong and overlong == "drop":
            parts.append(f"dropped {self.dropped_overlong} longer than max_length {max_length} "
                         "(overlong: drop; overlong: truncate keeps their start)")  # fmt: skip
        elif self.dropped_overlong:
            parts.append(f"dropped {self.dropped_overlong} with no trained token in their first "
                         f"{max_length} (raise max_length to keep them)")  # fmt: skip
        if self.dropped_untrained:
            parts.append(f"dropped {self.dropped_untrained} with no assistant token to train on")
        return f"of {self.examples} examples: " + "; ".join(parts) if parts else None


def tokenize_examples(
    tokenizer, examples: list[dict], max_length: int, overlong: str, train_on: str
) -> tuple[list[TokenizedExample], SFTDataStats]:
    stats = SFTDataStats(examples=len(examples))
    out = []
    for ex in examples:
        tok = tokenize_chat(tokenizer, ex, train_on)
        if tok.n_trained == 0:
            stats.dropped_untrained += 1
            continue
        fitted = fit_length(tok, max_length, overlong)  # keep-start: the first turns, with masks
        if fitted is None:
            stats.dropped_overlong += 1
            continue
        stats.truncated += fitted.truncated
        stats.trained_tokens += fitted.n_trained
        stats.total_tokens += len(fitted)
        out.append(fitted)
    stats.kept = len(out)
    if not out:
        raise ValueError(
            f"no trainable SFT examples left (of {len(examples)}): check max_length and the data"
        )
    return out, stats


class SFTBatches:
    """Micro-batches in a seeded order, reshuffled each epoch; micro-batch k of the run is a pure
    function of k, so a resumed run sees exactly the batches it would have seen."""

    def __init__(
        self,
        examples: list[TokenizedExample],
        *,
        batch_size: int,
        pad_id: int,
        packing: bool,
        row_len: int,
        seed: int,
    ):
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.packing, self.row_len, self.seed = packing, row_len, seed
        self._epoch_cache: dict[int, list[list[int]]] = {}
        self.per_epoch = len(self._plan(0))

    def _plan(self, epoch: int) -> list[list]:
        if epoch not in self._epoch_cache:
            self._epoch_cache = {epoch: self._make_plan(epoch)}
        return self._epoch_cache[epoch]

    def _make_plan(self, epoch: int) -> list[list]:
        lengths = [len(e) for e in self.examples]
        seed = self.seed * 7919 + epoch
        if not self.packing:
            return length_grouped(lengths, self.batch_size, seed)
        order = list(range(len(lengths)))
        random.Random(seed).shuffle(order)
        rows = [
            [order[i] for i in row] for row in pack_rows([lengths[i] for i in order], self.row_len)
        ]
        random.Random(seed + 1).shuffle(rows)
        return [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    def micro(self, k: int) -> Batch:
        if self.packing:
            return packed_batch(self.packed_rows(k), self.pad_id, self.row_len)
        epoch, i = divmod(k, self.per_epoch)
        return pad_batch([self.examples[j] for j in self._plan(epoch)[i]], self.pad_id)

    def packed_rows(self, k: int) -> list[list[TokenizedExample]]:
        """The examples of each packed row of micro-batch k."""
        epoch, i = divmod(k, self.per_epoch)
        return [[self.examples[j] for j in row] for row in self._plan(epoch)[i]]

    def steps_for(self, epochs: float, grad_accum: int) -> int:
        return max(1, math.ceil(epochs * self.per_epoch / grad_accum))


class ReplayBatches:
    """SFT micro-batches with `rows` windows of pre-training text added to each (replay).

    Mixing the base model's own pre-training data into fine-tuning keeps what it learned there
    (InstructGPT's "ptx" term; the replay of continual learning): a small model fine-tuned on a
    few hundred facts otherwise overwrites the facts it was not shown. Replay windows are trained
    on every token, like pre-training; micro-batch k is still a pure function of k.
    """

    def __init__(self, data: SFTBatches, stream, rows: int, seed: int):
        if not data.packing:
            raise ValueError("sft.replay.rows needs sft.packing: true")
        if len(stream) < data.row_len + 2:
            raise ValueError(
                f"replay text too short: {len(stream)} tokens for rows of {data.row_len}"
            )
        self.data, self.stream, self.rows, self.seed = data, stream, rows, seed
        self.per_epoch, self.pad_id, self.row_len = data.per_epoch, data.pad_id, data.row_len

    def windows(self, k: int) -> list[TokenizedExample]:
        rng = random.Random(self.seed * 1_000_003 + k)
        high = len(self.stream) - self.row_len
        out = []
        for _ in range(self.rows):
            s = rng.randrange(high)
            ids = self.stream[s : s + self.row_len].tolist()
            out.append(TokenizedExample(ids, [0] + [1] * (len(ids) - 1)))
        return out

    def micro(self, k: int) -> Batch:
        rows = self.data.packed_rows(k) + [[w] for w in self.windows(k)]
        return packed_batch(rows, self.pad_id, self.row_len)

    def steps_for(self, epochs: float, grad_accum: int) -> int:
        return self.data.steps_for(epochs, grad_accum)
