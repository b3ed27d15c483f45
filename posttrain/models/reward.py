"""Reward models: a language model with a scalar head read at the last real token.

A reward model is a Hugging Face `*ForSequenceClassification` with `num_labels=1`, built from a
causal LM directory (the SFT model: its decoder weights are reused, the head starts at zero, so
every response starts at reward 0) and saved with `pad_token_id` set, so that
`AutoModelForSequenceClassification.from_pretrained(dir)` scores right-padded text exactly as
posttrain does. posttrain's own forward reads the head only at each sequence's last token
(`SeqBatch.last`), which also works for packed rows where HF's pad-token search would not.
"""

from __future__ import annotations

from pathlib import Path

import torch


def score_head(model) -> torch.nn.Module:
    """The scalar head (under a peft wrapper: its trained copy)."""
    from posttrain.models.lora import unwrap

    model = unwrap(model)
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise TypeError(f"{type(model).__name__} has no scalar head (.score or .classifier)")


def reward_model_from(path: str | Path, tokenizer, device="cpu", dtype=torch.float32):
    """A reward model from a causal LM directory (fresh zero head) or a saved reward model."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = Path(path)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return _from_adapter(path, tokenizer, device, dtype)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"not a Hugging Face model directory (no config.json): {path}")
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    is_rm = any(a.endswith("ForSequenceClassification") for a in (cfg.architectures or []))
    cfg.num_labels = 1
    cfg.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the fresh head is expected; HF would report it missing
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path.resolve(), config=cfg, dtype=dtype, local_files_only=True
        )
    finally:
        hf_logging.set_verbosity(level)
    if not is_rm:
        head = score_head(model)
        torch.nn.init.zeros_(head.weight)
        if getattr(head, "bias", None) is not None:
            torch.nn.init.zeros_(head.bias)
    return model.to(device)


def _from_adapter(path: Path, tokenizer, device, dtype):
    """A reward model saved as a LoRA adapter (lora.save: adapter): its base causal LM with a
    fresh head, then the adapter and the trained head (peft's modules_to_save), merged."""
    import json

    from peft import PeftModel

    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise FileNotFoundError(f"{path}: adapter's base model directory not found: {base!r}")
    model = reward_model_from(base, tokenizer, "cpu", dtype)
    return PeftModel.from_pretrained(model, path).merge_and_unload().to(device)


def sequence_rewards(model, sb) -> torch.Tensor:
    """Scalar reward of each sequence of a SeqBatch: (S,), read at its last token."""
    from posttrain.models.lora import unwrap

    b = sb.batch
    out = unwrap(model).base_model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                           position_ids=b.position_ids, use_cache=False)  # fmt: skip
    hidden = out.last_hidden_state[sb.last[:, 0], sb.last[:, 1]]  # (S, C)
    return score_head(model)(hidden).squeeze(-1).float()


@torch.no_grad()
def score(model, tokenizer, conversations: list[list[dict]], replies: list[str],
          batch_size: int = 32, max_length: int | None = None) -> list[float]:  # fmt: skip
    """Rewards of replies to conversations (prompt messages, ending with a user turn)."""
    from posttrain.data.pairs import tokenize_reply

    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    limit = max_length or getattr(model.config, "max_position_embeddings", None)
    out: list[float] = []
    for s in range(0, len(replies), batch_size):
        seqs = []
        for msgs, reply in zip(
            conversations[s : s + batch_size], replies[s : s + batch_size], strict=True
        ):
            ex = tokenize_reply(tokenizer, msgs, reply)
            if limit and len(ex) > limit:  # keep the prompt start and the reply's beginning
                ex = type(ex)(ex.input_ids[:limit], ex.loss_mask[:limit], truncated=True)
            seqs.append(ex)
        out += score_sequences(model, seqs, pad)
    model.train(was_training)
    return out


def score_sequences(model, seqs: list, pad_id: int, batch_size: int = 32) -> list[float]:
    """Rewards of tokenised sequences as they are (TokenizedExample: the score is read at each
    one's last token), in batches of batch_size, right-padded; the model in eval mode."""
    from posttrain.data.pairs import SeqBatch, sequence_batch

    device = next(model.parameters()).device
    out: list[float] = []
    with torch.no_grad():
        for s in range(0, len(seqs), batch_size):
            part = seqs[s : s + batch_size]
            batch, target_seq, last = sequence_batch(part, pad_id)
            sb = SeqBatch(batch, target_seq, last, len(part), torch.arange(len(part))).to(device)
            out += sequence_rewards(model, sb).tolist()
    return out
