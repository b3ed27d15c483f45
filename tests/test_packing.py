"""Packing and padding give the same loss; positions restart; attention never crosses examples."""

import pytest
import torch

from posttrain.data.chat import TokenizedExample
from posttrain.data.collate import IGNORE_INDEX, pack_rows, packed_batch, pad_batch
from posttrain.models.presets import build_model
from posttrain.stages.sft import SFTObjective
from posttrain.train.loop import TrainSettings, train_step


def examples(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        T = int(torch.randint(5, 20, (1,), generator=g))
        ids = torch.randint(5, 100, (T,), generator=g).tolist()
        start = int(torch.randint(1, T - 2, (1,), generator=g))  # prompt, then a trained reply
        out.append(TokenizedExample(ids, [0] * start + [1] * (T - start)))
    return out


@pytest.fixture(scope="module")
def model(small_tokenizer):
    torch.manual_seed(0)
    return build_model("toy-xs", small_tokenizer, seed=0).eval()


def loss_of(model, batch):
    obj = SFTObjective(None, 1, "cpu")
    loss, _ = obj.loss(model, batch)
    return loss.item(), batch.n_loss_tokens


def test_packed_batch_layout():
    a = TokenizedExample([10, 11, 12], [0, 1, 1])
    b = TokenizedExample([20, 21], [0, 1])
    batch = packed_batch([[a, b]], pad_id=0, row_len=7)
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    # 10->11, 11->12 trained; 12 must NOT predict 20 (boundary); 20->21 trained; pads nothing.
    assert batch.labels.tolist() == [
        [11, 12, IGNORE_INDEX, 21, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    ]
    assert batch.attention_mask is None and batch.n_tokens == 5 and batch.n_loss_tokens == 3


def test_pack_rows_first_fit_decreasing():
    assert pack_rows([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]
    with pytest.raises(ValueError, match="more than the row length"):
        pack_rows([9], 7)


def test_packed_loss_equals_unpacked_loss(model):
    exs = examples()
    unpacked = [loss_of(model, pad_batch([e], 0)) for e in exs]
    total = sum(x for x, _ in unpacked) / sum(n for _, n in unpacked)
    padded = loss_of(model, pad_batch(exs, 0))
    rows = pack_rows([len(e) for e in exs], 48)
    assert len(rows) < len(exs)  # really packed several per row
    packed = loss_of(model, packed_batch([[exs[i] for i in r] for r in rows], 0, 48))
    assert abs(padded[0] / padded[1] - total) < 1e-5
    assert abs(packed[0] / packed[1] - total) < 1e-5


def test_attention_does_not_cross_examples(model):
    a, b = examples(2, seed=3)
    batch = packed_batch([[a, b]], 0)
    other = TokenizedExample([7] * len(a), a.loss_mask)  # change every token of the first example
    batch2 = packed_batch([[other, b]], 0)
    from posttrain.models.forward import target_logits

    la, _ = target_logits(model, batch.input_ids, batch.labels, None, batch.position_ids)
    lb, _ = target_logits(model, batch2.input_ids, batch2.labels, None, batch2.position_ids)
    nb = sum(b.loss_mask[1:])
    assert torch.allclose(la[-nb:], lb[-nb:], atol=1e-5)  # b's logits unchanged


def grads_after_step(model_seed_tok, micro_batches):
    model = build_model("toy-xs", model_seed_tok, seed=0)
    obj = SFTObjective(None, 1, "cpu")
    out = train_step(model, obj, micro_batches, TrainSettings(), torch.device("cpu"))
    return out["loss"], [p.grad.clone() for p in model.parameters()]


def test_grad_accumulation_1x8_equals_8x1_packed_and_padded(small_tokenizer):
    exs = examples()
    one_big, ref_grads = grads_after_step(small_tokenizer, [pad_batch(exs, 0)])
    eight, grads8 = grads_after_step(small_tokenizer, [pad_batch([e], 0) for e in exs])
    rows = pack_rows([len(e) for e in exs], 48)
    packed, gradsp = grads_after_step(
        small_tokenizer, [packed_batch([[exs[i] for i in r]], 0, 48) for r in rows]
    )
    assert abs(one_big - eight) < 1e-5 and abs(one_big - packed) < 1e-5
    for g1, g8, gp in zip(ref_grads, grads8, gradsp, strict=True):
        assert torch.allclose(g1, g8, atol=1e-5) and torch.allclose(g1, gp, atol=1e-5)


def test_packing_isolation_check_passes_on_hf_llama_and_catches_a_leaky_model(model):
    from posttrain.data.collate import check_packing_isolation

    exs = examples(2, seed=5)
    assert check_packing_isolation(model, exs, 0) < 1e-4

    class Leaky(torch.nn.Module):
        """Attends across examples: ignores position ids (a causal cumulative mean)."""

        config = model.config

        def __init__(self):
            super().__init__()
            self.inner = model

        def get_decoder(self):
            outer = self

            class Dec(torch.nn.Module):
                def forward(self, input_ids, **kw):
                    h = outer.inner.get_input_embeddings()(input_ids)  # (B, T, C)
                    steps = torch.arange(1, h.shape[1] + 1).view(1, -1, 1)
                    return type("O", (), {"last_hidden_state": h.cumsum(1) / steps})()

            return Dec()

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

    with pytest.raises(ValueError, match="packing check failed"):
        check_packing_isolation(Leaky(), exs, 0)


def test_replay_adds_fully_trained_pretraining_windows_and_stays_a_function_of_k():
    from posttrain.data.sft import ReplayBatches, SFTBatches

    exs = examples(12)
    data = SFTBatches(exs, batch_size=2, pad_id=0, packing=True, row_len=32, seed=3)
    stream = torch.arange(1000, 1200)
    replay = ReplayBatches(data, stream, rows=3, seed=3)
    assert replay.per_epoch == data.per_epoch
    for k in (0, 1, data.per_epoch + 1):
        plain, mixed = data.micro(k), replay.micro(k)
        n = plain.input_ids.shape[0]
        assert torch.equal(mixed.input_ids[:n], plain.input_ids)
        assert torch.equal(mixed.labels[:n], plain.labels)
        windows = mixed.input_ids[n:]
        assert windows.shape == (3, 32)
        # contiguous windows of the stream, every next token trained, positions 0..31
        assert torch.equal(windows[:, 1:] - windows[:, :-1], torch.ones(3, 31, dtype=torch.long))
        assert torch.equal(mixed.labels[n:, :-1], windows[:, 1:])
        assert (mixed.labels[n:, -1] == IGNORE_INDEX).all()
        assert torch.equal(mixed.position_ids[n:], torch.arange(32).expand(3, 32))
        assert mixed.n_loss_tokens == plain.n_loss_tokens + 3 * 31
        assert torch.equal(replay.micro(k).input_ids, mixed.input_ids)  # same k, same batch
    assert not torch.equal(replay.micro(0).input_ids[-3:], replay.micro(1).input_ids[-3:])
    with pytest.raises(ValueError, match="replay text too short"):
        ReplayBatches(data, torch.arange(10), rows=1, seed=0)
