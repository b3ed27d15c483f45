import shutil

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


@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("clang++")),
    reason="torch.compile on the CPU needs a C++ compiler (g++ or clang++)",
)
def test_compile_trains_like_eager_and_leaves_plain_blocks(small_tokenizer):
    """train.compile: each block runs compiled during training (same losses as eager within
    float rounding, over batches of different shapes) and is a plain module afterwards."""
    from posttrain.data.chat import TokenizedExample
    from posttrain.data.collate import packed_batch, pad_batch
    from posttrain.models.presets import build_model
    from posttrain.stages.sft import SFTObjective
    from posttrain.train.loop import benchmark_settings, train_on_batches

    g = torch.Generator().manual_seed(0)

    def example(n):
        ids = torch.randint(5, len(small_tokenizer), (n,), generator=g).tolist()
        return TokenizedExample(ids, [0] * (n // 2) + [1] * (n - n // 2))

    pad = small_tokenizer.pad_token_id
    batches = [pad_batch([example(9), example(17)], pad),
               packed_batch([[example(12), example(7)], [example(20)]], pad),
               pad_batch([example(5), example(30), example(11)], pad)]  # fmt: skip
    settings = benchmark_settings(len(batches), 1e-2)
    losses = {}
    for compiled in (False, True):
        model = build_model("toy-xs", small_tokenizer, max_position_embeddings=64, seed=0)
        keys = set(model.state_dict())
        run = settings.model_copy(update={"compile": compiled})
        losses[compiled] = train_on_batches(model, SFTObjective(None, 1, "cpu"), batches, run)
        blocks = model.get_decoder().layers
        assert all("forward" not in vars(b) for b in blocks)  # plain again
        assert set(model.state_dict()) == keys  # no _orig_mod. prefixes in what is saved
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_compile_without_transformer_blocks_names_the_key():
    from posttrain.train.loop import compile_layers

    with pytest.raises(ValueError, match=r"train\.compile: found no list of transformer blocks"):
        compile_layers(make_model())


def test_gradient_checkpointing_trains_the_same_and_is_switched_off_after(small_tokenizer):
    from posttrain.data.chat import TokenizedExample
    from posttrain.data.collate import packed_batch, pad_batch
    from posttrain.models.presets import build_model
    from posttrain.stages.sft import SFTObjective
    from posttrain.train.loop import benchmark_settings, train_on_batches

    g = torch.Generator().manual_seed(1)

    def example(n):
        ids = torch.randint(5, len(small_tokenizer), (n,), generator=g).tolist()
        return TokenizedExample(ids, [0] * 3 + [1] * (n - 3))

    pad = small_tokenizer.pad_token_id
    batches = [pad_batch([example(9), example(17)], pad),
               packed_batch([[example(12), example(7)], [example(20)]], pad)]  # fmt: skip
    runs = {}
    for on in (False, True):
        model = build_model("toy-xs", small_tokenizer, max_position_embeddings=64, seed=0)
        settings = benchmark_settings(2, 1e-2).model_copy(update={"gradient_checkpointing": on})
        runs[on] = train_on_batches(model, SFTObjective(None, 1, "cpu"), batches, settings)
        assert not model.is_activation_checkpointing
    assert runs[True] == pytest.approx(runs[False], rel=1e-6)


def test_gradient_checkpointing_on_a_model_without_it_names_the_key():
    settings = TrainSettings(steps=1, checkpoint_every=0, gradient_checkpointing=True)
    with pytest.raises(ValueError, match=r"train\.gradient_checkpointing: TinyLM does not"):
        train(make_model(), SeqObjective(), settings, ckpt_dir="/nonexistent")


def _held_out_eval(model):
    """A held-out 'evaluation': the mean logit (any deterministic function of the weights)."""
    with torch.no_grad():
        return {"eval/loss": model(torch.arange(V)[None]).mean().item()}


class MetricObjective(SeqObjective):
    def loss(self, model, b):
        loss, _ = super().loss(model, b)
        return loss, {"acc": 0.5 * self.weight(b)}  # the objective's own metric


def test_resume_from_the_final_checkpoint_reports_what_the_unbroken_run_did(tmp_path):
    # Killed after the last checkpoint (e.g. while saving the model): --resume has no step
    # left to run, and must still report the last step's loss, metrics and evaluation.
    settings = cfg(steps=4, checkpoint_every=2, eval_every=2)
    full = train(
        make_model(), MetricObjective(), settings, ckpt_dir=tmp_path, evaluate=_held_out_eval
    )
    assert list_checkpoints(tmp_path)[-1].name == "step_0000004.pt"
    assert set(full.eval) == {"eval/loss"} and full.last == {"train/acc": 0.5}
    resumed = train(make_model(seed=5), MetricObjective(), settings, ckpt_dir=tmp_path,
                    resume=True, evaluate=_held_out_eval)  # fmt: skip
    assert resumed.resumed_from == 4
    assert (resumed.final_loss, resumed.tokens, resumed.eval, resumed.last) == (
        full.final_loss,
        full.tokens,
        full.eval,
        full.last,
    )


def test_checkpoint_write_on_a_full_disk_keeps_the_earlier_ones_and_resumes(tmp_path, monkeypatch):
    import errno

    from posttrain.io import DiskFullError
    from posttrain.train import checkpoint

    real = torch.save

    def full_disk_at_8(obj, f):
        if obj["step"] == 8:
            with open(f, "wb") as fh:
                fh.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk_at_8)
    with pytest.raises(DiskFullError, match=r"while writing .*step_0000008\.pt; free space"):
        train(make_model(), SeqObjective(), cfg(), ckpt_dir=tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000004.pt"]
    full = train(make_model(), SeqObjective(), cfg(), ckpt_dir=tmp_path / "full")
    resumed = train(make_model(seed=3), SeqObjective(), cfg(), ckpt_dir=tmp_path, resume=True)
    assert resumed.resumed_from == 4 and resumed.final_loss == full.final_loss


def test_leftovers_of_a_killed_checkpoint_write_go_on_resume(tmp_path):
    train(make_model(), SeqObjective(), cfg(steps=4), ckpt_dir=tmp_path)
    (tmp_path / ".step_0000008.pt.abcd1234.tmp").write_bytes(b"half")  # as a SIGKILL leaves it
    train(make_model(), SeqObjective(), cfg(steps=4), ckpt_dir=tmp_path, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000004.pt"]
    (tmp_path / ".step_0000008.pt.abcd1234.tmp").write_bytes(b"half")  # or on the next save
    train(make_model(), SeqObjective(), cfg(steps=8), ckpt_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000004.pt", "step_0000008.pt"]
