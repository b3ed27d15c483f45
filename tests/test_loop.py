import pytest
import torch

from posttrain.ops.lm import IGNORE_INDEX, lm_loss_sum
from posttrain.train.checkpoint import list_checkpoints
from posttrain.train.loop import TrainingDiverged, TrainSettings, train

V = 13


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, V)

    def forward(self, ids):
        return self.head(self.norm(self.emb(ids)))  # (B, T, V)


def make_model(seed=0):
    torch.manual_seed(seed)
    return TinyLM()


class SeqObjective:
    """Fixed pool of variable-length sequences; step s uses sequences [s*n, (s+1)*n)."""

    def __init__(self, per_step=8, micro=1, fail_at=None, nan_at=None):
        g = torch.Generator().manual_seed(1)
        self.pool = [
            torch.randint(0, V, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g)
            for _ in range(400)
        ]
        self.per_step, self.micro, self.fail_at, self.nan_at = per_step, micro, fail_at, nan_at

    def batches(self, step):
        if step == self.fail_at:
            raise KeyboardInterrupt("simulated stop")
        seqs = self.pool[step * self.per_step % 392 :][: self.per_step]
        size = self.per_step // self.micro
        return [self._collate(seqs[i : i + size], step) for i in range(0, self.per_step, size)]

    def _collate(self, seqs, step):
        T = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        labels = torch.full((len(seqs), T), IGNORE_INDEX)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
            labels[i, : len(s) - 1] = s[1:]
        return {"ids": ids, "labels": labels, "step": step}

    def weight(self, b):
        return (b["labels"] != IGNORE_INDEX).sum().item()

    def tokens(self, b):
        return b["ids"].numel()

    def loss(self, model, b):
        loss, _ = lm_loss_sum(model(b["ids"]), b["labels"])
        if b["step"] == self.nan_at:
            loss = loss * float("nan")
        return loss, {}


def cfg(**kw):
    return TrainSettings(
        **({"steps": 12, "lr": 1e-2, "warmup_steps": 2, "checkpoint_every": 4} | kw)
    )


def test_grad_accumulation_1x8_equals_8x1(tmp_path):
    # Sequences have different numbers of loss tokens, so averaging per micro-batch would differ.
    results = []
    for micro in (1, 8):
        model = make_model()
        r = train(
            model,
            SeqObjective(micro=micro),
            cfg(steps=3, checkpoint_every=0),
            ckpt_dir=tmp_path / str(micro),
        )
        results.append((r.final_loss, [p.detach().clone() for p in model.parameters()]))
    (loss1, p1), (loss8, p8) = results
    assert abs(loss1 - loss8) < 1e-6
    for a, b in zip(p1, p8, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_resume_reproduces_uninterrupted_final_loss(tmp_path):
    full = train(make_model(), SeqObjective(), cfg(), ckpt_dir=tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        train(make_model(), SeqObjective(fail_at=9), cfg(), ckpt_dir=tmp_path / "cut")
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == [
        "step_0000004.pt",
        "step_0000008.pt",
    ]
    resumed = train(
        make_model(seed=123), SeqObjective(), cfg(), ckpt_dir=tmp_path / "cut", resume=True
    )
    assert resumed.resumed_from == 8
    assert resumed.final_loss == full.final_loss  # bitwise on CPU


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"non-finite loss nan at step 6.*step_0000004\.pt"):
        train(make_model(), SeqObjective(nan_at=5), cfg(), ckpt_dir=tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000004.pt"]


def test_clipping_bounds_the_update(tmp_path):
    # With lr tiny and max_grad_norm small, the logged grad norm is the pre-clip norm; the
    # step still runs. Check the clip by the gradient after clipping.
    model = make_model()
    obj = SeqObjective()
    from posttrain.train.loop import _clip, train_step

    settings = cfg(max_grad_norm=0.01)
    train_step(model, obj, obj.batches(0), settings, torch.device("cpu"))
    pre = _clip(model, settings)
    post = torch.stack([p.grad.norm() for p in model.parameters()]).norm().item()
    assert pre > 0.01
    assert post == pytest.approx(0.01, rel=1e-4)


def test_zero_weight_step_is_an_error(tmp_path):
    class Empty(SeqObjective):
        def weight(self, b):
            return 0

    with pytest.raises(ValueError, match="no loss tokens"):
        train(make_model(), Empty(), cfg(steps=1), ckpt_dir=tmp_path)
