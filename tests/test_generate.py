"""Batched KV-cached generation: equivalence with a naive uncached loop, raw log-probs that a
forward pass reproduces, stopping, seeding, ordering, chat rendering, and validation."""

import pytest
import torch

from posttrain.generate import Generation, SamplingParams, generate, generate_chat, sample_n
from posttrain.generate.sampling import filter_top_k, filter_top_p

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
PROMPTS = [
    "Q: What is 12 plus 23?",
    "A: 3",  # the shortest: left-padded the most
    "The cat sat on mat number 41. Q: What is 40 plus 11?\nA:",
    "mat number 7",
    "Q: What is 55 plus 11?\nA: 66\nThe cat sat",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(small_tokenizer):
    """toy-xs with larger random weights: a sharp, varied distribution, so greedy decoding does
    not just repeat one token and a wrong position or mask would change the argmax."""
    from helpers import sharp_toy_model

    return sharp_toy_model(small_tokenizer, 0.1)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=CUDA)])
def on_device(request, model):
    """The model on each available device, moved back to the CPU afterwards."""
    yield model.to(request.param)
    model.to("cpu")


@pytest.fixture
def bias_im_end(model, small_tokenizer):
    """bias_im_end(b) adds b to the model's <|im_end|> logit, so responses end after a few tokens
    (at different steps in one batch); returns the id. Removed after the test."""
    im_end = small_tokenizer.convert_tokens_to_ids("<|im_end|>")
    handles = []

    def add(b: float) -> int:
        bias = torch.zeros(len(small_tokenizer))
        bias[im_end] = b
        hook = model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias.to(out))
        handles.append(hook)
        return im_end

    yield add
    for h in handles:
        h.remove()


def _ids(tok, texts):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _naive_greedy(model, prompt_ids, max_new_tokens, stop_ids=()):
    """Re-run the full forward on the growing, unpadded sequence, one prompt at a time."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            seq = list(ids)
            for _ in range(max_new_tokens):
                logits = model(torch.tensor([seq], device=device)).logits[0, -1]  # (V,)
                seq.append(int(logits.argmax()))
                if seq[-1] in stop_ids:
                    break
            out.append(seq[len(ids) :])
    return out


def _recomputed_logps(model, gen: Generation) -> torch.Tensor:
    """log p(token_ids | prompt) from one uncached forward over prompt + response."""
    device = next(model.parameters()).device
    seq = torch.tensor([gen.prompt_ids + gen.token_ids], device=device)  # (1, P + R)
    with torch.no_grad():
        logps = torch.log_softmax(model(seq).logits[0].float(), dim=-1)  # (P + R, V)
    P = len(gen.prompt_ids)
    targets = torch.tensor(gen.token_ids, device=device).unsqueeze(-1)  # (R, 1)
    return logps[P - 1 : -1].gather(-1, targets).squeeze(-1).cpu()  # (R,)


def test_cached_greedy_equals_naive_uncached_loop(on_device, small_tokenizer):
    model = on_device
    prompt_ids = _ids(small_tokenizer, PROMPTS)
    params = SamplingParams(max_new_tokens=12, greedy=True, stop_token_ids=[], batch_size=8)
    gens = generate(model, small_tokenizer, prompt_ids, params)
    assert [g.token_ids for g in gens] == _naive_greedy(model, prompt_ids, 12)
    # The model is not degenerate: responses are varied, so the comparison has teeth.
    assert all(len(set(g.token_ids)) > 3 for g in gens)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=12, greedy=True, stop_token_ids=[]),
        SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.9, stop_token_ids=[], seed=3),
    ],
    ids=["greedy", "t0.7-p0.9"],
)
def test_logprobs_match_a_forward_pass_over_prompt_and_response(on_device, small_tokenizer, params):
    model = on_device
    gens = generate(model, small_tokenizer, PROMPTS, params)
    for g in gens:
        assert len(g.logprobs) == len(g.token_ids) == 12
        ref = _recomputed_logps(model, g)
        assert torch.allclose(torch.tensor(g.logprobs), ref, atol=1e-4, rtol=0)


def test_stop_token_ends_the_response_and_is_kept(model, bias_im_end, small_tokenizer):
    im_end = bias_im_end(5.0)
    params = SamplingParams(max_new_tokens=40, seed=1)  # default stops: end_of_turn_ids
    gens = generate(model, small_tokenizer, PROMPTS, params)
    lengths = set()
    for g in gens:
        assert g.finished and not g.truncated
        assert g.token_ids[-1] == im_end and im_end not in g.token_ids[:-1]
        assert "<|im_end|>" not in g.text
        assert g.text == small_tokenizer.decode(g.token_ids[:-1], skip_special_tokens=True)
        # Rows that kept going after others finished (and were fed pads) are still exact.
        assert torch.allclose(torch.tensor(g.logprobs), _recomputed_logps(model, g), atol=1e-4)
        lengths.add(len(g.token_ids))
    assert len(lengths) > 1  # rows finished at different steps


def test_greedy_with_stops_equals_naive_loop_when_rows_finish_at_different_steps(
    model, bias_im_end, small_tokenizer
):
    im_end = bias_im_end(2.5)  # some rows stop at once, some later, some never (in 10 steps)
    prompt_ids = _ids(small_tokenizer, PROMPTS)
    params = SamplingParams(max_new_tokens=10, greedy=True, stop_token_ids=[im_end])
    gens = generate(model, small_tokenizer, prompt_ids, params)
    assert [g.token_ids for g in gens] == _naive_greedy(model, prompt_ids, 10, (im_end,))
    assert {g.finished for g in gens} == {True, False}
    assert len({len(g.token_ids) for g in gens if g.finished}) > 1


@pytest.mark.parametrize("engine", ["auto", "hf"])
def test_on_token_streams_every_rows_tokens_as_decoded(model, bias_im_end, small_tokenizer, engine):
    im_end = bias_im_end(4.0)  # rows end at different steps; the finished get no more calls
    streamed: dict[int, list[int]] = {}
    params = SamplingParams(max_new_tokens=12, seed=3, batch_size=2, engine=engine)  # 3 batches
    on_token = lambda i, t: streamed.setdefault(i, []).append(t)  # noqa: E731
    gens = generate(model, small_tokenizer, PROMPTS, params, on_token=on_token)
    assert [streamed.get(i) for i in range(len(PROMPTS))] == [g.token_ids for g in gens]
    assert len({len(g.token_ids) for g in gens}) > 1 and any(
        g.token_ids[-1] == im_end for g in gens
    )
    # Streaming changes nothing: the same outputs as without the callback.
    assert gens == generate(model, small_tokenizer, PROMPTS, params)


def test_max_new_tokens_without_a_stop_truncates(model, small_tokenizer):
    gens = generate(model, small_tokenizer, PROMPTS, SamplingParams(max_new_tokens=4, greedy=True))
    for g in gens:
        assert g.truncated and not g.finished
        assert len(g.token_ids) == len(g.logprobs) == 4


def test_seeding(model, small_tokenizer):
    def run(**kw):
        params = SamplingParams(max_new_tokens=8, stop_token_ids=[], **kw)
        return [g.token_ids for g in generate(model, small_tokenizer, PROMPTS, params)]

    greedy = run(greedy=True)
    assert run(seed=5) == run(seed=5)
    assert run(seed=5) != run(seed=6)
    assert run(seed=5) != greedy
    assert run(seed=5, top_k=1) == greedy
    assert run(seed=5, top_p=1e-6) == greedy
    assert run(temperature=0.0) == greedy


def test_results_in_input_order_and_independent_of_batch_size(model, small_tokenizer):
    prompt_ids = _ids(small_tokenizer, PROMPTS)
    greedy = dict(max_new_tokens=6, greedy=True, stop_token_ids=[])
    one = generate(model, small_tokenizer, prompt_ids, SamplingParams(batch_size=1, **greedy))
    eight = generate(model, small_tokenizer, prompt_ids, SamplingParams(batch_size=8, **greedy))
    two = generate(model, small_tokenizer, prompt_ids, SamplingParams(batch_size=2, **greedy))
    assert [g.prompt_ids for g in eight] == prompt_ids  # PROMPTS are not sorted by length
    assert [g.token_ids for g in one] == [g.token_ids for g in eight] == [g.token_ids for g in two]
    for a, b in zip(one, eight, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_string_and_id_prompts_agree(model, small_tokenizer):
    params = SamplingParams(max_new_tokens=5, greedy=True, stop_token_ids=[])
    from_text = generate(model, small_tokenizer, PROMPTS, params)
    from_ids = generate(model, small_tokenizer, _ids(small_tokenizer, PROMPTS), params)
    assert from_text == from_ids


def test_generate_chat_renders_with_the_chat_template(model, small_tokenizer):
    convs = [
        [{"role": "user", "content": "What is 12 plus 23?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "The cat?"},
        ],
    ]
    tools = [{"name": "add", "parameters": {"a": "int", "b": "int"}}]
    params = SamplingParams(max_new_tokens=3, greedy=True)
    for kw in ({}, {"tools": tools}):
        gens = generate_chat(model, small_tokenizer, convs, params, **kw)
        for conv, g in zip(convs, gens, strict=True):
            expected = small_tokenizer.apply_chat_template(
                conv, add_generation_prompt=True, return_dict=False, **kw
            )
            assert g.prompt_ids == expected
            assert small_tokenizer.decode(g.prompt_ids).endswith("<|im_start|>assistant\n")


def test_sample_n_gives_n_different_seeded_samples(model, small_tokenizer):
    params = SamplingParams(max_new_tokens=8, stop_token_ids=[], seed=2)
    out = sample_n(model, small_tokenizer, PROMPTS[:3], 4, params)
    assert [len(s) for s in out] == [4, 4, 4]
    prompt_ids = _ids(small_tokenizer, PROMPTS[:3])
    for samples, ids in zip(out, prompt_ids, strict=True):
        assert all(s.prompt_ids == ids for s in samples)
        assert len({tuple(s.token_ids) for s in samples}) == 4
    again = sample_n(model, small_tokenizer, PROMPTS[:3], 4, params)
    assert [[s.token_ids for s in row] for row in again] == [
        [s.token_ids for s in row] for row in out
    ]


def test_bf16_model_generates_finite_logprobs(model, small_tokenizer):
    import copy

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    gens = generate(bf16, small_tokenizer, PROMPTS, SamplingParams(max_new_tokens=4, seed=0))
    for g in gens:
        lp = torch.tensor(g.logprobs)
        assert len(g.token_ids) == 4 and torch.isfinite(lp).all() and (lp <= 0).all()


def test_restores_training_mode(model, small_tokenizer):
    model.train()
    generate(model, small_tokenizer, PROMPTS[:1], SamplingParams(max_new_tokens=2))
    assert model.training
    model.eval()
    generate(model, small_tokenizer, PROMPTS[:1], SamplingParams(max_new_tokens=2))
    assert not model.training


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_params_raise_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_over_long_or_empty_prompt_raises_naming_its_index(model, small_tokenizer):
    # max_position_embeddings is 256: 250 prompt tokens + 16 new ones do not fit.
    prompts = [[10, 11, 12], [10] * 250]
    with pytest.raises(ValueError, match=r"prompt 1 has 250 tokens.*266 > .*256"):
        generate(model, small_tokenizer, prompts, SamplingParams(max_new_tokens=16))
    generate(model, small_tokenizer, prompts, SamplingParams(max_new_tokens=6))  # 256 fits
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(model, small_tokenizer, [[], [10]], SamplingParams())
    with pytest.raises(ValueError, match="n=0"):
        sample_n(model, small_tokenizer, [[10]], 0, SamplingParams())


def test_top_k_and_top_p_filters_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))  # (1, 4), already sorted
    # top-k 2 keeps the two largest.
    assert torch.isinf(filter_top_k(logits, 2)).tolist() == [[False, False, True, True]]
    # top-p 0.7: mass before each token is 0, 0.5, 0.8, 0.95 -> keep the first two.
    assert torch.isinf(filter_top_p(logits, 0.7)).tolist() == [[False, False, True, True]]
    # top-p 0.81: the third is needed too (0.8 before it); the fourth is not (0.95 before it).
    assert torch.isinf(filter_top_p(logits, 0.81)).tolist() == [[False, False, False, True]]
    # tiny p keeps only the top token; order in the vocabulary does not matter.
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isinf(filter_top_p(shuffled, 1e-6)).tolist() == [[True, False, True, True]]
