"""The reward stage: fit a reward model to preferences (step 3 of RLHF).

The model is the SFT model with a scalar head read at the last token of the response (see
posttrain.models.reward). Losses (posttrain.ops.preference): Bradley-Terry on pairs, with the
pair's margin subtracted when `use_margin` (Llama 2), or Plackett-Luce on each annotator's full
ranking of the sampled candidates (`loss: plackett_luce`; ties broken by a seeded shuffle).

Evaluated on held-out prompts (pairs split by prompt): accuracy, mean margin, calibration of
P(chosen > rejected) = sigmoid(r_c - r_r) (expected calibration error over 10 confidence bins),
and, on the toy world, agreement with gold on every candidate pair of the held-out prompts that
has a gold gap, and the correlation of reward with response length (a length-hacking warning).
`length_balance` trains on length-balanced pairs (Singhal et al. 2310.03716; held-out pairs are
left as they are).
Saves `model/`, loadable with AutoModelForSequenceClassification.
"""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from posttrain.eval.metrics import expected_calibration_error
from posttrain.models.lora import LoraSettings, lora_field
from posttrain.settings import SettingError, is_set
from posttrain.stages._prefs import (
    PairTraining,
    candidate_gold,
    held_out,
    load_split_pairs,
    log_fit,
    pairs_path,
)
from posttrain.stages.base import StageContext, StageResult, resolve_model, train_with_progress
from posttrain.train import dist
from posttrain.train.loop import (
    MicroBatchObjective,
    TrainSettings,
    check_epochs,
    check_heldout,
    micro_per_step,
    step_micro_indices,
)


class Config(PairTraining):
    model: str = Field("sft", description="Stage or HF dir the reward model starts from.")
    batch_size: int = Field(16, ge=1, description="Pairs (or rankings) per micro-batch.")
    train: TrainSettings = Field(
        default_factory=lambda: TrainSettings(lr=1e-4, warmup_steps=5, weight_decay=0.0),
        description="Optimiser settings.",
    )
    loss: Literal["bradley_terry", "plackett_luce"] = Field(
        "bradley_terry", description="Pairwise Bradley-Terry, or Plackett-Luce on full rankings."
    )
    use_margin: bool = Field(
        False, description="Bradley-Terry: subtract each pair's margin (Llama 2's margin loss)."
    )
    lora: LoraSettings = lora_field(
        "LoRA adapters on the decoder; the scalar head trains in full (peft modules_to_save)."
    )
    # Left out of the resolved config (the cache key) while off, so that stages cached before the
    # option existed stay cached.
    length_balance: bool = Field(
        False,
        exclude_if=lambda v: not v,
        description="Bradley-Terry: train on as many pairs whose chosen reply is longer (in "
        "words) as pairs whose chosen reply is shorter, dropping pairs at random from the larger "
        "side (Singhal et al. 2310.03716's length balancing; data/pairs.py length_balanced).",
    )

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.length_balance and self.loss != "bradley_terry":
            raise ValueError(f"length_balance balances the pairs Bradley-Terry trains on; loss "
                             f"{self.loss} trains on rankings: set loss: bradley_terry or "
                             "length_balance: false")  # fmt: skip
        check_epochs(self.epochs, self.train)
        check_heldout(self.train, self.data.val_fraction, "data.val_fraction")
        for key in ("use_margin", "packing"):  # Plackett-Luce builds its own padded batches
            if self.loss == "plackett_luce" and is_set(self, key):
                raise SettingError(key, "only loss: bradley_terry uses it (plackett_luce trains "
                                   "on whole rankings, padded): drop it")  # fmt: skip
        return self


def inputs(cfg: Config, ctx: StageContext) -> dict[str, Path]:
    found = {"model": resolve_model(cfg.model, ctx), "pairs": pairs_path(cfg.data, ctx)}
    cands = ctx.stage_path(cfg.data.sample_stage, "candidates.jsonl")
    if cands.is_file():
        found["candidates"] = cands
    if cfg.loss == "plackett_luce":
        found["rankings"] = ctx.stage_path(cfg.data.rank_stage, "rankings.jsonl")
    return found


class BTObjective(MicroBatchObjective):
    """Bradley-Terry over a micro-batch of pairs; the step's loss is the mean over its pairs."""

    def __init__(self, data, grad_accum: int, device, use_margin: bool):
        super().__init__(data, grad_accum, device)
        self.use_margin = use_margin

    def weight(self, sb) -> float:
        return sb.n_pairs

    def tokens(self, sb) -> int:
        return sb.batch.n_tokens

    def loss(self, model, sb):
        from posttrain.models.reward import sequence_rewards
        from posttrain.ops.preference import bradley_terry_loss

        r = sequence_rewards(model, sb)
        rc, rr = r[: sb.n_pairs], r[sb.n_pairs :]
        margin = sb.margin if self.use_margin else None
        loss, m = bradley_terry_loss(rc, rr, margin)
        return loss.sum(), {k.replace("rewards/", "reward/"): v * sb.n_pairs for k, v in m.items()}


class PLObjective(MicroBatchObjective):
    """Plackett-Luce over micro-batches of rankings (K candidates each, best first)."""

    def __init__(self, rankings: list[list], batch_size: int, pad_id: int, seed: int, grad_accum: int, device):  # fmt: skip
        super().__init__(self, grad_accum, device)  # its own micro(k) makes the batches
        self.rankings, self.batch_size, self.pad_id, self.seed = rankings, batch_size, pad_id, seed
        self.per_epoch = -(-len(rankings) // batch_size)

    def micro(self, k: int):
        from posttrain.data.pairs import SeqBatch, sequence_batch

        epoch, i = divmod(k, self.per_epoch)
        idx = list(range(len(self.rankings)))
        random.Random(self.seed * 7919 + epoch).shuffle(idx)
        group = [self.rankings[j] for j in idx[i * self.batch_size : (i + 1) * self.batch_size]]
        seqs = [s for g in group for s in g]
        batch, target_seq, last = sequence_batch(seqs, self.pad_id)
        sb = SeqBatch(batch, target_seq, last, len(seqs), torch.tensor([len(g) for g in group]))
        return sb

    def batches(self, step: int):
        return [self.micro(k).to(self.device) for k in step_micro_indices(step, self.grad_accum)]

    def weight(self, sb) -> float:
        return len(sb.index)

    def tokens(self, sb) -> int:
        return sb.batch.n_tokens

    def loss(self, model, sb):
        from posttrain.models.reward import sequence_rewards
        from posttrain.ops.preference import plackett_luce_loss

        r = sequence_rewards(model, sb)
        sizes = sb.index.tolist()
        K = max(sizes)
        rewards = torch.zeros((len(sizes), K), device=r.device)
        mask = torch.zeros((len(sizes), K), dtype=torch.bool, device=r.device)
        at = 0
        for b, n in enumerate(sizes):
            rewards[b, :n] = r[at : at + n]
            mask[b, :n] = True
            at += n
        order = torch.arange(K, device=r.device).expand(len(sizes), K)  # sequences are best first
        return plackett_luce_loss(rewards, order, mask).sum(), {}


def _pearson(xs: list[float], ys: list[float]) -> float | None:
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / (sxx * syy) ** 0.5


@torch.no_grad()
def evaluate_pairs(model, batches, device) -> dict:
    """Held-out pair metrics: accuracy, mean margin, Bradley-Terry loss, calibration (ECE)."""
    from posttrain.models.reward import sequence_rewards

    was_training = model.training
    model.eval()
    deltas = []
    for sb in batches:
        r = sequence_rewards(model, sb.to(device))
        deltas += (r[: sb.n_pairs] - r[sb.n_pairs :]).tolist()
    model.train(was_training)
    t = torch.tensor(deltas)
    p = torch.sigmoid(t)
    conf = torch.maximum(p, 1 - p).tolist()
    return {
        "eval/accuracy": float((t > 0).float().mean()),
        "eval/margin": float(t.mean()),
        "eval/loss": float(-torch.nn.functional.logsigmoid(t).mean()),
        "eval/ece": expected_calibration_error(conf, (t > 0).tolist(), lo=0.5),
    }


def gold_metrics(model, tok, cands: dict[str, dict], prompt_ids: list[str]) -> dict:
    """Toy world: agreement with gold on all candidate pairs with a gold gap, for held-out
    prompts; correlation of reward with response length."""
    from posttrain.models.reward import score

    convs, texts, owners = [], [], []
    for pid in prompt_ids:
        for k, r in enumerate(cands[pid]["responses"]):
            convs.append(cands[pid]["messages"])
            texts.append(r["text"])
            owners.append((pid, k))
    if not texts:
        return {}
    rewards = score(model, tok, convs, texts)
    by = {o: rw for o, rw in zip(owners, rewards, strict=True)}
    hits, per_family = [], {}
    for pid in prompt_ids:
        resp = cands[pid]["responses"]
        family = cands[pid].get("family") or pid.split("/", 1)[0]
        for i in range(len(resp)):
            for j in range(i + 1, len(resp)):
                if resp[i]["gold"] != resp[j]["gold"]:
                    better_i = resp[i]["gold"] > resp[j]["gold"]
                    d = by[(pid, i)] - by[(pid, j)]
                    hits.append(0.5 if d == 0 else float((d > 0) == better_i))
                    per_family.setdefault(family, []).append(hits[-1])
    lengths = [cands[pid]["responses"][k].get("n_tokens", len(cands[pid]["responses"][k]["text"].split()))
               for pid, k in owners]  # fmt: skip
    m = {"eval/length_corr": _pearson([float(x) for x in lengths], rewards)}
    if hits:
        m["eval/gold_agreement"] = sum(hits) / len(hits)
        m["eval/gold_pairs"] = len(hits)
        for family, h in sorted(per_family.items()):  # where the reward model judges well or not
            m[f"eval/gold_agreement/{family}"] = sum(h) / len(h)
    return {k: v for k, v in m.items() if v is not None}


def _rankings_as_sequences(ctx, cfg: Config, tok, seed: int) -> tuple[list[list], list[str]]:
    """Each annotator's ranking of a prompt's candidates, tokenised best first (ties shuffled)."""
    from posttrain.data.pairs import PairStats, fit_replies, tokenize_reply
    from posttrain.io import read_jsonl
    from posttrain.stages.rank import tiers

    cands = {
        r["prompt_id"]: r
        for r in read_jsonl(ctx.stage_path(cfg.data.sample_stage, "candidates.jsonl"))
    }
    out, pids, stats = [], [], PairStats()
    for n, rec in enumerate(read_jsonl(ctx.stage_path(cfg.data.rank_stage, "rankings.jsonl"))):
        if held_out(rec["prompt_id"], cfg.data.val_fraction, seed):
            continue
        rng = random.Random(seed * 31 + n)
        flat = []
        for t in tiers(rec["order"]):
            rng.shuffle(t)
            flat += t
        c = cands[rec["prompt_id"]]
        seqs = [tokenize_reply(tok, c["messages"], c["responses"][k]["text"]) for k in flat]
        seqs = fit_replies(seqs, cfg.data.max_length, cfg.data.overlong)
        stats.pairs += 1
        if seqs is None:
            stats.dropped_overlong += 1
            continue
        stats.truncated += any(s.truncated for s in seqs)
        out.append(seqs)
        pids.append(rec["prompt_id"])
    log_fit(ctx, stats, cfg.data, "rankings")
    return out, pids


def run(cfg: Config, ctx: StageContext) -> StageResult:
    from posttrain.data.pairs import PairBatches, tokenize_pairs
    from posttrain.models.lora import apply_lora, save_trained
    from posttrain.models.reward import reward_model_from
    from posttrain.models.tokenizer import load_tokenizer
    from posttrain.train.precision import autocast

    paths = inputs(cfg, ctx)
    tok = load_tokenizer(paths["model"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    train_pairs, val_pairs, read_stats = load_split_pairs(cfg.data, ctx)
    if cfg.length_balance:
        from posttrain.data.pairs import length_balanced

        train_pairs, balance = length_balanced(train_pairs, ctx.seed)
        read_stats |= balance | {"data/train_pairs": len(train_pairs)}
        if not train_pairs:
            raise ValueError(f"{ctx.name}: length_balance leaves no training pairs")
        ctx.logger.info(f"{ctx.name}: length_balance dropped {balance['data/length_balance_dropped']} "
                        f"pairs (chosen longer {balance['data/chosen_longer']}, shorter "
                        f"{balance['data/chosen_shorter']})")  # fmt: skip
    tokenized, stats = tokenize_pairs(tok, train_pairs, cfg.data.max_length, cfg.data.overlong)
    log_fit(ctx, stats, cfg.data)
    model = reward_model_from(paths["model"], tok, ctx.device)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, task="scalar")
    data = PairBatches(tokenized, batch_size=cfg.batch_size, pad_id=pad, packing=cfg.packing,
                       row_len=2 * cfg.data.max_length, seed=ctx.seed)  # fmt: skip
    settings = cfg.train
    if cfg.loss == "plackett_luce":
        rankings, _ = _rankings_as_sequences(ctx, cfg, tok, ctx.pipeline.config.seed)
        objective = PLObjective(
            rankings, cfg.batch_size, pad, ctx.seed, settings.grad_accum, ctx.device
        )
        per_epoch = objective.per_epoch
    else:
        objective = BTObjective(data, settings.grad_accum, ctx.device, cfg.use_margin)
        per_epoch = data.per_epoch
    if cfg.epochs is not None:
        steps = max(1, -(-int(cfg.epochs * per_epoch) // micro_per_step(settings.grad_accum)))
        settings = settings.model_copy(update={"steps": steps})
    ctx.logger.info(f"{ctx.name}: {cfg.loss} on {len(tokenized)} train pairs, {settings.steps} steps")  # fmt: skip
    evaluate = None
    if val_pairs:
        val_tok, val_stats = tokenize_pairs(tok, val_pairs, cfg.data.max_length, cfg.data.overlong)
        log_fit(ctx, val_stats, cfg.data, "held-out pairs")
        val_batches = PairBatches(val_tok, batch_size=cfg.batch_size, pad_id=pad, packing=False,
                                  row_len=2 * cfg.data.max_length, seed=0).all()  # fmt: skip
        evaluate = partial(evaluate_pairs, batches=val_batches, device=ctx.device)
        if not settings.eval_every:
            settings = settings.model_copy(update={"eval_every": max(1, settings.steps // 10)})
    result = train_with_progress(ctx, model, objective, settings, evaluate)
    metrics = {"train/loss": result.final_loss, "train/steps": result.steps,
               "train/seconds": round(result.seconds, 2)} | stats.metrics() | (val_stats.metrics("val_") if val_pairs else {}) | read_stats | result.eval  # fmt: skip
    cands = candidate_gold(ctx, cfg.data.sample_stage) if cfg.data.path is None else {}
    val_prompts = sorted({p["prompt_id"] for p in val_pairs if p["prompt_id"] in cands})
    if val_prompts:
        with autocast(settings.precision, ctx.device):
            metrics |= gold_metrics(model, tok, cands, val_prompts)
    if dist.is_main():
        save_trained(model, tok, ctx.stage_dir / "model", cfg.lora)
    return StageResult(metrics, {"model": f"{ctx.name}/model"})
