"""SFT throughput: posttrain's SFT step against a minimal hand-written PyTorch loop.

    python bench/sft.py --model DIR --data FILE --steps S --batch B --max-length L --lr LR \
        [--impl posttrain|minimal]

Both fine-tune the same local HF model in float32 on the same batches: a JSONL of
{"prompt", "completion"} (tokenised as text: the prompt, then prompt+completion+EOS; loss on the
completion and EOS; keep-start truncation at L) or of {"messages"} (the chat template, loss on
assistant turns). AdamW (0.9, 0.999, eps 1e-8, no weight decay), lr decaying linearly from LR to
0 over S steps without warm-up, grad-norm clip 1.0, examples in file order, right padding, no
packing. Prints one JSON line: tokens_per_s, seconds, peak_rss_mb, tokens (non-pad tokens of
the trained batches), mean_loss (mean of the S step losses; a step's loss is the mean
cross-entropy over its trained tokens).

posttrain: the shared training loop with the SFT objective, which applies the LM head only at
trained positions. minimal: `model(input_ids, attention_mask, labels).loss`, backward, clip, step.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def load_examples(path: str, tok, max_length: int):
    from posttrain.data.chat import TokenizedExample, fit_length, tokenize_chat

    out = []
    for line in open(path, encoding="utf-8"):
        rec = json.loads(line)
        if "messages" in rec:
            ex = tokenize_chat(tok, rec)
        else:
            p = tok(rec["prompt"], add_special_tokens=False)["input_ids"]
            full = tok(rec["prompt"] + rec["completion"], add_special_tokens=False)["input_ids"] + [
                tok.eos_token_id
            ]
            ex = TokenizedExample(full, [0] * len(p) + [1] * (len(full) - len(p)))
        ex = fit_length(ex, max_length, "truncate")
        if ex is not None:
            out.append(ex)
    return out


def make_batches(examples, steps: int, batch: int, pad_id: int):
    from posttrain.data.collate import pad_batch

    n = len(examples)
    return [
        pad_batch([examples[(s * batch + i) % n] for i in range(batch)], pad_id)
        for s in range(steps)
    ]


def run_posttrain(model, batches, args) -> list[float]:
    from posttrain.stages.sft import SFTObjective
    from posttrain.train.loop import benchmark_settings, train_on_batches

    settings = benchmark_settings(args.steps, args.lr)
    return train_on_batches(model, SFTObjective(None, 1, "cpu"), batches, settings)


def run_minimal(model, batches, args) -> list[float]:
    opt = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (args.steps - s) / args.steps)
    model.train()
    losses = []
    for b in batches:
        # HF shifts labels itself: label = input id where trained, -100 elsewhere.
        labels = torch.full_like(b.input_ids, -100)
        labels[:, 1:] = b.labels[:, :-1]
        loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--impl", choices=["posttrain", "minimal"], default="posttrain")
    args = ap.parse_args()
    from posttrain.models.load import load_model
    from posttrain.models.tokenizer import load_tokenizer

    tok = load_tokenizer(args.model)
    model = load_model(args.model)
    batches = make_batches(
        load_examples(args.data, tok, args.max_length), args.steps, args.batch, tok.pad_token_id
    )
    t0 = time.perf_counter()
    losses = (run_posttrain if args.impl == "posttrain" else run_minimal)(model, batches, args)
    seconds = time.perf_counter() - t0
    tokens = sum(b.n_tokens for b in batches)
    print(json.dumps({
        "impl": args.impl,
        "tokens_per_s": round(tokens / seconds, 1),
        "seconds": round(seconds, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "tokens": tokens,
        "mean_loss": sum(losses) / len(losses),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
