"""generate/static.py (pre-allocated KV cache, our own pass over the layers) against the model's
own forward with a DynamicCache (engine "hf"), on each family it takes: the same tokens and the
same log-probs, greedy and sampled, with rows that stop at different steps (so finished rows
leave the batch), and through LoRA layers. test_generate.py's tests (naive uncached loop,
recomputed log-probs, stopping, seeding) run on the toy model, which this path decodes."""

import pytest
import torch

from posttrain.generate import SamplingParams, generate
from posttrain.generate import static as S
from posttrain.generate.sampling import sample_rows

PROMPTS = ["Q: What is 12 plus 23?", "A: 3", "The cat sat on mat number 41. Q: What is 40 plus",
           "mat number 7", "Q: What is 55 plus 11?\nA: 66\nThe cat sat", "The"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(kind: str, tok, **over):
    """A random-init model of each family, small, with sharp logits (varied greedy tokens)."""
    import transformers as T

    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    cls = {"llama": (T.LlamaConfig, T.LlamaForCausalLM),
           "mistral": (T.MistralConfig, T.MistralForCausalLM),
           "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
           "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM)}[kind]  # fmt: skip
    extra = {"head_dim": 16} if kind == "qwen3" else {}
    torch.manual_seed(0)
    model = cls[1](cls[0](**(common | extra | over))).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    if kind == "qwen2":  # its q/k/v biases, non-zero
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.5)
    return model


def both(model, tok, **kw):
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    out = {}
    for engine in ("hf", "auto"):
        out[engine] = generate(model, tok, ids, SamplingParams(engine=engine, batch_size=8, **kw))
    return out["hf"], out["auto"]


def frequent_tokens(model, tok, n: int = 3) -> list[int]:
    """Tokens the model emits often at greedy: as stop tokens, rows end at different steps."""
    gens, _ = both(model, tok, max_new_tokens=12, greedy=True, stop_token_ids=[])
    counts = torch.bincount(torch.tensor([t for g in gens for t in g.token_ids]))
    return counts.argsort(descending=True)[:n].tolist()


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("greedy", [True, False])
def test_static_path_decodes_as_the_models_forward(kind, greedy, small_tokenizer):
    model = tiny(kind, small_tokenizer)
    assert S.supports(model, 64)
    stops = frequent_tokens(model, small_tokenizer)
    if not greedy:  # samples spread over the vocabulary: one token in 8 stops them
        stops += list(range(0, len(small_tokenizer), 8))
    ref, got = both(model, small_tokenizer, max_new_tokens=12, greedy=greedy, temperature=1.3,
                    seed=5, stop_token_ids=stops)  # fmt: skip
    assert [g.token_ids for g in got] == [g.token_ids for g in ref]
    lengths = {len(g.token_ids) for g in got}
    assert len(lengths) > 1 and any(g.finished for g in got)  # rows left the batch early
    for a, b in zip(got, ref, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        assert (a.finished, a.text) == (b.finished, b.text)


def test_finished_rows_leave_the_batch(small_tokenizer, monkeypatch):
    model = tiny("llama", small_tokenizer)
    stops = frequent_tokens(model, small_tokenizer)
    seen = []
    real = S._Cache.keep
    monkeypatch.setattr(S._Cache, "keep", lambda self, rows: (seen.append(len(rows)),
                                                             real(self, rows))[1])  # fmt: skip
    ref, got = both(model, small_tokenizer, max_new_tokens=12, greedy=True, stop_token_ids=stops)
    assert seen and all(n < len(PROMPTS) for n in seen)  # the batch shrank
    assert [g.token_ids for g in got] == [g.token_ids for g in ref]


def test_on_token_follows_rows_that_leave_the_batch(small_tokenizer):
    model = tiny("llama", small_tokenizer)
    stops = frequent_tokens(model, small_tokenizer)
    ids = [small_tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    for engine in ("auto", "hf"):
        streamed: dict[int, list[int]] = {}
        params = SamplingParams(engine=engine, batch_size=8, max_new_tokens=12, greedy=True,
                                stop_token_ids=stops)  # fmt: skip
        gens = generate(model, small_tokenizer, ids, params,
                        on_token=lambda i, t, s=streamed: s.setdefault(i, []).append(t))  # fmt: skip
        assert len({len(g.token_ids) for g in gens}) > 1  # rows finished at different steps
        assert [streamed[i] for i in range(len(PROMPTS))] == [g.token_ids for g in gens]


def test_lora_layers_decode_as_the_peft_models_forward(small_tokenizer):
    from posttrain.models.lora import LoraSettings, apply_lora

    model = apply_lora(tiny("llama", small_tokenizer), LoraSettings(enabled=True, r=4, alpha=8))
    with torch.no_grad():  # adapters that change the output (B starts at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert S.supports(model, 64)
    ref, got = both(model, small_tokenizer, max_new_tokens=10, greedy=True)
    assert [g.token_ids for g in got] == [g.token_ids for g in ref]


def test_other_models_and_reachable_windows_use_the_models_forward(small_tokenizer):
    import transformers as T

    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=len(small_tokenizer), n_embd=32, n_layer=1,
                                          n_head=2, n_positions=64))  # fmt: skip
    assert not S.supports(gpt2, 10)
    windowed = tiny("mistral", small_tokenizer, sliding_window=16)
    assert S.supports(windowed, 16) and not S.supports(windowed, 17)


def test_sample_rows_draws_each_token_in_proportion_and_never_a_zero():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 0.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_rows(probs, g) for _ in range(20000)])  # (20000, 2)
    freq = torch.bincount(draws[:, 0], minlength=5).float() / 20000
    # 20,000 draws: each frequency's standard error is at most 0.0035; 5 of them is 0.018.
    assert freq.tolist() == pytest.approx([0.0, 0.5, 0.0, 0.3, 0.2], abs=0.018)
    assert (draws[:, 1] == 4).all()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(sample_rows(probs, g1), sample_rows(probs, g2))  # seeded
