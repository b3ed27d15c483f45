"""Policy entropy at evaluation: the entropy of the model's next-token distribution (temperature
1) at each token of its own sampled responses, from one teacher-forced forward pass.

The sampler keeps only the log-prob of the token it chose; the entropy needs the whole
distribution. (The mean of -log p(chosen) is an unbiased but noisy estimate of the same number
when sampling at temperature 1 without top-k/p; the exact entropy has no sampling noise and is
right at any sampling temperature.) A collapsing entropy is the token-level face of the loss of
diversity that RLHF causes.
"""

from __future__ import annotations

import torch


@torch.inference_mode()
def token_entropies(
    model, pairs: list[tuple[list[int], list[int]]], pad_id: int, max_rows: int = 64,
    chunk: int = 1024
) -> list[tuple[list[float], list[float]]]:  # fmt: skip
    """Per response, (the entropy in nats of the next-token distribution at each of its tokens,
    the log-prob of the token itself), both at temperature 1, teacher-forced.

    pairs: (prompt ids, response ids) per sequence, the prompt non-empty. Up to `max_rows`
    responses at a time; within them each distinct prompt is read once (the k samples of a prompt
    share its KV cache), so the cost is about one prefill of the prompts plus one pass over the
    answers, not k passes over every prompt (few-shot prompts are far longer than the answers).
    """
    for i, (p, _) in enumerate(pairs):
        if not p:
            raise ValueError(f"sequence {i}: empty prompt (nothing predicts its first token)")
    # an empty response has no token to score; same prompts side by side, similar lengths together
    order = sorted((i for i, (_, r) in enumerate(pairs) if r), key=lambda i: (len(pairs[i][0]), pairs[i][0]))  # fmt: skip
    out: list[tuple[list[float], list[float]]] = [([], []) for _ in pairs]
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(order), max_rows):
            rows = order[s : s + max_rows]
            for i, st in zip(rows, _batch(model, [pairs[i] for i in rows], pad_id, chunk), strict=True):  # fmt: skip
                out[i] = st
    finally:
        model.train(was_training)
    return out


def _batch(model, pairs: list[tuple[list[int], list[int]]], pad_id: int,
           chunk: int) -> list[tuple[list[float], list[float]]]:  # fmt: skip
    """One batch of token_entropies: the distinct prompts left-padded and read once (as the
    sampler reads them: positions count real tokens only), their cache rows picked once per
    response, then the responses right-padded and read on top of it. Where the logits are the
    plain LM head of the decoder output, only the answer positions are projected, `chunk` rows
    at a time: (S, R, V) logits of a large vocabulary are never built (models.forward)."""
    from transformers import DynamicCache

    from posttrain.models.forward import plain_head
    from posttrain.ops.rl import entropy_from_logits

    device = next(model.parameters()).device
    index: dict[tuple[int, ...], int] = {}
    which = [index.setdefault(tuple(p), len(index)) for p, _ in pairs]  # (S,) its prompt's row
    prompts = list(index)
    U, T = len(prompts), max(len(p) for p in prompts)
    S, R = len(pairs), max(len(r) for _, r in pairs)
    prompt_ids = torch.full((U, T), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((U, T), dtype=torch.long)
    for u, p in enumerate(prompts):
        prompt_ids[u, T - len(p) :] = torch.tensor(p, dtype=torch.long)
        prompt_mask[u, T - len(p) :] = 1
    ids = torch.full((S, R), pad_id, dtype=torch.long)
    resp_mask = torch.zeros((S, R), dtype=torch.long)
    for b, (_, r) in enumerate(pairs):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        resp_mask[b, : len(r)] = 1  # right padding: no real token attends to it (causal)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    ids, resp_mask = ids.to(device), resp_mask.to(device)
    sel = torch.tensor(which, dtype=torch.long, device=device)  # (S,)

    plain = plain_head(model)
    body = model.get_decoder() if plain else model  # hidden states (C) or logits (V)
    head = model.get_output_embeddings() if plain else (lambda x: x)
    key = "last_hidden_state" if plain else "logits"
    cache = DynamicCache(config=getattr(model, "config", None))
    extra = {} if plain else {"logits_to_keep": 1}
    out = body(input_ids=prompt_ids, attention_mask=prompt_mask, past_key_values=cache,
               position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0), use_cache=True, **extra)  # fmt: skip
    first = out[key][:, -1]  # (U, C|V): predicts each response's first token
    cache.batch_select_indices(sel)  # (U, ...) -> (S, ...): a prompt's rows, once per response
    positions = prompt_mask.sum(-1)[sel, None] + torch.arange(R, device=device)  # (S, R)
    out = body(input_ids=ids, attention_mask=torch.cat([prompt_mask[sel], resp_mask], -1),
               position_ids=positions, past_key_values=cache, use_cache=True)  # fmt: skip
    # column j of the responses' output predicts token j + 1; shifted: column j predicts j
    pred = torch.cat([first[sel][:, None], out[key][:, :-1]], dim=1)  # (S, R, C|V)
    keep = resp_mask.bool()  # (S, R)
    flat, targets = pred[keep], ids[keep]  # (N, C|V), (N,): row-major, each response in order
    ents, logps = [], []
    for c in range(0, len(targets), chunk):
        lg = head(flat[c : c + chunk]).float()  # (n, V)
        ents.append(entropy_from_logits(lg))
        logps.append(torch.log_softmax(lg, -1).gather(-1, targets[c : c + chunk, None])[:, 0])
    ent, logp = torch.cat(ents).tolist(), torch.cat(logps).tolist()
    res, at = [], 0
    for _, r in pairs:
        res.append((ent[at : at + len(r)], logp[at : at + len(r)]))
        at += len(r)
    return res


def policy_entropy(model, pairs: list[tuple[list[int], list[int]]], pad_id: int,
                   max_rows: int = 64) -> float | None:  # fmt: skip
    """policy/entropy: the mean over responses of their mean per-token entropy (nats), so that
    each response weighs the same whatever its length. None if no response has a token."""
    per = [sum(e) / len(e) for e, _ in token_entropies(model, pairs, pad_id, max_rows) if e]
    return sum(per) / len(per) if per else None
