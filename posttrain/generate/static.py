"""Decoding with a pre-allocated KV cache and our own pass over the decoder's layers.

On small models, and on any model at small batch, a decoding step of `model(...)` with a
`DynamicCache` is mostly overhead, not arithmetic: building the 4-D mask from the 2-D one,
growing every layer's cache by concatenation, and the wrappers around each module (measured
in bench/RESULTS.md, "Rollouts"). This path does the same arithmetic with none of that, for the
decoder-only families whose layer is exactly

    x = x + o_proj(attention(rope(q_proj(norm1(x))), rope(k_proj(.)), v_proj(.)))
    x = x + mlp(norm2(x))

(Llama, Mistral without a sliding window in reach, Qwen2, Qwen3 with its q/k norms), calling the
model's own modules (norms, projections, MLP, rotary embedding, so LoRA layers, rope scaling and
bf16 autocast behave as in the model's forward) and doing itself only what is glue:

- one K and one V tensor per layer of (B, kv heads, prompt + max_new_tokens, head dim),
  allocated once; a step writes one column and attends to the columns written so far;
- a key mask held as (B, T + N) booleans, written one column a step, never rebuilt;
- rows that have produced their stop token leave the batch (their cache rows are dropped)
  once a quarter of the rows still decoding have finished, so a long straggler decodes alone;
- the random draws are those of the full batch (finished rows draw too, as in the loop of
  decode.py), so for the same seed the same tokens come out whichever path decodes.

Every other architecture, and a sliding window the sequence could reach, goes through the
model's own forward (decode._decode_batch_hf). tests/test_generate_static.py checks the logits
against the model's forward and the tokens against the other path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from posttrain.generate.decode import emit_tokens
from posttrain.generate.sampling import SamplingParams, choose_next

FAMILIES = {"llama", "mistral", "qwen2", "qwen3"}
COMPACT_SHARE = 0.25  # drop finished rows once this share of the rows decoding has finished


def causal_lm(model):
    """The transformers causal LM inside a peft wrapper (LoRA layers stay in place)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def supports(model, total_len: int) -> bool:
    """Whether `model`'s decoder is one this path reproduces, for sequences up to total_len."""
    lm = causal_lm(model)
    cfg = getattr(lm, "config", None)
    if getattr(cfg, "model_type", None) not in FAMILIES:
        return False
    body = getattr(lm, "model", None)
    if body is None or not all(hasattr(body, k) for k in ("embed_tokens", "layers", "norm")):
        return False
    if not hasattr(body, "rotary_emb") or not hasattr(lm, "lm_head"):
        return False
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) and window is not None and window < total_len:
        return False  # a window the sequence reaches: the model's own masks
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    return all(hasattr(layer.self_attn, "scaling") for layer in body.layers)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, h, q, d) rotated: x cos + rotate_half(x) sin, cos and sin (b, q, d)."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rot * sin.unsqueeze(1)


class _Cache:
    """Per layer a K and a V of (B, kv heads, length, head dim), allocated at the first write."""

    def __init__(self, n_layers: int, length: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.length = length

    def write(self, i: int, at: int, k: torch.Tensor, v: torch.Tensor):
        if self.k[i] is None:
            b, h, _, d = k.shape
            self.k[i] = k.new_empty(b, h, self.length, d)
            self.v[i] = v.new_empty(b, h, self.length, d)
        q = k.shape[2]
        self.k[i][:, :, at : at + q] = k
        self.v[i][:, :, at : at + q] = v
        return self.k[i][:, :, : at + q], self.v[i][:, :, : at + q]

    def keep(self, rows: torch.Tensor) -> None:
        self.k = [None if t is None else t.index_select(0, rows) for t in self.k]
        self.v = [None if t is None else t.index_select(0, rows) for t in self.v]


def _attend_one(q, keys, values, mask, scale: float) -> torch.Tensor:
    """Attention of one query per row: q (b, h, 1, d), keys and values (b, kv, n, d), mask
    (b, 1, 1, n). The query heads that share a kv head attend as one (b, kv, h/kv, n) product;
    on a CPU this is several times faster than the fused kernel at this shape."""
    b, h, _, d = q.shape
    kv = keys.shape[1]
    qg = q.reshape(b, kv, h // kv, d)
    scores = torch.matmul(qg, keys.transpose(-1, -2)) * scale  # (b, kv, h/kv, n)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(values.dtype)
    return torch.matmul(weights, values).reshape(b, h, 1, d)


def _layers(body, cache: _Cache, x, positions, mask, at: int) -> torch.Tensor:
    """The decoder over x (b, q, C) at `positions` (b, q), attending where `mask` (b, 1, q,
    at + q) is True; writes the q new keys and values at column `at`. Returns the normed
    hidden states (b, q, C)."""
    cos, sin = body.rotary_emb(x, positions)  # (b, q, d), the model's own (scaling included)
    b, q, _ = x.shape
    for i, layer in enumerate(body.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        qs = attn.q_proj(h).view(b, q, -1, attn.head_dim)
        ks = attn.k_proj(h).view(b, q, -1, attn.head_dim)
        vs = attn.v_proj(h).view(b, q, -1, attn.head_dim).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm of queries and keys
            qs, ks = attn.q_norm(qs), attn.k_norm(ks)
        qs = _rope(qs.transpose(1, 2), cos, sin)
        ks = _rope(ks.transpose(1, 2), cos, sin)
        keys, values = cache.write(i, at, ks, vs)
        if q == 1:
            out = _attend_one(qs, keys, values, mask, attn.scaling)
        else:
            out = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask,
                                                 scale=attn.scaling,
                                                 enable_gqa=qs.shape[1] != keys.shape[1])  # fmt: skip
        x = x + attn.o_proj(out.transpose(1, 2).reshape(b, q, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return body.norm(x)


@torch.inference_mode()
def decode_batch(
    model,
    prompts: list[list[int]],
    params: SamplingParams,
    stop_ids: list[int],
    pad_id: int,
    device: torch.device,
    generator: torch.Generator,
    on_token: Callable[[int, int], None] | None = None,
) -> list[tuple[list[int], list[float]]]:
    """decode._decode_batch's contract: per prompt, (generated ids incl. stop, their raw logps);
    on_token(row, token id) as each row's tokens are decoded."""
    lm = causal_lm(model)
    body = lm.model
    B, T, N = len(prompts), max(len(p) for p in prompts), params.max_new_tokens
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    real = torch.zeros((B, T), dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = torch.tensor(p, dtype=torch.long)
        real[b, T - len(p) :] = True
    ids, real = ids.to(device), real.to(device)
    keys_ok = torch.zeros((B, T + N), dtype=torch.bool, device=device)  # (B, T + N)
    keys_ok[:, :T] = real
    cache = _Cache(len(body.layers), T + N)

    # Prefill: causal over the real tokens; a padding position attends to itself only (its
    # output is never used, and a row with no key at all would give NaN).
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    causal = torch.ones((T, T), dtype=torch.bool, device=device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=device)
    mask = (causal & real[:, None, :]) | eye  # (B, T, T)
    h = _layers(body, cache, body.embed_tokens(ids), positions, mask[:, None], 0)
    logits = lm.lm_head(h[:, -1])  # (B, V)
    next_pos = real.sum(-1)  # (B,) the position of each row's next token

    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    out_ids = torch.full((B, N), pad_id, dtype=torch.long, device=device)
    out_logps = torch.zeros((B, N), dtype=torch.float32, device=device)
    n_new = torch.zeros(B, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)  # the original row of each row still in the batch
    full = None  # (B, V) logits of every original row: the draws are the full batch's
    for t in range(N):
        if len(rows) < B:
            if full is None:
                full = torch.zeros((B, logits.shape[-1]), dtype=logits.dtype, device=device)
            full[rows] = logits
            tokens, logps = choose_next(full, params, generator)
            tokens, logps = tokens[rows], logps[rows]
        else:
            tokens, logps = choose_next(logits, params, generator)
        active = ~done[rows]
        tokens = torch.where(active, tokens, pad_id)
        out_ids[rows, t] = tokens
        out_logps[rows, t] = logps
        n_new[rows] += active.long()
        if on_token is not None:
            emit_tokens(on_token, rows, active, tokens)
        finished_now = active & torch.isin(tokens, stop)
        done[rows] |= finished_now
        still = ~done[rows]
        if not bool(still.any()):
            break
        if t == N - 1:
            break
        n_done = int((~still).sum())
        if n_done and n_done >= COMPACT_SHARE * len(rows):  # finished rows leave the batch
            keep = still.nonzero().squeeze(-1)
            rows, tokens, still = rows[keep], tokens[keep], still[keep]
            cache.keep(keep)
            keys_ok, next_pos = keys_ok[keep], next_pos[keep]
        at = T + t
        keys_ok[:, at] = still
        mask = keys_ok[:, None, None, : at + 1]  # (b, 1, 1, at + 1)
        h = _layers(body, cache, body.embed_tokens(tokens[:, None]), next_pos[:, None], mask, at)
        next_pos = next_pos + 1
        logits = lm.lm_head(h[:, -1])

    ids_l, logps_l, lengths = out_ids.tolist(), out_logps.tolist(), n_new.tolist()
    return [(ids_l[b][: lengths[b]], logps_l[b][: lengths[b]]) for b in range(B)]
