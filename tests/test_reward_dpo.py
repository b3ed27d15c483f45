"""Reward model and DPO: sequence log-probs and rewards under padding/packing, HF loading,
the stages end to end on a tiny pipeline."""

import io
import json
import math

import pytest
import torch

from posttrain.data.pairs import (
    PairBatches,
    SeqBatch,
    sequence_batch,
    sequence_logps,
    tokenize_pairs,
    tokenize_reply,
)
from posttrain.models.presets import build_model
from posttrain.ops.lm import IGNORE_INDEX


@pytest.fixture(scope="module")
def tiny_lm(small_tokenizer):
    torch.manual_seed(0)
    model = build_model("toy-xs", small_tokenizer, max_position_embeddings=256)
    model.eval()
    return model, small_tokenizer


PAIRS = [
    {"prompt_id": "a", "messages": [{"role": "user", "content": "What is 2 plus 2?"}],
     "chosen": "4", "rejected": "I think it is 5 or so."},
    {"prompt_id": "b", "messages": [{"role": "user", "content": "Name a colour."},
                                    {"role": "assistant", "content": "Blue."},
                                    {"role": "user", "content": "Another?"}],
     "chosen": "Red is another colour.", "rejected": "No."},
    {"prompt_id": "c", "messages": [{"role": "user", "content": "Hi"}],
     "chosen": "Hello! How can I help?", "rejected": "Go away."},
]  # fmt: skip


def _alone_logp(model, ex) -> float:
    """Summed log-prob of the trained tokens, by a plain forward of one unpadded sequence."""
    ids = torch.tensor([ex.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return sum(lp[t - 1, ex.input_ids[t]].item() for t in range(1, len(ex)) if ex.loss_mask[t])


@pytest.mark.parametrize("packing", [False, True])
def test_sequence_logps_equal_unpadded_forward(tiny_lm, packing):
    model, tok = tiny_lm
    pairs, stats = tokenize_pairs(tok, PAIRS, max_length=128)
    assert stats.kept == 3
    sb = PairBatches(pairs, batch_size=3, pad_id=tok.pad_token_id, packing=packing, row_len=256,
                     seed=0).all()[0]  # fmt: skip
    with torch.no_grad():
        got = sequence_logps(model, sb)
    want = [_alone_logp(model, p.chosen) for p in pairs] + [
        _alone_logp(model, p.rejected) for p in pairs
    ]
    assert got.tolist() == pytest.approx(want, abs=1e-4)
    if packing:
        assert sb.batch.input_ids.shape[0] < 6  # several sequences share a row


def test_pair_mask_covers_exactly_the_final_reply(tiny_lm):
    _, tok = tiny_lm
    ex = tokenize_reply(tok, PAIRS[1]["messages"], "Red is another colour.")
    trained = tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask, strict=True) if m])
    assert trained.startswith("Red is another colour.") and "Blue" not in trained
    assert trained.endswith(tok.decode(ex.input_ids[-1:])) and sum(ex.loss_mask) < len(ex)


def test_padding_content_does_not_change_logps(tiny_lm):
    model, tok = tiny_lm
    pairs, _ = tokenize_pairs(tok, PAIRS, max_length=128)
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    batch, target_seq, last = sequence_batch(seqs, tok.pad_token_id)
    sb = SeqBatch(batch, target_seq, last, 6, torch.arange(3))
    with torch.no_grad():
        base = sequence_logps(model, sb)
        pad = batch.attention_mask == 0
        batch.input_ids[pad] = 7  # any other token id in the padding
        assert (batch.labels[pad] == IGNORE_INDEX).all()
        again = sequence_logps(model, sb)
    assert torch.allclose(base, again, atol=1e-5)


def test_truncation_keeps_prompt_and_cuts_a_prompt_that_fills_the_context_from_the_left(tiny_lm):
    _, tok = tiny_lm
    long = [{"prompt_id": "x", "messages": [{"role": "user", "content": "q"}],
             "chosen": "word " * 200, "rejected": "no"}]  # fmt: skip
    pairs, stats = tokenize_pairs(tok, long, max_length=32)
    assert stats.truncated == 1 and len(pairs[0].chosen) == 32
    huge = [{"prompt_id": "y", "messages": [{"role": "user", "content": "q " * 200}],
             "chosen": "a", "rejected": "b"}]  # fmt: skip
    pairs, stats = tokenize_pairs(tok, huge, max_length=32)  # (tests/test_overlong.py: more)
    assert stats.truncated == 1 and pairs[0].chosen.n_trained > 0 and len(pairs[0].chosen) <= 32
    with pytest.raises(ValueError, match="no preference pairs left"):
        tokenize_pairs(tok, huge, max_length=32, overlong="drop")


def test_reward_model_matches_hf_sequence_classification_loading(tiny_lm, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from posttrain.models.load import save_model
    from posttrain.models.reward import reward_model_from, score, sequence_rewards

    model, tok = tiny_lm
    save_model(model, tok, tmp_path / "lm")
    rm = reward_model_from(tmp_path / "lm", tok)
    msgs = [p["messages"] for p in PAIRS]
    assert score(rm, tok, msgs, [p["chosen"] for p in PAIRS]) == [0.0, 0.0, 0.0]  # zero head
    torch.nn.init.normal_(rm.score.weight)
    save_model(rm, tok, tmp_path / "rm")
    ours = score(rm, tok, msgs, [p["chosen"] for p in PAIRS])
    hf = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "rm", local_files_only=True
    ).eval()
    seqs = [tokenize_reply(tok, m, p["chosen"]) for m, p in zip(msgs, PAIRS, strict=True)]
    batch, target_seq, last = sequence_batch(seqs, tok.pad_token_id)
    with torch.no_grad():
        theirs = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]
    assert ours == pytest.approx(theirs.tolist(), abs=1e-4)
    # packed rows give the same rewards
    pbatch, pts, plast = sequence_batch(seqs, tok.pad_token_id, packing=True, row_len=256)
    with torch.no_grad():
        packed = sequence_rewards(rm.eval(), SeqBatch(pbatch, pts, plast, 3, torch.arange(3)))
    assert packed.tolist() == pytest.approx(ours, abs=1e-4)
    # reloading the saved RM with posttrain keeps the trained head
    again = reward_model_from(tmp_path / "rm", tok)
    assert score(again, tok, msgs, [p["chosen"] for p in PAIRS]) == pytest.approx(ours, abs=1e-5)


PREFS = """
sample: {n: 3, max_new_tokens: 8, chunk: 16}
reward:
  data: {val_fraction: 0.3, max_length: 96}
  batch_size: 8
  train: {lr: 1.0e-3, checkpoint_every: 0}
reward_pl:
  kind: reward
  loss: plackett_luce
  data: {val_fraction: 0.3, max_length: 96}
  batch_size: 4
  train: {lr: 1.0e-3, checkpoint_every: 0}
bon:
  kind: best_of_n
  reward_model: reward
  n: 3
  n_prompts: 1
  max_new_tokens: 6
dpo:
  data: {val_fraction: 0.3, max_length: 96}
  batch_size: 8
  train: {lr: 1.0e-4, checkpoint_every: 0}
"""
ORPO = """
orpo:
  kind: dpo
  loss: orpo
  beta: 0.2
  data: {val_fraction: 0.3, max_length: 96}
  batch_size: 8
  train: {lr: 1.0e-4, checkpoint_every: 0}
"""
EVAL_BON = """
evaluate:
  models:
    sft: {model: sft}
    bon4: {model: sft, policy: best_of_n, reward_model: reward, n: 4}
  max_new_tokens: 6
  diversity: {n_prompts: 0}
"""


def test_pipeline_through_reward_and_dpo(run_tiny):
    stages = ["world", "pretrain", "sft", "sample", "rank", "reward", "reward_pl", "bon", "dpo",
              "orpo", "evaluate"]  # fmt: skip
    report, run = run_tiny(stages, PREFS + ORPO + EVAL_BON)
    rm = report["stages"]["reward"]
    for key in ("train/loss", "eval/accuracy", "eval/margin", "eval/ece", "eval/loss"):
        assert key in rm, key
    assert (run / "reward/model/config.json").is_file()
    pl = report["stages"]["reward_pl"]  # Plackett-Luce on each annotator's full ranking
    assert pl["train/loss"] == pl["train/loss"] and "eval/accuracy" in pl
    first = json.loads((run / "reward_pl/metrics.jsonl").read_text().splitlines()[0])
    # The head starts at zero: every ranking of 3 is equally likely, loss log 3! = log 6.
    assert first["train/loss"] == pytest.approx(math.log(6), abs=1e-4)
    assert (
        "ForSequenceClassification"
        in json.loads((run / "reward/model/config.json").read_text())["architectures"][0]
    )
    bon = report["stages"]["bon"]
    assert bon["bon/prompts"] == 5 and bon["kl/best_of_n_bound"] == pytest.approx(
        math.log(3) - 2 / 3
    )
    assert bon["bon/reward_best"] >= bon["bon/reward_mean"]
    best = [json.loads(x) for x in (run / "bon/best.jsonl").read_text().splitlines()]
    for b in best:
        assert b["reward"] == max(b["rewards"]) and b["messages"][-1]["role"] == "assistant"
    d = report["stages"]["dpo"]
    # reward and dpo hold out the same prompts (split by the pipeline's seed, not the stage's)
    assert (
        d["data/val_pairs"] == rm["data/val_pairs"]
        and d["data/train_pairs"] == rm["data/train_pairs"]
    )
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "kl/ref",
                "eval/rewards/accuracy", "eval/loss"):  # fmt: skip
        assert key in d, key
    lines = [json.loads(x) for x in (run / "dpo/metrics.jsonl").read_text().splitlines()]
    # Step 1: policy == reference, so the implicit rewards are 0 and the loss is log 2.
    assert lines[0]["train/loss"] == pytest.approx(0.6931, abs=1e-3)
    assert lines[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-4)
    assert lines[0]["kl/ref"] == pytest.approx(0.0, abs=1e-4)
    # ORPO: reference-free; each step's loss is its NLL plus beta times its odds-ratio term
    for line in (run / "orpo/metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            assert row["train/loss"] == pytest.approx(
                row["orpo/nll"] + 0.2 * row["orpo/ratio_loss"], rel=1e-4
            )
    assert "kl/ref" not in report["stages"]["orpo"] and "eval/orpo/nll" in report["stages"]["orpo"]
    # best-of-n in evaluate: the over-optimisation curve from its own samples, and its plot
    ev = report["evals"]["bon4"]
    assert [ev[f"overopt/kl@{k}"] for k in (1, 2, 4)] == pytest.approx(
        [0.0, math.log(2) - 1 / 2, math.log(4) - 3 / 4]
    )
    recs = [json.loads(x) for x in (run / "evaluate/bon4.jsonl").read_text().splitlines()]
    assert ev["overopt/gold@1"] == pytest.approx(
        sum(sum(r["golds"]) / 4 for r in recs) / len(recs)  # best-of-1 = a random sample
    )
    assert ev["overopt/gold@4"] == pytest.approx(
        sum(r["golds"][r["rewards"].index(r["reward"])] for r in recs) / len(recs)
    )  # best-of-all = the picked one
    assert ev["overopt/reward@4"] == pytest.approx(ev["bon/reward_best"])
    assert "calibration/ece" in report["evals"]["sft"]
    assert (run / "plots/evaluate_over_optimisation.png").is_file()
    assert (run / "plots/evaluate_calibration.png").is_file()


def test_dpo_precomputed_reference_equals_live_reference(tmp_path, tiny_lm, monkeypatch):
    """The same training with reference log-probs precomputed or from a frozen copy."""
    from posttrain.config import load_pipeline
    from posttrain.log import Logger
    from posttrain.models.load import save_model
    from posttrain.pipeline import run_pipeline

    monkeypatch.setenv("CI", "true")
    model, tok = tiny_lm
    save_model(model, tok, tmp_path / "lm")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS * 4))
    losses = {}
    for pre in (True, False):
        cfg = tmp_path / f"d{pre}.yaml"
        cfg.write_text(
            f"name: d\ndevice: cpu\nstages: [dpo]\ndpo:\n  model: {tmp_path / 'lm'}\n"
            f"  data: {{path: {data}, val_fraction: 0}}\n  precompute_ref: {str(pre).lower()}\n"
            "  batch_size: 4\n  epochs: 2\n  train: {lr: 1.0e-3, checkpoint_every: 0}\n"
        )
        run_pipeline(
            load_pipeline(cfg, [f"out={tmp_path / str(pre)}"]), logger=Logger(stream=io.StringIO())
        )
        rows = [
            json.loads(x)
            for x in (tmp_path / str(pre) / "dpo/metrics.jsonl").read_text().splitlines()
        ]
        losses[pre] = [r["train/loss"] for r in rows]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    assert losses[True][-1] < losses[True][0]  # it learns


def test_ece_and_pearson_by_hand():
    from posttrain.eval.metrics import expected_calibration_error
    from posttrain.stages.reward import _pearson

    def _ece(conf, correct):  # the reward stage's: confidence max(p, 1 - p), bins over [0.5, 1]
        return expected_calibration_error(conf, correct, lo=0.5)

    # Bin [0.6, 0.65): conf 0.6, 0.6 with 1 of 2 right -> |0.5 - 0.6| = 0.1, weight 2/4;
    # bin [0.9, 0.95): conf 0.9, 0.9 both right -> |1 - 0.9| = 0.1, weight 2/4. ECE = 0.1.
    assert _ece([0.6, 0.6, 0.9, 0.9], [True, False, True, True]) == pytest.approx(0.1)
    assert _ece([1.0, 1.0], [True, True]) == 0.0
    assert _pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert _pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert _pearson([1, 2, 3], [5, 5, 5]) is None  # undefined for a constant


def test_gold_agreement_per_family_by_hand(monkeypatch):
    # arithmetic: 3 gold-gap pairs (1 vs 0, 1 vs 0, and the 0-0 pair skipped), the scorer ranks
    # the correct reply first in both: 1.0; safety: one pair scored backwards and one tied: 0.25
    # (0 + 0.5) / 2; overall (1 + 1 + 0 + 0.5) / 4 = 0.625
    import posttrain.models.reward as reward_mod
    from posttrain.stages.reward import gold_metrics

    cands = {
        "arithmetic/rl/0": {"messages": [], "responses": [
            {"text": "a", "gold": 1.0}, {"text": "b", "gold": 0.0}, {"text": "c", "gold": 0.0}]},
        "safety/rl/0": {"family": "safety", "messages": [], "responses": [
            {"text": "d", "gold": 0.0}, {"text": "e", "gold": 1.0}]},
        "safety/rl/1": {"family": "safety", "messages": [], "responses": [
            {"text": "f", "gold": 0.0}, {"text": "g", "gold": 1.0}]},
    }  # fmt: skip
    scores = {"a": 2.0, "b": 1.0, "c": 0.0, "d": 1.0, "e": 0.0, "f": 3.0, "g": 3.0}
    monkeypatch.setattr(reward_mod, "score", lambda m, t, convs, texts: [scores[x] for x in texts])
    m = gold_metrics(None, None, cands, list(cands))
    assert m["eval/gold_agreement"] == pytest.approx(0.625) and m["eval/gold_pairs"] == 4
    assert m["eval/gold_agreement/arithmetic"] == 1.0
    assert m["eval/gold_agreement/safety"] == pytest.approx(0.25)
