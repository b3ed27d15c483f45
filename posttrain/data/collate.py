"""Batches of tokenised examples: right-padded, or packed several to a row.

Both give next-token `labels` (B, T) that are IGNORE_INDEX wherever no loss is taken: padding,
untrained tokens, and the last token of every example, so a packed row never asks one example
to predict the first token of the next. Packed rows restart `position_ids` at 0 for every
example and carry no attention mask: Hugging Face models then build a block-diagonal causal
mask from the position resets (with `use_cache=False`), so attention never crosses examples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from posttrain.data.chat import TokenizedExample

IGNORE_INDEX = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T) target for position t, IGNORE_INDEX where none
    position_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T) 1 = real token; None for packed rows
    n_tokens: int  # non-pad tokens
    n_loss_tokens: int  # trained targets

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.position_ids),
                     move(self.attention_mask), self.n_tokens, self.n_loss_tokens)  # fmt: skip


def example_labels(ex: TokenizedExample) -> list[int]:
    """labels[t] = ids[t+1] where token t+1 is trained, else IGNORE; the last has no target."""
    ids, mask = ex.input_ids, ex.loss_mask
    return [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [
        IGNORE_INDEX
    ]


def pad_batch(examples: list[TokenizedExample], pad_id: int) -> Batch:
    """Right-padded batch; positions 0..len-1 per row."""
    T = max(len(e) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(example_labels(e))
        attn[i, :n] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids, labels, pos, attn, int(attn.sum()), int((labels != IGNORE_INDEX).sum()))


def pack_rows(lengths: list[int], row_len: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of example indices into rows of at most row_len tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        if lengths[i] > row_len:
            raise ValueError(
                f"example {i} has {lengths[i]} tokens, more than the row length {row_len}"
            )
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_len - lengths[i])
    return rows


def packed_batch(
    rows: list[list[TokenizedExample]], pad_id: int, row_len: int | None = None
) -> Batch:
    """One row per list of examples, concatenated; positions restart at each example."""
    T = row_len or max(sum(len(e) for e in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    n_tokens = 0
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e)
            ids[r, at : at + n] = torch.tensor(e.input_ids)
            labels[r, at : at + n] = torch.tensor(example_labels(e))
            pos[r, at : at + n] = torch.arange(n)
            at += n
        pos[r, at:] = torch.arange(T - at)  # the padding tail is a block of its own
        n_tokens += at
    return Batch(ids, labels, pos, None, n_tokens, int((labels != IGNORE_INDEX).sum()))


def length_grouped(
    lengths: list[int], batch_size: int, seed: int, mega: int = 50
) -> list[list[int]]:
    """Shuffled batches of similar length (less padding): shuffle, sort within chunks of
    batch_size*mega, cut into batches, shuffle the batches."""
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    batches = []
    for c in range(0, len(idx), batch_size * mega):
        chunk = sorted(idx[c : c + batch_size * mega], key=lambda i: -lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def check_packing_isolation(
    model, examples: list[TokenizedExample], pad_id: int, atol: float = 1e-3
) -> float:
    """Run two examples packed in one row and each alone; the logits must agree.

    Packing relies on the model building a block-diagonal mask from position-id resets (as
    Hugging Face models do with `use_cache=False` and no attention mask). A model that does not
    would let examples attend to each other silently; this catches it before training.
    Returns the largest logit difference; raises ValueError above `atol`.
    """
    from posttrain.models.forward import target_logits

    pair = sorted(examples[:2], key=len)
    if len(pair) < 2:
        return 0.0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        alone = [target_logits(model, *_args(pad_batch([e], pad_id), device))[0] for e in pair]
        packed, _ = target_logits(model, *_args(packed_batch([pair], pad_id), device))
    model.train(was_training)
    diff = (packed - torch.cat(alone)).abs().max().item()
    if diff > atol:
        raise ValueError(
            f"packing check failed: packed and separate logits differ by {diff:.3g}; this model's "
            "attention does not honour position-id resets. Set packing: false."
        )
    return diff


def _args(b: Batch, device):
    b = b.to(device)
    return b.input_ids, b.labels, b.attention_mask, b.position_ids
