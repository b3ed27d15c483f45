"""Batched decoding with a KV cache over any Hugging Face causal LM's forward.

Our own loop rather than `model.generate`: we need the raw log-prob of every generated token,
exact control of stopping (the stop token is kept in `token_ids` so SFT/RL can train on it), and
behaviour that is the same for the toy model on a CPU and a real model on a GPU.

Prompts are left-padded so every row's next token sits at the last column. Positions come from
the attention mask (cumsum - 1), so a row's padding does not shift its rotary positions and a
padded row decodes exactly as it would alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from posttrain.generate.sampling import SamplingParams, choose_next


@dataclass
class Generation:
    """One sampled response.

    token_ids includes the stop token when one was produced; logprobs has one entry per
    token_ids entry, log p(token | prefix) under the model's raw distribution (temperature 1, no
    top-k/p). text is the decoded response without the stop token and special tokens.
    """

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finished: bool  # ended with a stop token
    truncated: bool  # hit max_new_tokens without a stop token
    prompt_ids: list[int]


def generate(
    model,
    tokenizer,
    prompts,
    params: SamplingParams,
    on_token: Callable[[int, int], None] | None = None,
) -> list[Generation]:
    """Sample one response per prompt; results come back in the order of `prompts`.

    prompts: token-id lists, or strings (tokenised as-is, without special tokens added).
    Prompts are sorted by length into batches of params.batch_size to reduce padding; one
    generator seeded with params.seed drives all batches, so the same inputs and params give
    identical outputs (sampled outputs depend on the batching, greedy ones do not).
    on_token(prompt index, token id), for streaming, is called for every token of every row as
    it is decoded (the stop token included; a finished row gets no more calls). It costs one
    host sync a step and changes nothing in the outputs.
    """
    from posttrain.models.tokenizer import end_of_turn_ids
    from posttrain.train import dist

    prompt_ids = [
        tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else list(p)
        for p in prompts
    ]
    _check_lengths(model, prompt_ids, params.max_new_tokens)
    stop_ids = (
        end_of_turn_ids(tokenizer) if params.stop_token_ids is None else params.stop_token_ids
    )
    pad_id = tokenizer.pad_token_id
    if pad_id is None:  # many base models have no pad token; what we feed there is masked anyway
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))  # stable
    results: list[Generation | None] = [None] * len(prompt_ids)
    batches = [order[s : s + params.batch_size] for s in range(0, len(order), params.batch_size)]
    if params.shared:  # this rank's share of the batches (all of them in a single process)
        batches = dist.shard(batches)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for idx in batches:
                batch = [prompt_ids[i] for i in idx]
                emit = None if on_token is None else _row_to_prompt(on_token, idx)
                outs = _decode_batch(
                    model, batch, params, stop_ids, pad_id, device, generator, emit
                )
                for i, (ids, logps) in zip(idx, outs, strict=True):
                    results[i] = _to_generation(tokenizer, prompt_ids[i], ids, logps, stop_ids)
    finally:
        model.train(was_training)
    if params.shared and dist.active():
        for part in dist.gather({i: g for i, g in enumerate(results) if g is not None}):
            for i, g in part.items():
                results[i] = g
    return results


def generate_chat(
    model, tokenizer, conversations: list[list[dict]], params: SamplingParams, tools=None
) -> list[Generation]:
    """Render each conversation with the chat template (plus the assistant header), then generate."""
    prompt_ids = [
        tokenizer.apply_chat_template(
            conv, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for conv in conversations
    ]
    return generate(model, tokenizer, prompt_ids, params)


def sample_n(model, tokenizer, prompts, n: int, params: SamplingParams) -> list[list[Generation]]:
    """n samples per prompt: out[i][j] is sample j of prompts[i].

    The n copies of a prompt are decoded side by side with one seeded generator, so they draw
    different random numbers and differ (unless decoding is greedy).
    """
    if n < 1:
        raise ValueError(f"sample_n: n={n} must be >= 1")
    flat = generate(model, tokenizer, [p for p in prompts for _ in range(n)], params)
    return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]


def _row_to_prompt(on_token: Callable[[int, int], None], idx: list[int]):
    """A batch's on_token(row, token id) calling the caller's on_token(prompt index, token id)."""
    return lambda row, token_id: on_token(idx[row], token_id)


def emit_tokens(on_token, rows: torch.Tensor, active: torch.Tensor, tokens: torch.Tensor) -> None:
    """on_token(row, token id) for each active row: rows, active, tokens are (b,)."""
    for row, token_id in zip(rows[active].tolist(), tokens[active].tolist(), strict=True):
        on_token(row, token_id)


def _check_lengths(model, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompt {i} is empty: there is nothing to condition on")
        if limit is not None and len(ids) + max_new_tokens > limit:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that is "
                f"{len(ids) + max_new_tokens} > the model's max_position_embeddings={limit}"
            )


def _decode_batch(
    model,
    prompts: list[list[int]],
    params: SamplingParams,
    stop_ids: list[int],
    pad_id: int,
    device: torch.device,
    generator: torch.Generator,
    on_token: Callable[[int, int], None] | None = None,
) -> list[tuple[list[int], list[float]]]:
    """Decode one batch; returns, per prompt, (generated ids incl. stop, their raw logps).
    on_token(row, token id) as each row's tokens are decoded (see generate)."""
    from posttrain.generate import static

    total = max(len(p) for p in prompts) + params.max_new_tokens
    args = (model, prompts, params, stop_ids, pad_id, device, generator, on_token)
    if params.engine == "auto" and static.supports(model, total):
        return static.decode_batch(*args)
    return _decode_batch_hf(*args)


def _decode_batch_hf(
    model,
    prompts: list[list[int]],
    params: SamplingParams,
    stop_ids: list[int],
    pad_id: int,
    device: torch.device,
    generator: torch.Generator,
    on_token: Callable[[int, int], None] | None = None,
) -> list[tuple[list[int], list[float]]]:
    """_decode_batch through the model's own forward and a DynamicCache (any architecture)."""
    from transformers import DynamicCache

    B, T, N = len(prompts), max(len(p) for p in prompts), params.max_new_tokens
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, p in enumerate(prompts):
        input_ids[b, T - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[b, T - len(p) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)  # (B, T)

    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)  # (S,)
    new_ids = torch.full((B, N), pad_id, dtype=torch.long, device=device)  # (B, N)
    new_logps = torch.zeros((B, N), dtype=torch.float32, device=device)  # (B, N)
    n_new = torch.zeros(B, dtype=torch.long, device=device)  # (B,) tokens generated so far
    done = torch.zeros(B, dtype=torch.bool, device=device)  # (B,) produced a stop token
    cache = DynamicCache(config=getattr(model, "config", None))

    step_ids = input_ids  # the whole prompt at the prefill, then one token per step
    for t in range(N):
        # Positions count only real tokens, so padding never shifts them; pad slots get 0.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]  # (B, q)
        out = model(
            input_ids=step_ids,
            attention_mask=mask,  # (B, past + q): the cache's length plus this step's tokens
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,  # only the last column: the prefill never builds (B, T, V)
        )
        tokens, logps = choose_next(out.logits[:, -1, :], params, generator)  # (B,), (B,)
        active = ~done  # rows still generating: their token is real
        tokens = torch.where(active, tokens, pad_id)
        new_ids[:, t] = tokens
        new_logps[:, t] = logps
        n_new += active.long()
        if on_token is not None:
            emit_tokens(on_token, torch.arange(B, device=device), active, tokens)
        done |= active & torch.isin(tokens, stop)
        if bool(done.all()):  # one host sync per step, to stop the batch early
            break
        # Finished rows are fed pad tokens, masked out so nothing attends to them.
        step_ids = tokens.unsqueeze(-1)  # (B, 1)
        mask = torch.cat([mask, (~done).long().unsqueeze(-1)], dim=-1)  # (B, past + 1)

    ids, logps, lengths = new_ids.tolist(), new_logps.tolist(), n_new.tolist()
    return [(ids[b][: lengths[b]], logps[b][: lengths[b]]) for b in range(B)]


def _to_generation(tokenizer, prompt_ids, ids, logps, stop_ids) -> Generation:
    finished = bool(ids) and ids[-1] in stop_ids
    text = tokenizer.decode(ids[:-1] if finished else ids, skip_special_tokens=True)
    return Generation(
        text=text,
        token_ids=ids,
        logprobs=logps,
        finished=finished,
        truncated=not finished,
        prompt_ids=list(prompt_ids),
    )
