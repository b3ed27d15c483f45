"""bench/ppo.py --impl posttrain on a tiny random-init Llama: its JSON line and its token counts."""

import json

import torch
from helpers import load_bench

KEYS = {"impl", "tokens_per_s", "seconds", "peak_rss_mb", "generated_tokens", "trained_tokens",
        "tokens", "mean_reward"}  # fmt: skip


def test_bench_ppo_counts_the_tokens_it_trains(small_tokenizer, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.models.load import save_model

    tok = small_tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                      max_position_embeddings=128, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    save_model(LlamaForCausalLM(cfg), tok, tmp_path / "model")
    prompts = ["Q: What is 12 plus 11?\nA: ", "The cat sat on mat", "Q: What is 40 plus 23?"]
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)
    )
    steps, batch, L = 2, 2, 4
    out = load_bench("ppo").main(["--model", str(tmp_path / "model"), "--prompts",
                                  str(tmp_path / "prompts.jsonl"), "--steps", str(steps),
                                  "--batch", str(batch), "--max-new-tokens", str(L)])  # fmt: skip
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(line) == KEYS and line == out and line["impl"] == "posttrain"
    # Every completion has 1 (an immediate stop, trained on) to L tokens.
    assert steps * batch <= line["generated_tokens"] <= steps * batch * L
    # Prompts in file order, wrapping: 0, 1 | 2, 0; each counted once per completion.
    used = [prompts[i % len(prompts)] for i in range(steps * batch)]
    n_prompt = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in used)
    assert line["trained_tokens"] == line["generated_tokens"] + n_prompt
    assert line["tokens"] == line["generated_tokens"] + line["trained_tokens"]
    assert line["seconds"] > 0 and line["tokens_per_s"] > 0
    # The reward and value model: made next to the model, a scalar head on its decoder.
    head = json.loads((tmp_path / "scalar_head" / "config.json").read_text())
    assert head["architectures"][0].endswith("ForSequenceClassification")
    assert len(head["id2label"]) == 1  # num_labels 1
    # posttrain's loader keeps its seeded head (a causal LM dir would get a zero one), and loads
    # exactly what TRL's AutoModelForSequenceClassification does.
    from transformers import AutoModelForSequenceClassification

    from posttrain.models.reward import reward_model_from, score_head

    ours = reward_model_from(tmp_path / "scalar_head", tok)
    theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path / "scalar_head")
    assert score_head(ours).weight.abs().sum() > 0
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
