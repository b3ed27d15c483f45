"""EAD, BLEU / self-BLEU (per input and across inputs) and policy entropy, by hand."""

import math

import pytest
import torch

from posttrain.eval.diversity import (
    bleu,
    diversity_metrics,
    ead,
    expected_distinct,
    mean_ead,
    self_bleu,
)


def test_expected_distinct_by_hand():
    # 2 draws from 4: each item missed by both with (3/4)^2 = 9/16 -> 4 * 7/16 = 7/4
    assert expected_distinct(2, 4) == pytest.approx(7 / 4)
    assert expected_distinct(5, 1) == pytest.approx(1.0)  # one item: always exactly 1 distinct
    assert expected_distinct(0, 4) == 0.0
    # V >> C: almost no collisions, E ~ C - C(C-1)/(2V): EAD tends to plain distinct-n
    assert expected_distinct(10, 10**9) == pytest.approx(10 - 45e-9, rel=1e-12)
    with pytest.raises(ValueError, match="vocab_size"):
        expected_distinct(3, 0)


def test_ead_by_hand():
    assert ead([[0, 1]], 4) == pytest.approx(2 / (7 / 4))  # 8/7: more distinct than chance
    seqs = [[0, 1, 0], [2, 0]]
    # n=1: 5 tokens, 3 distinct; E = 4 (1 - (3/4)^5) = 4 * 781/1024 = 781/256 -> 768/781
    assert ead(seqs, 4, 1) == pytest.approx(768 / 781)
    # n=2: (0 1) (1 0) | (2 0): 3 bigrams, all distinct; E = 4 (1 - 27/64) = 37/16 -> 48/37
    assert ead(seqs, 4, 2) == pytest.approx(48 / 37)
    # n=3: (0 1 0) alone; E = 4 (1 - 3/4) = 1 -> 1. n=4, 5: none, left out of the mean
    assert ead(seqs, 4, 3) == pytest.approx(1.0) and ead(seqs, 4, 4) is None
    assert mean_ead(seqs, 4) == pytest.approx((768 / 781 + 48 / 37 + 1) / 3)
    assert mean_ead([[], []], 4) is None


def test_bleu_by_hand():
    a = "a b c d".split()
    assert bleu(a, [a]) == 1.0  # identical: every precision 1, no brevity penalty
    assert bleu(a, ["w x y z".split()]) == 0.0  # disjoint: unigram precision 0, not smoothed
    # a b c d vs a b c e: p1 = 3/4; p2 = (2+1)/(3+1) = 3/4; p3 = (1+1)/(2+1) = 2/3;
    # p4 = (0+1)/(1+1) = 1/2; same length -> BLEU = (3/4 * 3/4 * 2/3 * 1/2)^(1/4) = (3/16)^(1/4)
    assert bleu(a, ["a b c e".split()]) == pytest.approx((3 / 16) ** 0.25)
    # a b vs a b c d: every precision 1 (p3, p4 = (0+1)/(0+1)); brevity exp(1 - 4/2) = 1/e
    assert bleu(["a", "b"], [a]) == pytest.approx(math.exp(-1))
    # clipping: a a a vs a b: p1 = 1/3 (a counted once); p2 = (0+1)/(2+1) = 1/3; p3 = 1/2; p4 = 1
    assert bleu(["a"] * 3, [["a", "b"]]) == pytest.approx((1 / 18) ** 0.25)
    # several references: counts clip at the most any one reference holds; the closest length
    assert bleu(a, ["x".split(), a]) == 1.0
    assert bleu([], [[]]) == 1.0 and bleu([], [["a"]]) == 0.0  # empty = empty
    with pytest.raises(ValueError, match="reference"):
        bleu(a, [])


def test_self_bleu_identical_disjoint_and_bounded_references():
    same = [[1, 2, 3]] * 3
    assert self_bleu(same) == 1.0  # no diversity
    assert self_bleu([[1, 2], [3, 4], [5, 6]]) == 0.0  # nothing shared
    # [1 2] vs {[1 2 3]}: precisions 1, brevity exp(1 - 3/2); [1 2 3] vs {[1 2]}: p1 = 2/3,
    # p2 = (1+1)/(2+1) = 2/3, p3 = (0+1)/(1+1) = 1/2, p4 = (0+1)/(0+1) = 1 (no 4-gram),
    # no brevity penalty (3 > 2)
    two = [[1, 2], [1, 2, 3]]
    expected = (math.exp(-0.5) + ((2 / 3) ** 2 * (1 / 2)) ** 0.25) / 2
    assert self_bleu(two) == pytest.approx(expected)
    assert self_bleu(same * 10, n_refs=2) == 1.0
    assert self_bleu(same * 10, n_refs=2, seed=3) == self_bleu(same * 10, n_refs=2, seed=3)
    with pytest.raises(ValueError, match=">= 2"):
        self_bleu([[1]])


def test_diversity_metrics_per_input_and_across_inputs_by_hand():
    groups = [[[1, 2], [1, 2]], [[3], [4]]]  # prompt 0: the same twice; prompt 1: two answers
    m = diversity_metrics(groups, vocab_size=4)
    # prompt 0: n=1: 4 tokens, 2 distinct, E = 4 (1 - (3/4)^4) = 175/64 -> 128/175;
    #           n=2: (1 2) twice, 1 distinct, E = 7/4 -> 4/7 = 100/175; mean 114/175
    # prompt 1: n=1: 2 tokens, 2 distinct, E = 7/4 -> 8/7 = 200/175. Mean over prompts 157/175
    assert m["diversity/ead"] == pytest.approx(157 / 175)
    assert m["diversity/self_bleu"] == pytest.approx((1.0 + 0.0) / 2)  # identical; disjoint
    # across: [1 2] and [3]: n=1: 3 distinct of 3, E = 37/16 -> 48/37; n=2: 1 of 1, E = 1
    assert m["diversity/across_ead"] == pytest.approx((48 / 37 + 1) / 2)
    assert m["diversity/across_self_bleu"] == 0.0  # k - 1 = 1 reference each, nothing shared
    one = diversity_metrics([[[1], [1]]], vocab_size=4)  # one prompt: no across self-BLEU
    assert "diversity/across_self_bleu" not in one and one["diversity/self_bleu"] == 1.0


@pytest.fixture(scope="module")
def model(small_tokenizer):
    """toy-xs with larger random weights: sharp, varied next-token distributions."""
    from helpers import sharp_toy_model

    return sharp_toy_model(small_tokenizer, 0.2)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_entropy_of_a_uniform_model_is_log_v(small_tokenizer):
    from posttrain.eval.entropy import policy_entropy, token_entropies
    from posttrain.models.presets import build_model

    m = build_model("toy-xs", small_tokenizer, max_position_embeddings=64, seed=0)
    with torch.no_grad():
        m.get_output_embeddings().weight.zero_()  # every logit 0: softmax is uniform over V
    V = m.config.vocab_size
    pairs = [([5, 6, 7], [8, 9]), ([5], [10, 11, 12, 13])]
    stats = token_entropies(m, pairs, pad_id=0)
    for (ent, logp), (_, r) in zip(stats, pairs, strict=True):
        assert len(ent) == len(r)
        assert ent == pytest.approx([math.log(V)] * len(r), abs=1e-5)  # H(uniform) = log V
        assert logp == pytest.approx([-math.log(V)] * len(r), abs=1e-5)
    assert policy_entropy(m, pairs, pad_id=0) == pytest.approx(math.log(V), abs=1e-5)


@pytest.mark.parametrize("plain", [True, False])
def test_entropies_line_up_with_the_sampled_tokens(model, small_tokenizer, monkeypatch, plain):
    """Teacher-forced log-probs reproduce the sampler's (a wrong offset, position or padding
    would not), and the entropies equal -sum p log p of a plain forward pass over each whole
    sequence, whether the responses to one prompt share its pass (max_rows 64) or not (1), and
    with the LM head applied to the answer positions alone (plain) or the full logits."""
    from posttrain.eval.entropy import token_entropies
    from posttrain.generate import SamplingParams, sample_n

    monkeypatch.setattr("posttrain.models.forward.plain_head", lambda m: plain)

    tok = small_tokenizer
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=0, stop_token_ids=[])
    groups = sample_n(model, tok, ["Q: What is 12 plus 23?\nA:", "The cat sat"], 3, params)
    gens = [g for group in groups for g in group]
    # responses of different lengths (3..6 tokens) under one prompt: right padding is exercised
    pairs = [(list(g.prompt_ids), list(g.token_ids[: 3 + i % 4])) for i, g in enumerate(gens)]
    for max_rows in (64, 1):
        stats = token_entropies(model, pairs, pad_id=tok.pad_token_id, max_rows=max_rows, chunk=5)
        for (p, r), g, (ent, logp) in zip(pairs, gens, stats, strict=True):
            assert logp == pytest.approx(g.logprobs[: len(r)], abs=1e-4)
            with torch.no_grad():
                logits = model(torch.tensor([p + r])).logits[0, len(p) - 1 : len(p) + len(r) - 1]
            lsm = torch.log_softmax(logits.float(), -1)  # (len(r), V)
            assert ent == pytest.approx((-(lsm.exp() * lsm).sum(-1)).tolist(), abs=1e-4)
    assert token_entropies(model, [([5], [])], pad_id=0) == [([], [])]  # nothing to score
    with pytest.raises(ValueError, match="empty prompt"):
        token_entropies(model, [([], [5])], pad_id=0)


def test_policy_entropy_weighs_each_response_the_same(monkeypatch):
    from posttrain.eval import entropy

    # response 1: three tokens of entropy 1; response 2: one token of entropy 4
    # -> mean of the means (1 + 4) / 2 = 2.5, not the token mean 7/4
    fake = [([1.0, 1.0, 1.0], [0.0] * 3), ([4.0], [0.0])]
    monkeypatch.setattr(entropy, "token_entropies", lambda *a, **k: fake)
    assert entropy.policy_entropy(None, [], pad_id=0) == 2.5
