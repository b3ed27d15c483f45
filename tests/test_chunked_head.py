"""The LM head and log-softmax a chunk of rows at a time (ops/chunked_head.py): the same values
and gradients as the full (N, V) computation, no (N, V) tensor saved for backward, and the
losses built on it (SFT, sequence log-probs, RL token log-probs) unchanged."""

import pytest
import torch
import torch.nn.functional as F

from posttrain.data.chat import TokenizedExample
from posttrain.ops.chunked_head import chunked_token_logps, default_chunk

N, C, V = 7, 5, 11


def _full(h, head, targets, temperature):
    """The reference: log softmax((h W^T + b) / T), its value at the targets and its entropy."""
    lsm = F.log_softmax(head(h) / temperature, dim=-1)  # (N, V)
    return lsm.gather(-1, targets[:, None])[:, 0], -(lsm.exp() * lsm).sum(-1)


def _grads(h, head):
    grads = [h.grad] + [p.grad for p in head.parameters()]
    out = [None if g is None else g.clone() for g in grads]
    h.grad = None
    head.zero_grad(set_to_none=True)
    return out


def _close(a, b, atol=1e-5):
    assert (a is None) == (b is None)
    if a is not None:
        assert torch.allclose(a, b, atol=atol), (a - b).abs().max()


@pytest.mark.parametrize("chunk", [1, 3, N, N + 4])  # 3: N is not a multiple of the chunk
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_equal_the_full_computation(chunk, temperature, bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(C, V, bias=bias)
    h = torch.randn(N, C, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    g = torch.randn(N)  # any upstream gradient, not just ones

    logp, ent = chunked_token_logps(h, head, targets, temperature, True, chunk)
    (g * logp).sum().backward()
    got = _grads(h, head)
    want_logp, want_ent = _full(h, head, targets, temperature)
    (g * want_logp).sum().backward()
    want = _grads(h, head)

    assert logp.dtype == torch.float32 and logp.shape == (N,)
    _close(logp, want_logp.detach())
    _close(ent, want_ent.detach())
    assert not ent.requires_grad  # a metric
    for a, b in zip(got, want, strict=True):
        _close(a, b)


def test_frozen_head_gets_no_gradient_and_the_hidden_states_the_same():
    torch.manual_seed(1)
    head = torch.nn.Linear(C, V).requires_grad_(False)
    h = torch.randn(N, C, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    chunked_token_logps(h, head, targets, 0.7, chunk=2)[0].sum().backward()
    got = h.grad.clone()
    h.grad = None
    _full(h, head, targets, 0.7)[0].sum().backward()
    _close(got, h.grad)
    assert head.weight.grad is None and head.bias.grad is None


def test_under_no_grad_the_values_are_the_same_and_no_graph_is_built():
    torch.manual_seed(2)
    head = torch.nn.Linear(C, V)
    h, targets = torch.randn(N, C), torch.randint(0, V, (N,))
    with torch.no_grad():
        logp, ent = chunked_token_logps(h, head, targets, 1.0, True, chunk=3)
        want_logp, want_ent = _full(h, head, targets, 1.0)
    assert not logp.requires_grad and logp.grad_fn is None
    _close(logp, want_logp)
    _close(ent, want_ent)


@pytest.mark.parametrize("chunk", [4, 9])
def test_under_bf16_autocast_the_head_multiplies_in_bf16_as_nn_linear_does(chunk):
    """One chunk: the same bf16 products as `head(h).float()` under autocast, so the same
    numbers exactly. Several chunks: the weight's gradient is summed over chunks in float32
    from bf16 partial products, so it differs by bf16 rounding only."""
    torch.manual_seed(4)
    n, c, v = 9, 16, 50
    head = torch.nn.Linear(c, v)
    h0, targets, g = torch.randn(n, c), torch.randint(0, v, (n,)), torch.randn(n)
    outs = []
    for chunked in (True, False):
        h = h0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if chunked:
                logp = chunked_token_logps(h, head, targets, 0.7, chunk=chunk)[0]
            else:
                logp = -F.cross_entropy(head(h).float() / 0.7, targets, reduction="none")
        (g * logp).sum().backward()
        outs.append([logp.detach(), *_grads(h, head)])
    atol = 1e-5 if chunk >= n else 5e-2  # bf16 keeps 8 bits of mantissa
    for a, b in zip(*outs, strict=True):
        assert a.dtype == b.dtype == torch.float32
        _close(a, b, atol)


def test_uniform_logits_by_hand():
    # W = 0: every logit is 0, so log p = -log V at any target and temperature, entropy log V;
    # d log p_y / dz = onehot(y) - 1/V, so dW = sum_i (onehot(y_i) - 1/V)^T h_i / T.
    head = torch.nn.Linear(2, 4, bias=False)
    torch.nn.init.zeros_(head.weight)
    h = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    targets = torch.tensor([3, 0])
    logp, ent = chunked_token_logps(h, head, targets, 0.5, True, chunk=1)
    assert torch.allclose(logp, torch.full((2,), -torch.log(torch.tensor(4.0))))
    assert torch.allclose(ent, torch.full((2,), torch.log(torch.tensor(4.0))))
    logp.sum().backward()
    want = torch.full((4, 2), -0.25) * h.sum(0) / 0.5  # -1/V x (sum of rows) / T
    want[3, 0] += 1.0 / 0.5  # row 0 (h = [1, 0]) targets token 3
    want[0, 1] += 2.0 / 0.5  # row 1 (h = [0, 2]) targets token 0
    assert torch.allclose(head.weight.grad, want)


def test_default_chunk_is_about_256_mb_of_float32_logits():
    assert default_chunk(150_000) == 256 * 2**20 // (4 * 150_000)  # 447 rows
    assert default_chunk(10**12) == 1


# ----------------------------------------------------------------------- on a tiny Llama


@pytest.fixture(scope="module")
def tiny_llama(small_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(small_tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=False,
                      pad_token_id=small_tokenizer.pad_token_id)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharp distributions, so that a wrong position or row shows
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model, small_tokenizer.pad_token_id


def _seqs(vocab: int) -> list[TokenizedExample]:
    """Three sequences of different lengths (padding in every batch), trained after a prompt."""
    g = torch.Generator().manual_seed(3)
    out = []
    for n, prompt in ((9, 3), (5, 2), (12, 4)):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append(TokenizedExample(ids, [0] * prompt + [1] * (n - prompt)))
    return out


def test_no_n_by_v_tensor_is_saved_for_backward(tiny_llama):
    from posttrain.data.collate import pad_batch
    from posttrain.models.forward import target_logits, target_logps

    model, pad = tiny_llama
    vocab = model.config.vocab_size
    b = pad_batch(_seqs(vocab), pad)
    args = (model, b.input_ids, b.labels, b.attention_mask, b.position_ids)
    n, chunk = b.n_loss_tokens, 4
    assert n > chunk

    def saved_shapes(fn) -> list[tuple]:
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return shapes

    def too_big(shape) -> bool:  # logits: V last, more than `chunk` rows (weights are (V, C))
        return len(shape) > 1 and shape[-1] == vocab and torch.Size(shape).numel() > chunk * vocab

    def before():
        logits, targets = target_logits(*args)
        return F.cross_entropy(logits.float(), targets, reduction="sum")

    assert any(too_big(s) for s in saved_shapes(before))  # the check sees the old path's logits
    shapes = saved_shapes(lambda: target_logps(*args, temperature=0.7, with_entropy=True,
                                               chunk=chunk))  # fmt: skip
    assert shapes and not [s for s in shapes if too_big(s)]
    assert (n,) in shapes  # the log-sum-exp


def _param_grads(model) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def _compare(model, now, before):
    """now(), before() -> tensors of values; each summed with fixed weights and backpropagated."""
    outs = []
    for fn in (now, before):
        vals = fn()
        w = torch.linspace(0.5, 1.5, vals[0].numel()).reshape(vals[0].shape)
        (w * vals[0]).sum().backward()
        outs.append(([v.detach() for v in vals], _param_grads(model)))
    (got, got_g), (want, want_g) = outs
    for a, b in zip(got, want, strict=True):
        _close(a, b)
    for a, b in zip(got_g, want_g, strict=True):
        _close(a, b)


@pytest.fixture(params=["one chunk", "chunks of 3"])
def chunking(request, monkeypatch, tiny_llama):
    """The default chunk (one chunk here), or 3 rows per chunk, through the losses' own calls."""
    if request.param == "chunks of 3":
        monkeypatch.setattr("posttrain.ops.chunked_head.CHUNK_BYTES",
                            3 * 4 * tiny_llama[0].config.vocab_size)  # fmt: skip
    return request.param


def test_sft_loss_same_as_before(tiny_llama, chunking):
    from posttrain.data.collate import pad_batch
    from posttrain.models.forward import target_logits
    from posttrain.stages.sft import SFTObjective

    model, pad = tiny_llama
    b = pad_batch(_seqs(model.config.vocab_size), pad)
    args = (b.input_ids, b.labels, b.attention_mask, b.position_ids)

    def before():
        logits, targets = target_logits(model, *args)
        return [F.cross_entropy(logits.float(), targets, reduction="sum")]

    _compare(model, lambda: [SFTObjective(None, 1, "cpu").loss(model, b)[0]], before)


def test_sequence_logps_same_as_before(tiny_llama, chunking):
    from posttrain.data.pairs import SeqBatch, sequence_batch, sequence_logps
    from posttrain.models.forward import target_logits

    model, pad = tiny_llama
    seqs = _seqs(model.config.vocab_size)
    batch, target_seq, last = sequence_batch(seqs, pad)
    sb = SeqBatch(batch, target_seq, last, len(seqs), torch.arange(len(seqs)))

    def before(mean):
        b = sb.batch
        logits, targets = target_logits(model, b.input_ids, b.labels, b.attention_mask,
                                        b.position_ids)  # fmt: skip
        lp = -F.cross_entropy(logits.float(), targets, reduction="none")
        sums = torch.zeros(len(seqs)).index_add(0, target_seq, lp)
        counts = torch.zeros(len(seqs)).index_add(0, target_seq, torch.ones_like(lp))
        return [sums / counts if mean else sums]

    for mean in (False, True):
        _compare(model, lambda m=mean: [sequence_logps(model, sb, mean=m)],
                 lambda m=mean: before(m))  # fmt: skip


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rl_token_logps_same_as_before(tiny_llama, chunking, temperature):
    from posttrain.models.forward import target_logits
    from posttrain.rl.rollout import batch_of, token_logps

    model, pad = tiny_llama
    b = batch_of(_seqs(model.config.vocab_size), pad, "cpu")

    def before(with_entropy):
        logits, targets = target_logits(model, b.input_ids, b.labels, b.attention_mask,
                                        b.position_ids)  # fmt: skip
        lsm = torch.log_softmax(logits.float() / temperature, -1)
        logp = lsm.gather(-1, targets[:, None])[:, 0]
        return [logp, -(lsm.exp() * lsm).sum(-1)] if with_entropy else [logp]

    _compare(model, lambda: list(token_logps(model, b, temperature, True)), lambda: before(True))
    assert token_logps(model, b, temperature)[1] is None
    _compare(model, lambda: [token_logps(model, b, temperature)[0]], lambda: before(False))


def test_lora_head_falls_back_and_base_view_sees_the_plain_head(tiny_llama):
    import copy

    from posttrain.data.collate import pad_batch
    from posttrain.models.forward import linear_head, target_logps
    from posttrain.models.lora import BaseView, LoraSettings, apply_lora

    model, pad = tiny_llama
    lora = apply_lora(copy.deepcopy(model), LoraSettings(enabled=True))  # attention only
    assert linear_head(lora) is lora.get_base_model().lm_head
    assert linear_head(BaseView(lora)) is lora.get_base_model().lm_head
    on_head = apply_lora(copy.deepcopy(model),
                         LoraSettings(enabled=True, target_modules=["q_proj", "lm_head"]))  # fmt: skip
    assert linear_head(on_head) is None  # a peft Linear: the full path
    with torch.no_grad():  # adapters start at zero: the same numbers either way
        torch.nn.init.normal_(on_head.get_base_model().lm_head.lora_B.default.weight)
    b = pad_batch(_seqs(model.config.vocab_size), pad)
    args = (b.input_ids, b.labels, b.attention_mask, b.position_ids, 0.7)
    with torch.no_grad():
        got, _, _ = target_logps(on_head, *args)
        logits = on_head(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    keep = b.labels != -100
    want = torch.log_softmax(logits[keep].float() / 0.7, -1).gather(-1, b.labels[keep][:, None])
    _close(got, want[:, 0])
