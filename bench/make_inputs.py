"""Make the benchmark inputs: a small HF model directory and prompt/completion JSONL.

    python bench/make_inputs.py --out /tmp/bench [--data ../shared/data/gsm8k/train.jsonl]

The model is a Llama-architecture model with an 8,192-token BPE vocabulary trained on the data
(hidden 256, 4 layers, untied head: ~7.4M parameters, about half of them in the embedding and
LM head), random-init: a small model on which the LM head matters, as on real small models.
The data is GSM8K train as {"prompt": question, "completion": answer}.

prompts.jsonl holds the same questions as {"prompt": "Question: ...\nAnswer: "}, for the RL
benches (bench/grpo.py, bench/ppo.py). It also writes hh_pairs.jsonl, preference pairs for bench/dpo.py: HH-RLHF harmless-base test
(`--hh`; skipped when the file is absent) read with `posttrain.data.preferences.read_hh_pairs`,
as text {"prompt": "Human: ...\n\nAssistant: ...\n\nHuman: ...\n\nAssistant:", "chosen": " " +
chosen reply, "rejected": " " + rejected reply}. The model and tokenizer do not depend on it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--data",
        default=str(Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k/train.jsonl"),
    )
    ap.add_argument("--vocab", type=int, default=8192)
    # The model's shape (defaults: the 7.4M CPU model; GPU runs: --hidden 768 --layers 12 ...).
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument(
        "--hh",
        default=str(
            Path(__file__).resolve().parents[1].parent
            / "shared/data/hh-rlhf/harmless-base/test.jsonl.gz"
        ),
    )
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.models.load import save_model
    from posttrain.models.tokenizer import train_tokenizer

    out = Path(args.out)
    rows = [json.loads(line) for line in open(args.data)]
    pairs = [
        {"prompt": f"Question: {r['question']}\nAnswer: ", "completion": r["answer"]} for r in rows
    ]
    tok = train_tokenizer((p["prompt"] + p["completion"] for p in pairs), vocab_size=args.vocab)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      intermediate_size=args.intermediate, max_position_embeddings=1024,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)  # fmt: skip
    import torch

    torch.manual_seed(0)
    save_model(LlamaForCausalLM(cfg), tok, out / "model")
    with open(out / "gsm8k_pc.jsonl", "w") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")
    with open(out / "prompts.jsonl", "w") as f:  # the RL benches' prompts: the questions
        for p in pairs:
            f.write(json.dumps({"prompt": p["prompt"]}) + "\n")
    made = {
        "model": str(out / "model"),
        "data": str(out / "gsm8k_pc.jsonl"),
        "prompts": str(out / "prompts.jsonl"),
        "examples": len(pairs),
    }
    if Path(args.hh).is_file():
        made |= write_hh_pairs(args.hh, out / "hh_pairs.jsonl")
    print(json.dumps(made))


def hh_text(messages: list[dict]) -> str:
    """Chat messages back to HH's plain-text form, ending with the cue for the next reply."""
    turns = [f"{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages]
    return "\n\n".join([*turns, "Assistant:"])


def write_hh_pairs(src: str, dst: Path) -> dict:
    """HH-RLHF pairs as {"prompt", "chosen", "rejected"} text, for bench/dpo.py."""
    from posttrain.data.preferences import read_hh_pairs

    hh, _ = read_hh_pairs(src)
    with open(dst, "w") as f:
        for p in hh:
            rec = {"prompt": hh_text(p["messages"]), "chosen": " " + p["chosen"],
                   "rejected": " " + p["rejected"]}  # fmt: skip
            f.write(json.dumps(rec) + "\n")
    return {"pairs": str(dst), "n_pairs": len(hh)}


if __name__ == "__main__":
    main()
