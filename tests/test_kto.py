"""KTO: the loss by hand, feedback data, the reference point over a whole step, the stage."""

import json
import math

import pytest
import torch

from posttrain.ops.preference import kto_loss

PAIRS = [
    {"prompt_id": f"p{i}", "messages": [{"role": "user", "content": f"What is {i} plus {i}?"}],
     "chosen": f"It is {2 * i}.", "rejected": f"Maybe {2 * i + 1}, I am not sure at all."}
    for i in range(6)
]  # fmt: skip


def test_kto_at_the_reference_by_hand():
    # policy == ref and z0 = 0: every reply costs w (1 - sigmoid(0)) = w / 2; the gradient of a
    # desirable reply's log-prob is -w_D beta sigmoid'(0) = -w_D beta / 4, an undesirable's +w_U beta / 4.
    pi = torch.tensor([-3.0, -5.0, -2.0], dtype=torch.float64, requires_grad=True)
    ref = pi.detach().clone()
    good = torch.tensor([True, False, True])
    loss, m = kto_loss(pi, ref, good, 0.0, beta=0.5, desirable_weight=2.0, undesirable_weight=3.0)
    assert loss.tolist() == pytest.approx([1.0, 1.5, 1.0])
    loss.sum().backward()
    assert pi.grad.tolist() == pytest.approx([-2.0 * 0.5 / 4, 3.0 * 0.5 / 4, -2.0 * 0.5 / 4])
    assert m["rewards/mean"].item() == 0 and m["kto/desirable_frac"].item() == pytest.approx(2 / 3)


def test_kto_reference_point_value_clamp_and_no_gradient():
    pi = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    ref = torch.tensor([-2.0, -2.0], dtype=torch.float64)  # r = 1 for both
    good = torch.tensor([True, False])
    z = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    loss, m = kto_loss(pi, ref, good, z, beta=2.0)
    # desirable: 1 - sigmoid(2 (1 - .5)) = 1 - sigmoid(1); undesirable: 1 - sigmoid(2 (.5 - 1))
    s1 = 1 / (1 + math.exp(-1))
    assert loss.tolist() == pytest.approx([1 - s1, s1])
    assert m["rewards/accuracy"].item() == 0.5  # the good one above z0, the bad one above too
    assert m["rewards/signed"].item() == pytest.approx(0.0)  # (2 - 2) / 2
    assert m["kl/ref_point"].item() == 0.5
    assert not loss.requires_grad  # z0 carries no gradient (nor does anything else here)
    # a negative estimate is clamped: KL is never below 0
    neg, m = kto_loss(pi, ref, good, -3.0, beta=2.0)
    zero, _ = kto_loss(pi, ref, good, 0.0, beta=2.0)
    assert torch.equal(neg, zero) and m["kl/ref_point"].item() == 0.0


def test_feedback_records_and_pairs_split(tmp_path):
    from posttrain.data.preferences import load_feedback
    from posttrain.data.schema import DataError

    f = tmp_path / "fb.jsonl"
    f.write_text(json.dumps({"prompt": "Hi", "completion": "Hello!", "label": True}) + "\n"
                 + json.dumps({"prompt": "Hi", "completion": "Go away.", "label": "no"}) + "\n")  # fmt: skip
    with pytest.raises(DataError, match=r"fb.jsonl:2: field 'label' must be true or false"):
        load_feedback(f)
    f.write_text(json.dumps({"prompt": "Hi", "completion": " ", "label": True}) + "\n")
    with pytest.raises(DataError, match=r"fb.jsonl:1: .*empty response"):
        load_feedback(f)
    f.write_text(json.dumps({"prompt": "Hi", "completion": "Hello!", "label": False}) + "\n")
    recs, stats = load_feedback(f)
    assert recs == [{"prompt_id": "fb/1", "messages": [{"role": "user", "content": "Hi"}],
                     "completion": "Hello!", "label": False}] and stats["kept"] == 1  # fmt: skip
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in PAIRS))
    recs, stats = load_feedback(p)
    assert stats["from_pairs"] == 6 and len(recs) == 12
    assert [r["label"] for r in recs[:2]] == [True, False]
    assert (
        recs[0]["completion"] == PAIRS[0]["chosen"]
        and recs[1]["completion"] == PAIRS[0]["rejected"]
    )


def test_reference_point_is_over_the_whole_step(small_tokenizer):
    """One micro-batch of 8 and two of 4 give the same loss and gradients: z0 is the mean over
    all the step's mismatched sequences, not each micro-batch's (TRL's per-batch estimate)."""
    from posttrain.data.pairs import PairBatches, tokenize_feedback
    from posttrain.data.preferences import pairs_to_feedback
    from posttrain.models.presets import build_model
    from posttrain.stages.dpo import reference_logps
    from posttrain.stages.kto import Config, KTOObjective, _split

    tok = small_tokenizer
    torch.manual_seed(0)
    model = build_model("toy-xs", tok, max_position_embeddings=256)
    recs = pairs_to_feedback(PAIRS[:4])
    tokenized, _ = tokenize_feedback(tok, recs, 96)
    data = PairBatches(
        tokenized, batch_size=8, pad_id=tok.pad_token_id, packing=False, row_len=192, seed=0
    )
    ref = reference_logps(model, data.all(), "cpu", len(tokenized))
    with torch.no_grad():  # move the policy off the reference, so z0 != 0
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cfg = Config(beta=1.0)

    def step(groups):
        obj = KTOObjective(cfg, data, "cpu", ref)
        mbs = []
        for g in groups:
            mbs.append(tuple(_split(data, g)))
        obj._step, obj._z = [kl for _, kl in mbs], None
        model.zero_grad()
        total = 0.0
        for mb in mbs:
            loss, _ = obj.loss(model, mb)
            (loss / 8).backward()
            total += loss.item() / 8
        return total, [p.grad.clone() for p in model.parameters()], obj._z

    one, g1, z1 = step([list(range(8))])
    two, g2, z2 = step([[0, 2, 4, 6], [1, 3, 5, 7]])
    assert two == pytest.approx(one, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2, strict=True))
    assert z1 == pytest.approx(z2, abs=1e-6) and z1 > 0
    # per micro-batch, as TRL estimates it, the two halves see different reference points
    halves = [KTOObjective(cfg, data, "cpu", ref).reference_point(model, [_split(data, g)[1]])
              for g in ([0, 2, 4, 6], [1, 3, 5, 7])]  # fmt: skip
    assert abs(halves[0] - halves[1]) > 1e-3


KTO = """
kto:
  beta: 0.5
  data: {val_fraction: 0.3, max_length: 96}
  batch_size: 8
  train: {lr: 1.0e-4, checkpoint_every: 0}
sample: {n: 3, max_new_tokens: 8, chunk: 16}
"""


def test_kto_stage_on_the_rank_stage_pairs(run_tiny):
    report, run = run_tiny(["world", "pretrain", "sft", "sample", "rank", "kto"], KTO)
    k = report["stages"]["kto"]
    assert k["data/train_replies"] > 0 and 0 < k["data/desirable"] < k["data/train_replies"]
    assert k["read/from_pairs"] * 2 == k["data/train_replies"] + k["data/val_replies"]
    for key in (
        "rewards/signed",
        "rewards/accuracy",
        "kl/ref_point",
        "eval/loss",
        "eval/rewards/signed",
    ):
        assert key in k, key
    first = json.loads((run / "kto/metrics.jsonl").read_text().splitlines()[0])
    # step 1: the policy is its own reference, r = 0 and z0 = 0: every reply costs exactly 1/2
    assert first["train/loss"] == pytest.approx(0.5, abs=1e-6)
    assert first["kl/ref_point"] == pytest.approx(0.0, abs=1e-6)
    assert (run / "kto/model/config.json").is_file()
