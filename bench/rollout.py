"""Rollout decoding: posttrain's decoders against transformers' `generate` on the same batch.

    python bench/rollout.py --model DIR --prompts FILE [--batch 8] [--max-new-tokens 64]
        [--repeats 5] --impl static|hf|generate [--profile OUT.txt] [--device cpu|cuda]

Decodes the first --batch prompts of FILE ({"prompt": text} JSONL, plain text) --repeats times,
sampling at temperature 1.0 (top-p 1, no top-k) up to --max-new-tokens new tokens, never
stopping early (no stop token), so every implementation decodes exactly batch x L tokens:
- static: posttrain.generate with engine auto (generate/static.py: pre-allocated KV cache, our
  own pass over the layers, one uniform per row for the draw);
- hf: posttrain.generate with engine hf (the model's forward and a DynamicCache per step);
- generate: `model.generate(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
  max_new_tokens=L, min_new_tokens=L, output_scores=True)` (the raw log-probs
  posttrain keeps come from those scores, so both sides return them).
One process per implementation, so peak RSS is each one's own. The first repeat is a warm-up and
is not timed. The bound: every decoding step reads every parameter once, so a step takes at least
params x bytes / bandwidth, the bandwidth measured here by copying a 256 MB array (best of 5;
on the GPU with --device cuda);
bound_tokens_per_s = batch / that time.

Prints one JSON line: {"impl", "tokens_per_s", "seconds_per_batch", "peak_rss_mb", "tokens",
"params", "bandwidth_gb_s", "bound_tokens_per_s", "share_of_bound"}. With --profile, a torch
profiler table of one timed repeat (self CPU time by operator) is written to OUT.txt.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bandwidth_gb_s(device: str = "cpu", mb: int = 256, tries: int = 5) -> float:
    """Copy bandwidth (read + write) of a 256 MB array, best of `tries`: the host's memory, or the
    GPU's on cuda."""
    import torch

    a = torch.ones(mb * 2**20 // 4, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(tries):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        b.copy_(a)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best / 1e9


def main(argv: list[str] | None = None) -> dict:
    import torch

    from posttrain.generate import SamplingParams, generate
    from posttrain.models.load import load_model
    from posttrain.models.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--impl", choices=["static", "hf", "generate"], required=True)
    ap.add_argument("--profile")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    model, tok = load_model(args.model, args.device).eval(), load_tokenizer(args.model)
    with open(args.prompts) as f:
        texts = [json.loads(line)["prompt"] for line in f if line.strip()][: args.batch]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    L = args.max_new_tokens

    def run_once(seed: int) -> int:
        if args.impl == "generate":
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            T = max(len(x) for x in ids)
            inp = torch.full((len(ids), T), pad, dtype=torch.long)
            att = torch.zeros((len(ids), T), dtype=torch.long)
            for b, x in enumerate(ids):
                inp[b, T - len(x) :], att[b, T - len(x) :] = torch.tensor(x), 1
            inp, att = inp.to(args.device), att.to(args.device)
            torch.manual_seed(seed)
            with torch.inference_mode():
                out = model.generate(input_ids=inp, attention_mask=att, do_sample=True,
                                     temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=L,
                                     min_new_tokens=L, output_scores=True,
                                     return_dict_in_generate=True, pad_token_id=pad)  # fmt: skip
            new = out.sequences[:, T:]
            logps = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)
            logps.gather(-1, new[..., None])  # the raw log-probs, as posttrain returns them
            return int(new.numel())
        params = SamplingParams(max_new_tokens=L, temperature=1.0, seed=seed, stop_token_ids=[],
                                batch_size=len(ids), engine="auto" if args.impl == "static" else "hf")  # fmt: skip
        gens = generate(model, tok, ids, params)
        return sum(len(g.token_ids) for g in gens)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    run_once(0)  # warm-up
    times, tokens = [], 0
    for r in range(1, args.repeats + 1):
        sync()
        t0 = time.perf_counter()
        tokens += run_once(r)
        sync()
        times.append(time.perf_counter() - t0)
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            run_once(99)
        Path(args.profile).write_text(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        )
    n_params = sum(p.numel() for p in model.parameters())
    bytes_per = next(model.parameters()).element_size()
    bw = bandwidth_gb_s(args.device)
    bound = len(ids) / (n_params * bytes_per / (bw * 1e9))
    tps = tokens / sum(times)
    out = {
        "impl": args.impl,
        "tokens_per_s": round(tps, 1),
        "seconds_per_batch": round(sum(times) / len(times), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if args.device.startswith("cuda")
        else None,
        "tokens": tokens,
        "params": n_params,
        "bandwidth_gb_s": round(bw, 2),
        "bound_tokens_per_s": round(bound, 1),
        "share_of_bound": round(tps / bound, 3),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
