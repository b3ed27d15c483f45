"""The LM head and the log-softmax at the targets, computed a chunk of rows at a time.

For N target positions, a head W (V, C) and a vocabulary of V = 150k, the (N, V) float32 logits
and their softmax are the largest tensors of a training step. `chunked_token_logps` returns
log softmax(h W^T + b) / T at each target, and optionally the entropy of that distribution,
holding at most `chunk` x V logits at once in the forward and in the backward: the forward keeps
only the (N,) log-sum-exp, and the backward recomputes each chunk's logits from the hidden
states and the head (one more head matmul per step: the price of never storing (N, V)).

With z = (h W^T + b) / T, lse = logsumexp(z) and p = softmax(z), log p_y = z_y - lse and
d log p_y / dz = onehot(y) - p; the chain rule through the head gives
dh = (g (onehot - p) / T) W, dW = (g (onehot - p) / T)^T h, db = sum of the rows of the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Logits of one chunk: CHUNK_BYTES / (4 V) rows of float32 (about 440 rows at V = 150k).
CHUNK_BYTES = 256 * 2**20


def default_chunk(vocab: int) -> int:
    """Rows per chunk so that chunk x V x 4 bytes is about CHUNK_BYTES (at least 1)."""
    return max(1, CHUNK_BYTES // (4 * vocab))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype nn.Linear would multiply in here: autocast's, else the input's."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return hidden.dtype


def _logits(h, w, b, temperature: float) -> torch.Tensor:
    """(n, C) x (V, C) in the compute dtype -> (n, V) float32 logits / T, as
    `head(h).float() / T` gives them (the division skipped at T = 1). A new tensor: the callers
    work on it in place (on a CPU, a fresh (n, V) allocation costs as much as an exp over it)."""
    z = F.linear(h, w, b).float()  # (n, V)
    return z if temperature == 1.0 else z.div_(temperature)


def _stats(z: torch.Tensor, targets: torch.Tensor, with_entropy: bool):
    """z (n, V) logits, overwritten -> log p at the targets (n,), lse (n,), entropy (n,) | None.
    With y = z - max and s = sum exp(y): lse = max + log s, and the entropy
    -sum p log p = log s - sum(exp(y) y) / s."""
    at = z.gather(-1, targets[:, None])[:, 0]  # (n,)
    top = z.amax(-1)  # (n,)
    y = z.sub_(top[:, None])  # (n, V)
    if not with_entropy:
        log_s = y.exp_().sum(-1).log_()  # (n,)
        return at - top - log_s, top + log_s, None
    e = y.exp()  # (n, V)
    s = e.sum(-1)  # (n,)
    log_s = s.log()
    return at - top - log_s, top + log_s, log_s - e.mul_(y).sum(-1) / s


class ChunkedTokenLogps(torch.autograd.Function):
    """(hidden (N, C), weight (V, C), bias (V,) | None, targets (N,), temperature, chunk,
    with_entropy) -> (logp (N,) float32, entropy (N,) float32 without gradient, or an empty
    tensor when not asked). Saved for backward: hidden, weight, bias, targets, lse (N,)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk, with_entropy):
        dtype = _compute_dtype(hidden)
        N = hidden.shape[0]
        logp = hidden.new_empty(N, dtype=torch.float32)
        lse = hidden.new_empty(N, dtype=torch.float32)
        entropy = hidden.new_empty(N if with_entropy else 0, dtype=torch.float32)
        # Casts made here, as autocast makes them for nn.Linear, so that the backward (which runs
        # outside autocast) multiplies in the same dtype.
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for s in range(0, N, chunk):
                z = _logits(hidden[s : s + chunk].to(dtype), w, b, temperature)  # (n, V)
                lp, ls, ent = _stats(z, targets[s : s + chunk], with_entropy)
                logp[s : s + chunk], lse[s : s + chunk] = lp, ls
                if with_entropy:
                    entropy[s : s + chunk] = ent
                del z  # before the next chunk's logits exist: one chunk at a time
        ctx.mark_non_differentiable(entropy)
        ctx.temperature, ctx.chunk, ctx.dtype = temperature, chunk, dtype
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        T, chunk, dtype = ctx.temperature, ctx.chunk, ctx.dtype
        N = hidden.shape[0]
        single = N <= chunk  # one chunk: the grads come out of one matmul each, no sum
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = grad_b = None
        if need_w and not single:
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if need_b and not single:
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        gt = grad_logp.float() / T  # (N,)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for s in range(0, N, chunk):
                h = hidden[s : s + chunk].to(dtype)  # (n, C)
                rows = torch.arange(h.shape[0], device=h.device)
                # d logp / d logits = (onehot(target) - p) g / T (z = logits / T), in place
                dz = _logits(h, w, b, T).sub_(lse[s : s + chunk, None]).exp_()  # (n, V) = p
                dz.mul_(-gt[s : s + chunk, None])
                dz[rows, targets[s : s + chunk]] += gt[s : s + chunk]
                dz = dz.to(dtype)
                if need_h:
                    grad_h[s : s + chunk] = dz @ w  # (n, C)
                if need_w:
                    part = dz.t() @ h  # (V, C)
                    grad_w = part if single else grad_w.add_(part)
                if need_b:
                    part = dz.sum(0)  # (V,)
                    grad_b = part if single else grad_b.add_(part)
                del dz
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def chunked_token_logps(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    targets: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(head(hidden).float() / T) at the targets, and its entropies when asked.

    hidden: (N, C); head: a plain nn.Linear (V, C); targets: (N,) token ids. Returns logp (N,)
    float32 with gradient to hidden and the head's weight and bias, and entropy (N,) float32
    without gradient (a metric), or None. At most `chunk` rows of logits exist at once (default:
    `default_chunk(V)`; N rows when N is smaller).
    """
    if chunk is None:
        chunk = default_chunk(head.weight.shape[0])
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    chunk = min(chunk, max(1, hidden.shape[0]))
    logp, entropy = ChunkedTokenLogps.apply(
        hidden, head.weight, head.bias, targets, float(temperature), chunk, with_entropy
    )
    return logp, entropy if with_entropy else None
