"""DPO throughput: posttrain's DPO step against a minimal hand-written (TRL-style) PyTorch loop.

    python bench/dpo.py --model DIR --data FILE --steps S --batch B --max-length L --lr LR \
        --beta BETA [--precompute-ref] [--impl posttrain|minimal]

Both train the same local HF model in float32 with sigmoid DPO against a frozen copy of the
initial model, on the same batches: a JSONL of {"prompt", "chosen", "rejected"} strings
(tokenised as text: the prompt, then prompt+response+EOS; log-probs summed over the response
and EOS; keep-start truncation at L) or of {"messages", "chosen", "rejected"} (the chat
template, `posttrain.data.pairs.tokenize_reply`; other keys are ignored). A pair is dropped when
truncation leaves either response nothing to score. AdamW (0.9, 0.999, eps 1e-8, no weight
decay), lr decaying linearly from LR to 0 over S steps without warm-up, grad-norm clip 1.0,
B pairs per step taken in file order (wrapping around), right padding, no packing.

Prints one JSON line: pairs_per_s, tokens_per_s, seconds, peak_rss_mb, tokens (non-pad policy
tokens, chosen plus rejected, of the trained batches), mean_loss (mean of the S step losses; a
step's loss is the mean DPO loss over its pairs). `seconds` covers the reference set-up too:
the frozen copy, or (--precompute-ref) the reference log-probs of every pair used, computed once
before training; tokenising and padding the training batches is not timed (as in bench/sft.py).

posttrain: the shared training loop with the DPO objective: chosen and rejected of a step in one
forward pass, the LM head applied only at response positions; with --precompute-ref the policy
itself scores the pairs first (no second model in memory), else a frozen deepcopy scores each
batch under no_grad. minimal: what a typical user (or TRL's default) writes: chosen and rejected
concatenated into one batch, `model(input_ids, attention_mask).logits` over every position,
log_softmax, gather, masked sum over the response; the reference the same way under no_grad
(a frozen deepcopy each step, or precomputed); loss = -logsigmoid(beta * margin).mean();
backward, clip, step, scheduler step.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import time

import torch
import torch.nn.functional as F


def load_pairs(path: str, tok, max_length: int):
    """TokenizedPairs in file order; a pair whose prompt fills max_length is dropped."""
    from posttrain.data.chat import TokenizedExample, fit_length
    from posttrain.data.pairs import TokenizedPair, tokenize_reply

    def text_example(prompt: str, reply: str) -> TokenizedExample:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        full = tok(prompt + reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return TokenizedExample(full, [0] * len(p) + [1] * (len(full) - len(p)))

    out = []
    for line in open(path, encoding="utf-8"):
        if not line.strip():
            continue
        rec = json.loads(line)
        if "messages" in rec:
            c = tokenize_reply(tok, rec["messages"], rec["chosen"])
            r = tokenize_reply(tok, rec["messages"], rec["rejected"])
        else:
            c = text_example(rec["prompt"], rec["chosen"])
            r = text_example(rec["prompt"], rec["rejected"])
        c, r = fit_length(c, max_length, "truncate"), fit_length(r, max_length, "truncate")
        if c is not None and r is not None:
            out.append(TokenizedPair(c, r))
    if not out:
        raise SystemExit(f"{path}: no pairs left within --max-length {max_length}")
    return out


def step_indices(n: int, steps: int, batch: int) -> list[list[int]]:
    """Pair indices of each step: file order, wrapping around."""
    return [[(s * batch + i) % n for i in range(batch)] for s in range(steps)]


def used_chunks(n: int, steps: int, batch: int) -> list[list[int]]:
    """Every pair the run trains on, once, in file order, in chunks of `batch` (reference)."""
    used = min(n, steps * batch)
    return [list(range(s, min(s + batch, used))) for s in range(0, used, batch)]


# ---------------------------------------------------------------- posttrain


def run_posttrain(model, pairs, steps_idx, pad_id: int, args) -> tuple[list[float], float]:
    from posttrain.data.pairs import pair_batch
    from posttrain.stages.dpo import Config, DPOObjective, reference_logps
    from posttrain.train.loop import benchmark_settings, train_on_batches

    def sb(index):
        return pair_batch([pairs[i] for i in index], index, pad_id, False, None)

    batches = [sb(index) for index in steps_idx]
    ref_logps = ref_model = None
    t0 = time.perf_counter()  # the reference set-up counts
    if args.precompute_ref:
        chunks = used_chunks(len(pairs), args.steps, args.batch)
        ref_logps = reference_logps(model, [sb(c) for c in chunks], "cpu", chunks[-1][-1] + 1)
    else:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    settings = benchmark_settings(args.steps, args.lr)
    cfg = Config(loss="sigmoid", beta=args.beta, precompute_ref=args.precompute_ref, epochs=None,
                 train=settings)  # fmt: skip
    losses = train_on_batches(
        model, DPOObjective(cfg, None, "cpu", ref_logps, ref_model), batches, settings
    )
    return losses, time.perf_counter() - t0


# ---------------------------------------------------------------- minimal


def minimal_batch(pairs, index, pad_id: int):
    """Chosen then rejected, right-padded together: input_ids, attention_mask, loss_mask."""
    seqs = [pairs[i].chosen for i in index] + [pairs[i].rejected for i in index]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for k, s in enumerate(seqs):
        ids[k, : len(s)] = torch.tensor(s.input_ids)
        attn[k, : len(s)] = 1
        mask[k, : len(s)] = torch.tensor(s.loss_mask, dtype=torch.bool)
    return ids, attn, mask


def minimal_logps(model, ids, attn, mask) -> torch.Tensor:
    """Summed log-probs of the response tokens, (2B,): full logits, log_softmax, gather."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]  # token t+1 from prefix
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok_logp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return tok_logp.masked_fill(~mask[:, 1:], 0.0).sum(-1)


def run_minimal(model, pairs, steps_idx, pad_id: int, args) -> tuple[list[float], float]:
    batches = [minimal_batch(pairs, index, pad_id) for index in steps_idx]
    t0 = time.perf_counter()  # the reference set-up counts
    ref_model = ref_logps = None
    if args.precompute_ref:
        ref_logps = {}
        model.eval()
        with torch.no_grad():
            for chunk in used_chunks(len(pairs), args.steps, args.batch):
                lp = minimal_logps(model, *minimal_batch(pairs, chunk, pad_id))
                for j, i in enumerate(chunk):
                    ref_logps[i] = (lp[j], lp[len(chunk) + j])
    else:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (args.steps - s) / args.steps)
    model.train()
    losses = []
    for index, (ids, attn, mask) in zip(steps_idx, batches, strict=True):
        B = len(index)
        lp = minimal_logps(model, ids, attn, mask)
        if ref_logps is not None:
            ref_c = torch.stack([ref_logps[i][0] for i in index])
            ref_r = torch.stack([ref_logps[i][1] for i in index])
        else:
            with torch.no_grad():
                ref = minimal_logps(ref_model, ids, attn, mask)
            ref_c, ref_r = ref[:B], ref[B:]
        margin = (lp[:B] - ref_c) - (lp[B:] - ref_r)
        loss = -F.logsigmoid(args.beta * margin).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, time.perf_counter() - t0


# ---------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--precompute-ref", action="store_true")
    ap.add_argument("--impl", choices=["posttrain", "minimal"], default="posttrain")
    return ap.parse_args(argv)


def bench(args: argparse.Namespace) -> tuple[dict, list[float]]:
    """(the JSON line's fields, the per-step losses)."""
    from posttrain.models.load import load_model
    from posttrain.models.tokenizer import load_tokenizer

    tok = load_tokenizer(args.model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    model = load_model(args.model)
    pairs = load_pairs(args.data, tok, args.max_length)
    steps_idx = step_indices(len(pairs), args.steps, args.batch)
    run = run_posttrain if args.impl == "posttrain" else run_minimal
    losses, seconds = run(model, pairs, steps_idx, pad_id, args)
    tokens = sum(len(pairs[i].chosen) + len(pairs[i].rejected) for idx in steps_idx for i in idx)
    result = {
        "impl": args.impl,
        "precompute_ref": bool(args.precompute_ref),
        "pairs_per_s": round(args.steps * args.batch / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "seconds": round(seconds, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "tokens": tokens,
        "mean_loss": sum(losses) / len(losses),
    }
    return result, losses


def main(argv=None) -> None:
    result, _ = bench(parse_args(argv))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
