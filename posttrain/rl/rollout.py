"""Rollouts: sample responses, and lay per-token quantities out as (S, L) response matrices.

A rollout of S sequences keeps every per-token quantity (log-probs, reference log-probs, values,
rewards, advantages) as an (S, L) matrix over response tokens with a mask: row i holds sequence
i's response tokens left-aligned, so `matrix[mask]` is the flat, row-major order in which
`models.forward.target_logps` returns target positions of a right-padded batch, and
`from_flat` is its inverse. Only response tokens ever pass through the LM head or value head.
A multi-turn rollout with tools (rl/agent_rollout.py) has the same layout: a sequence's
"response" is then the tokens the policy generated over all its turns, the tool turns between
them left out of the labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from posttrain.data.chat import TokenizedExample
from posttrain.data.collate import pad_batch
from posttrain.ops.lm import IGNORE_INDEX


def from_flat(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) values in row-major order of the mask's True entries -> (S, L) (0 elsewhere)."""
    out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
    out[mask] = flat
    return out


def response_mask(lengths: list[int], device=None) -> torch.Tensor:
    L = max(lengths) if lengths else 0
    return torch.arange(L, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]


@dataclass
class Rollout:
    prompts: list[dict]  # the prompt record of each sequence (a prompt repeated k times)
    group: torch.Tensor  # (S,) index of the prompt each sequence answers
    seqs: list[TokenizedExample]  # prompt + response ids, loss mask on the response
    texts: list[str]  # decoded responses
    finished: torch.Tensor  # (S,) bool: ended with a stop token
    mask: torch.Tensor  # (S, L) valid response tokens
    old_logp: torch.Tensor | None = None  # (S, L) at sampling temperature, before the update
    ref_logp: torch.Tensor | None = None
    values: torch.Tensor | None = None
    scores: torch.Tensor | None = None  # (S,) sequence-level reward (after the no-EOS penalty)
    rewards: torch.Tensor | None = None  # (S, L) per-token reward (KL penalty, score at the end)
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    components: list[dict] = field(default_factory=list)
    loss_mask: torch.Tensor | None = None  # (S, L) the tokens the policy loss counts
    # (batch, log-probs, entropies, values) of a forward run with its graph for the update
    graph: tuple | None = None
    # tool rollouts: each episode's counts (turns, calls, ...; see rl/agent_rollout.py)
    episodes: list[dict] | None = None

    @property
    def lengths(self) -> list[int]:
        return self.mask.sum(-1).tolist()


def prompt_texts(tok, prompts: list[dict], prompt_format: str = "chat") -> list[str]:
    """What the policy is given: chat, the messages through the chat template with the assistant
    header; plain, a {"prompt": text} record's text as it is (data.readers.load_prompts keeps it
    as "text")."""
    if prompt_format == "chat":
        return [tok.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=False)
                for p in prompts]  # fmt: skip
    out = []
    for p in prompts:
        if "text" not in p:
            raise ValueError(f"rollout.prompt_format is plain, but prompt {p.get('prompt_id')} "
                             "has messages, not a {\"prompt\": text} record: use chat, or give "
                             "plain prompts")  # fmt: skip
        out.append(p["text"])
    return out


def sample_rollout(policy, tok, prompts: list[dict], k: int, params,
                   prompt_format: str = "chat") -> Rollout:  # fmt: skip
    """k responses to each prompt record ({"messages", ...}), as a Rollout (no scores yet)."""
    from posttrain.generate import sample_n

    texts = prompt_texts(tok, prompts, prompt_format)
    groups = sample_n(policy, tok, texts, k, params)
    seqs, out_texts, finished, recs, group = [], [], [], [], []
    for g, (p, gens) in enumerate(zip(prompts, groups, strict=True)):
        for gen in gens:
            resp = list(gen.token_ids)
            if not resp:  # an immediate stop still trains on the stop token; never empty
                resp = [tok.eos_token_id]
            seqs.append(
                TokenizedExample(
                    list(gen.prompt_ids) + resp, [0] * len(gen.prompt_ids) + [1] * len(resp)
                )
            )
            out_texts.append(gen.text.strip())
            finished.append(bool(gen.finished))
            recs.append(p)
            group.append(g)
    lengths = [sum(s.loss_mask) for s in seqs]
    return Rollout(
        recs, torch.tensor(group), seqs, out_texts, torch.tensor(finished), response_mask(lengths)
    )


def batch_of(seqs: list[TokenizedExample], pad_id: int, device, packed: bool = False):
    """Right-padded batch (one sequence per row) whose labels are the response tokens; packed:
    the sequences laid end to end, in order, in rows twice as long as the longest one (so a row
    holds at least two whole sequences; the padding left is at most a row's tail), positions
    restarting at each (the model keeps them apart by those resets, as in SFT's packing). In
    order, so a packed batch's target positions come out in the same row-major sequence order
    as a padded one's, and `from_flat` reads both the same way."""
    if not packed:
        return pad_batch(seqs, pad_id).to(device)
    from posttrain.data.collate import packed_batch

    row_len = 2 * max(len(s) for s in seqs)
    rows, used = [[]], 0
    for s in seqs:
        if rows[-1] and used + len(s) > row_len:
            rows.append([])
            used = 0
        rows[-1].append(s)
        used += len(s)
    return packed_batch(rows, pad_id, row_len).to(device)


def token_logps(model, batch, temperature: float = 1.0, with_entropy: bool = False):
    """Flat (N,) log-probs of the response tokens at `temperature`, and their entropies (N,)
    without gradient (a metric), or None. The LM head runs a chunk of rows at a time
    (`models.forward.target_logps`)."""
    from posttrain.models.forward import target_logps

    b = batch
    logp, entropy, _ = target_logps(model, b.input_ids, b.labels, b.attention_mask,
                                    b.position_ids, temperature, with_entropy)  # fmt: skip
    return logp, entropy


def token_values(value_model, batch) -> torch.Tensor:
    """Flat (N,) values V(s_t) read where each response token is predicted."""
    from posttrain.models.lora import unwrap
    from posttrain.models.reward import score_head

    out = unwrap(value_model).base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=batch.position_ids, use_cache=False)  # fmt: skip
    keep = batch.labels != IGNORE_INDEX
    return score_head(value_model)(out.last_hidden_state[keep]).squeeze(-1).float()
