"""SFT throughput: posttrain's SFT step against a minimal hand-written PyTorch loop.

    python bench/sft.py --model DIR --data FILE --steps S --batch B --max-length L --lr LR \
        [--impl posttrain|minimal] [--device cpu|cuda] [--precision fp32|bf16] [--packing]

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

Beyond the issue's recipe, for GPU runs: --device (the batches are moved there before timing),
--precision bf16 (autocast over fp32 weights, for both impls), --packing (each step's examples
packed first-fit-decreasing into rows of at most L tokens, positions restarting per example and
no attention mask, for both impls: the same examples and loss tokens, less padding; the rows
padded to the longest row, or with --fixed-rows to L as the SFT stage does), --compile
(each transformer block torch.compiled, as `train.compile` does, for both impls; the compile
happens in an untimed warm-up step, reported as warmup_s). On CUDA both
impls use the fused AdamW, and the line adds peak_gpu_mb and model_tflops = 6 * N * tokens /
seconds (N = parameters without the input embedding), with mfu = model_tflops / --peak-tflops.
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


def make_batches(
    examples, steps: int, batch: int, pad_id: int, packing: bool = False, row_len=0, fixed=False
):
    """`steps` batches of `batch` examples in file order (wrapping around): right-padded, or
    packed into rows of at most row_len tokens, padded to the longest row or (fixed) to row_len."""
    from posttrain.data.collate import pack_rows, packed_batch, pad_batch

    n = len(examples)
    out = []
    for s in range(steps):
        step = [examples[(s * batch + i) % n] for i in range(batch)]
        if packing:
            rows = pack_rows([len(e) for e in step], row_len)
            T = row_len if fixed else None
            out.append(packed_batch([[step[i] for i in row] for row in rows], pad_id, T))
        else:
            out.append(pad_batch(step, pad_id))
    return out


def autocast(args):
    import contextlib

    if args.precision == "bf16":
        return torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_posttrain(model, batches, args) -> list[float]:
    from posttrain.stages.sft import SFTObjective
    from posttrain.train.loop import benchmark_settings, train_on_batches

    settings = benchmark_settings(args.steps, args.lr).model_copy(
        update={"precision": args.precision}
    )
    return train_on_batches(model, SFTObjective(None, 1, args.device), batches, settings)


def warm_up(model, batch, args) -> None:
    """One forward/backward through the impl's own path, gradients dropped (weights unchanged)."""
    from posttrain.stages.sft import SFTObjective

    model.train()  # as in the timed steps (a compiled block guards on the mode)
    with autocast(args):
        if args.impl == "posttrain":
            loss = SFTObjective(None, 1, args.device).loss(model, batch)[0]
        else:
            loss = model(**minimal_inputs(batch)).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def minimal_inputs(b) -> dict:
    """What a hand-written loop passes to the HF model."""
    # HF shifts labels itself: label = input id where trained, -100 elsewhere.
    labels = torch.full_like(b.input_ids, -100)
    labels[:, 1:] = b.labels[:, :-1]
    # Padded rows: the attention mask. Packed rows: no mask, positions restart per example;
    # use_cache=False, else HF skips the block-diagonal mask and examples attend across rows.
    pos = b.position_ids if b.attention_mask is None else None
    return dict(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=pos,
                labels=labels, use_cache=False)  # fmt: skip


def run_minimal(model, batches, args) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0, fused=args.device.startswith("cuda"))  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (args.steps - s) / args.steps)
    model.train()
    losses = []
    for b in batches:
        with autocast(args):
            loss = model(**minimal_inputs(b)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def profiled(run, model, batches, args, cuda: bool) -> list[float]:
    """`run` under torch.profiler; writes the kernels' table and the device's busy share."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        losses = run(model, batches, args)
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    from torch.autograd import DeviceType

    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    # The kernels' own time (as the table's total: only rows of the device's own events; the
    # operator rows that launched them would count it twice), in seconds.
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    busy = sum(getattr(e, key) for e in events if e.device_type == kind) / 1e6
    with open(args.profile, "w") as f:
        f.write(f"wall {wall:.3f} s under the profiler; {key} summed {busy:.3f} s "
                f"({busy / wall:.1%} of wall)\n")  # fmt: skip
        f.write(events.table(sort_by=key, row_limit=30))
    return losses


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
    ap.add_argument("--impl", choices=["posttrain", "minimal"], default="posttrain")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--packing", action="store_true")
    ap.add_argument("--fixed-rows", action="store_true",
                    help="packed rows padded to --max-length, as the SFT stage does")  # fmt: skip
    ap.add_argument("--compile", action="store_true", help="torch.compile each block (both)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    ap.add_argument("--profile", help="write torch.profiler's kernel table to this file")
    return ap.parse_args(argv)


def bench(args: argparse.Namespace) -> tuple[dict, list[float]]:
    """(the JSON line's fields, the per-step losses)."""
    from posttrain.models.load import load_model
    from posttrain.models.tokenizer import load_tokenizer

    tok = load_tokenizer(args.model)
    model = load_model(args.model, args.device)
    examples = load_examples(args.data, tok, args.max_length)
    batches = make_batches(
        examples,
        args.steps,
        args.batch,
        tok.pad_token_id,
        args.packing,
        args.max_length,
        args.fixed_rows,
    )
    batches = [b.to(args.device) for b in batches]
    cuda = torch.device(args.device).type == "cuda"
    warmup_s = None
    if args.compile:  # both impls: each transformer block compiled, as train.compile does
        from posttrain.train.loop import compile_layers

        compile_layers(model)
    if cuda or args.compile:  # CUDA context, cuBLAS, the compile: one untimed forward/backward
        t0 = time.perf_counter()
        warm_up(model, batches[0], args)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        warmup_s = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    run = run_posttrain if args.impl == "posttrain" else run_minimal
    if args.profile:
        losses = profiled(run, model, batches, args, cuda)
    else:
        losses = run(model, batches, args)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = sum(b.n_tokens for b in batches)
    out = {
        "impl": args.impl,
        "tokens_per_s": round(tokens / seconds, 1),
        "seconds": round(seconds, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "tokens": tokens,
        "mean_loss": sum(losses) / len(losses),
    }
    if args.device != "cpu" or args.precision != "fp32" or args.packing or args.compile:
        padded = sum(b.input_ids.numel() for b in batches)
        out |= {"device": args.device, "precision": args.precision, "packing": args.packing,
                "compile": args.compile, "fixed_rows": args.fixed_rows, "warmup_s": warmup_s,
                "padding_share": round(1 - tokens / padded, 4)}  # fmt: skip
    if cuda:
        n = sum(p.numel() for p in model.parameters())
        n -= model.get_input_embeddings().weight.numel()
        tflops = 6 * n * tokens / seconds / 1e12
        out |= {"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                "model_tflops": round(tflops, 2), "mfu": round(tflops / args.peak_tflops, 4)}  # fmt: skip
    return out, losses


def main(argv=None) -> None:
    out, _ = bench(parse_args(argv))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
