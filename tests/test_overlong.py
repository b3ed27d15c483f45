"""Over-long examples: cut to max_length (SFT keeps the start; a pair keeps the end of its prompt
and the start of its replies, as TRL), dropped only when asked or when nothing trainable is left,
and every tokenising stage says so on the console."""

import json
import re

import pytest
import yaml

from posttrain.data.chat import tokenize_chat
from posttrain.data.pairs import fit_replies, tokenize_feedback, tokenize_pairs, tokenize_reply
from posttrain.data.sft import tokenize_examples


def chat(user: str, reply: str) -> dict:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    }


def pair(pid: str, user: str, chosen: str, rejected: str) -> dict:
    return {"prompt_id": pid, "messages": chat(user, "")["messages"][:1], "chosen": chosen,
            "rejected": rejected}  # fmt: skip


SHORT = [chat(f"What is {a} plus 11?", str(a + 11)) for a in range(10, 13)]


def test_sft_truncate_keeps_the_first_max_length_tokens_with_their_mask(small_tokenizer):
    tok = small_tokenizer
    long = chat("What is 12 plus 11?", "The cat sat on mat number 23. " * 20)
    full = tokenize_chat(tok, long)
    L = full.loss_mask.index(1) + 10  # the prompt and ten reply tokens
    out, stats = tokenize_examples(tok, [*SHORT, long], L, "truncate", "all_assistant")
    assert stats.kept == 4 and stats.truncated == 1 and stats.dropped_overlong == 0
    cut = out[-1]
    assert cut.input_ids == full.input_ids[:L] and cut.loss_mask == full.loss_mask[:L]
    assert cut.truncated and cut.n_trained == 10
    assert stats.describe(L, "truncate") == f"of 4 examples: truncated 1 to their first {L} tokens"
    out, stats = tokenize_examples(tok, [*SHORT, long], L, "drop", "all_assistant")
    assert stats.kept == 3 and stats.dropped_overlong == 1 and all(len(e) <= L for e in out)
    assert stats.describe(L, "drop") == (
        f"of 4 examples: dropped 1 longer than max_length {L} (overlong: drop; overlong: "
        "truncate keeps their start)"
    )


def test_sft_truncation_with_no_trained_token_left_drops_and_says_why(small_tokenizer):
    tok = small_tokenizer
    long = chat("What is 12 plus 11? " * 30, "23")
    L = tokenize_chat(tok, long).loss_mask.index(1)  # the cut falls before the reply
    _, stats = tokenize_examples(tok, [*SHORT, long], L, "truncate", "all_assistant")
    assert stats.kept == 3 and stats.dropped_overlong == 1
    assert "dropped 1 with no trained token in their first" in stats.describe(L, "truncate")
    assert tokenize_examples(tok, SHORT, 512, "truncate", "all_assistant")[1].describe(
        512, "truncate"
    ) is None  # nothing to say  # fmt: skip


def test_a_pair_with_a_long_prompt_is_cut_from_the_left_and_keeps_both_reply_starts(
    small_tokenizer,
):
    tok = small_tokenizer
    p = pair("x", "What is 12 plus 11? " * 40, "23", "The cat sat on mat number 23.")
    c_full, r_full = (tokenize_reply(tok, p["messages"], p[k]) for k in ("chosen", "rejected"))
    prompt = c_full.loss_mask.index(1)
    assert prompt > 64 and r_full.loss_mask.index(1) == prompt  # one prompt, longer than L
    L = 64
    pairs, stats = tokenize_pairs(tok, [p], max_length=L)  # before: dropped, "no pairs left"
    assert stats.kept == 1 and stats.truncated == 1 and stats.dropped_overlong == 0
    c, r = pairs[0].chosen, pairs[0].rejected
    assert len(c) <= L and len(r) <= L
    # both replies whole (they fit in L - the longest reply), after the prompt's last tokens
    keep = L - (len(r_full) - prompt)
    assert r.input_ids == r_full.input_ids[prompt - keep :] and len(r) == L
    assert c.input_ids == c_full.input_ids[prompt - keep :]
    assert c.loss_mask == c_full.loss_mask[prompt - keep :] and c.n_trained == c_full.n_trained
    with pytest.raises(ValueError, match="no preference pairs left .*overlong: drop"):
        tokenize_pairs(tok, [p], max_length=L, overlong="drop")


def test_a_pair_with_a_long_reply_keeps_its_prompt_and_the_reply_start(small_tokenizer):
    tok = small_tokenizer
    p = pair("y", "What is 12 plus 11?", "23", "The cat sat on mat number 23. " * 20)
    c_full, r_full = (tokenize_reply(tok, p["messages"], p[k]) for k in ("chosen", "rejected"))
    L = 80
    assert c_full.loss_mask.index(1) <= L // 2  # a prompt within half of L is never cut
    pairs, stats = tokenize_pairs(tok, [p], max_length=L)
    assert stats.truncated == 1
    assert pairs[0].chosen.input_ids == c_full.input_ids  # fits: untouched
    assert pairs[0].rejected.input_ids == r_full.input_ids[:L]  # the reply's end is cut
    line = stats.describe(L, "truncate")
    assert line == (f"pairs: 1 of 1 kept within max_length {L} (overlong: truncate), 1 of them "
                    "truncated (prompt cut from the left, reply from the right); raise max_length "
                    "to keep them whole")  # fmt: skip
    assert stats.metrics() == {"data/kept": 1, "data/truncated": 1, "data/dropped_overlong": 0,
                               "data/dropped_no_reply": 0}  # fmt: skip


def test_long_prompt_and_long_replies_share_the_length_half_and_half(small_tokenizer):
    tok = small_tokenizer
    long = "The cat sat on mat number 23. " * 20
    seqs = [tokenize_reply(tok, chat("What is 12 plus 11? " * 40, "")["messages"][:1], r)
            for r in (long, long + "Yes.")]  # fmt: skip
    prompt = seqs[0].loss_mask.index(1)
    fitted = fit_replies(seqs, 40)
    for full, cut in zip(seqs, fitted, strict=True):
        assert len(cut) == 40 and cut.input_ids == full.input_ids[prompt - 20 : prompt + 20]


def test_kto_feedback_records_are_fitted_with_their_mismatch(small_tokenizer):
    tok = small_tokenizer
    recs = [{"prompt_id": str(i), "messages": [{"role": "user", "content": "What is 12? " * 40}],
             "completion": "23", "label": i % 2 == 0} for i in range(2)]  # fmt: skip
    out, stats = tokenize_feedback(tok, recs, 64)
    assert stats.kept == 2 and stats.truncated == 2
    assert all(len(t.chosen) <= 64 and len(t.rejected) <= 64 for t in out)


@pytest.fixture
def hf_dir(tmp_path, small_tokenizer):
    from posttrain.models.load import save_model
    from posttrain.models.presets import build_model

    save_model(build_model("toy-xs", small_tokenizer), small_tokenizer, tmp_path / "hf")
    return tmp_path / "hf"


@pytest.mark.parametrize("kind, what", [("dpo", "pairs"), ("reward", "pairs"), ("kto", "replies")])
def test_pair_stages_say_what_they_cut_on_the_console(tmp_path, hf_dir, monkeypatch, capsys,
                                                      kind, what):  # fmt: skip
    from posttrain.cli import main

    monkeypatch.setenv("CI", "true")
    pairs = [pair(str(i), f"What is {10 + i} plus 11?", str(21 + i), "No.") for i in range(3)]
    pairs.append(pair("long", "What is 12 plus 11? " * 40, "23", "I do not know."))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = {"model": str(hf_dir), "data": {"path": str(data), "val_fraction": 0, "max_length": 64},
           "batch_size": 4, "epochs": 1, "train": {"checkpoint_every": 0}}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main([kind, "--config", str(tmp_path / "c.yaml"), "--out", str(out)]) == 0
    n = 4 if kind != "kto" else 8  # KTO: each pair gives a desirable and an undesirable reply
    k = 1 if kind != "kto" else 2
    line = (f"[posttrain] {kind}: train {what}: {n} of {n} kept within max_length 64 (overlong: "
            f"truncate), {k} of them truncated (prompt cut from the left")  # fmt: skip
    assert line in capsys.readouterr().err
    m = json.loads((out / kind / "result.json").read_text())["metrics"]
    assert m["data/truncated"] == k and m["data/dropped_overlong"] == 0
    assert m["data/kept"] == n and m["data/dropped_no_reply"] == 0


def _counts(line: str) -> list[int]:
    return [int(x.replace(",", "")) for x in re.findall(r"\d[\d,]*", line)]


@pytest.mark.parametrize("kind", ["dpo", "reward"])
def test_pair_counts_on_the_console_are_those_of_result_json(tmp_path, hf_dir, monkeypatch,
                                                             capsys, kind):  # fmt: skip
    """Read, split by prompt, then each side fitted to max_length: every count the console says
    is the one result.json holds, and kept + dropped == what each side started with."""
    from posttrain.cli import main
    from posttrain.stages._prefs import held_out

    monkeypatch.setenv("CI", "true")
    ids = [f"p{i}" for i in range(40)]
    val_ids = [i for i in ids if held_out(i, 0.25, 0)]  # the pipeline's seed is 0
    train_ids = [i for i in ids if i not in val_ids]
    long_ids = set(train_ids[:3] + val_ids[:2])  # prompts that fill the context on both sides
    pairs = [pair(i, "What is 12 plus 11? " * (40 if i in long_ids else 1), "23", "No.")
             for i in ids[:20] + [i for i in ids[20:] if i in long_ids]]  # fmt: skip
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = {"model": str(hf_dir), "batch_size": 4, "epochs": 1, "train": {"checkpoint_every": 0},
           "data": {"path": str(data), "val_fraction": 0.25, "max_length": 64,
                    "overlong": "drop"}}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main([kind, "--config", str(tmp_path / "c.yaml"), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    m = json.loads((out / kind / "result.json").read_text())["metrics"]
    n_train = sum(p["prompt_id"] in train_ids for p in pairs)
    n_val = len(pairs) - n_train
    assert n_val >= 2 and m["data/dropped_overlong"] == 3 and m["data/val_dropped_overlong"] == 2

    read = next(ln for ln in err.splitlines() if " pairs read from " in ln)
    assert read.endswith(f"split by prompt (val_fraction 0.25): {n_train} train, {n_val} held out")
    assert _counts(read.split(" read from ")[0])[-1] == m["read/kept"] == len(pairs)
    assert m["data/train_pairs"] == n_train and m["data/val_pairs"] == n_val
    assert m["read/kept"] == m["data/train_pairs"] + m["data/val_pairs"]
    for side, prefix, start in (("train pairs", "", n_train), ("held-out pairs", "val_", n_val)):
        line = next(ln for ln in err.splitlines() if f"{kind}: {side}: " in ln)
        kept, of, max_length, dropped = _counts(line.split(f"{side}: ")[1])[:4]
        assert (kept, of, max_length) == (m[f"data/{prefix}kept"], start, 64)
        assert dropped == m[f"data/{prefix}dropped_overlong"]
        assert kept + dropped + m[f"data/{prefix}dropped_no_reply"] == start
        assert m[f"data/{prefix}truncated"] == 0
    stage = next(ln for ln in err.splitlines() if " train pairs, " in ln)
    assert f" on {m['data/kept']} train pairs, " in stage
