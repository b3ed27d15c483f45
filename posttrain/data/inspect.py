"""`posttrain data inspect`: show examples token by token with the loss mask visible, and how the
mask was derived from the chat template (its method: prefix, generation-markers or
rendered-markers; see posttrain/data/chat.py)."""

from __future__ import annotations

import json
import sys


def render_tokens(tokenizer, ids: list[int], mask: list[int], color: bool) -> str:
    """Each token's text; trained tokens in green (terminal) or between [[ ]] (plain)."""
    out = []
    for i, m in zip(ids, mask, strict=True):
        piece = tokenizer.decode([i])
        piece = piece.replace("\n", "\\n\n")
        if m:
            out.append(f"\033[42;30m{piece}\033[0m" if color else f"[[{piece}]]")
        else:
            out.append(f"\033[2m{piece}\033[0m" if color else piece)
    return "|".join(out) if not color else "".join(out)


def inspect(
    tokenizer_dir, data, fmt="auto", n=3, train_on="all_assistant", as_json=False, stream=None
) -> None:
    from posttrain.data.chat import tokenize_chat
    from posttrain.data.readers import load_chat_data
    from posttrain.models.tokenizer import load_tokenizer

    stream = stream or sys.stdout
    tok = load_tokenizer(tokenizer_dir)
    examples, _ = load_chat_data(data, fmt)
    color = stream.isatty() if hasattr(stream, "isatty") else False
    for k, ex in enumerate(examples[:n]):
        t = tokenize_chat(tok, ex, train_on)
        if as_json:
            rec = {"input_ids": t.input_ids, "loss_mask": t.loss_mask, "mask_method": t.mask_method}
            print(json.dumps(rec), file=stream)
            continue
        print(
            f"=== example {k}: {len(t)} tokens, {t.n_trained} trained, {len(t) - t.n_trained} "
            f"masked (mask method: {t.mask_method})",
            file=stream,
        )
        print(render_tokens(tok, t.input_ids, t.loss_mask, color), file=stream)
        if not color:
            print("(tokens separated by |; trained tokens between [[ ]])", file=stream)
