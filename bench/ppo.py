"""PPO throughput, like for like: posttrain's RL trainer against TRL 1.12's PPOTrainer, same work.

    python bench/ppo.py --model DIR --prompts FILE --steps S --batch B --max-new-tokens L
        --lr LR [--impl posttrain|trl] [--seed 0]

FILE: JSONL of {"prompt": text}, tokenised as plain text (no chat template, no special tokens).
Policy and reference: the causal LM in DIR. Reward model and value model: DIR's decoder with a
scalar head, DIR/../scalar_head, made once by `scalar_head_dir`: an HF *ForSequenceClassification
directory (num_labels 1, pad_token_id set, head drawn N(0, 1/hidden) with seed 0). posttrain's
`reward_model_from` loads such a directory as a saved reward model, weights as they are, and
TRL as AutoModelForSequenceClassification: the same weights on both sides, no bridge needed.
Each side loads it twice, as the frozen reward model and as the trained value model.
Each step takes the next B prompts in file order (wrapping around), samples one completion of
each at temperature 0.7 (top-p 1, no top-k) up to L new tokens or EOS, scores it with the reward
model, puts -0.05 x the k1 KL to the reference on every token and the score on the last, GAE
(gamma 1, lambda 0.95) with the value model, whitened advantages (no reward whitening), and
makes one update: one PPO epoch, one minibatch of the B sequences, no gradient accumulation,
ratio clip 0.2, value clip 0.2, the policy loss averaged over completion tokens; AdamW (0.9,
0.999, 1e-8, no weight decay), lr decaying linearly to 0 over S steps without warm-up; float32,
CPU; no evaluation, no sample generations, no checkpoints, no logging service.

--impl posttrain: posttrain.stages.rl_trainer.RLTrainer, the trainer of the ppo stage (epochs 1,
  minibatch = micro-batch = B, lr_schedule linear, betas (0.9, 0.999), value_lr = LR, kl coef
  0.05 where "reward" estimator k1, clip_eps 0.2, value_clip 0.2, gamma 1, lam 0.95,
  whiten_advantages, no whiten_rewards, no_eos_penalty 0, loss_reduction token_mean,
  max_grad_norm 1.0, reward kind reward_model, rollout.k 1, rollout.prompt_format plain).
--impl trl: trl.experimental.ppo.PPOTrainer of TRL 1.12 (num_ppo_epochs 1, num_mini_batches 1,
  per_device_train_batch_size B, gradient_accumulation_steps 1, total_episodes S x B,
  response_length L, temperature 0.7, stop_token "eos", missing_eos_penalty None, kl_coef
  0.05, kl_estimator k1, cliprange 0.2, cliprange_value 0.2, vf_coef 0.1 (its default), gamma
  1, lam 0.95, whiten_rewards False, lr_scheduler_type linear, warmup 0, use_cpu, bf16 False,
  gradient_checkpointing False (PPOConfig turns both on by default), num_sample_generations 0,
  report_to none, save_strategy no), run from the separate environment of bench/trl_env.sh;
  TRL is never a dependency of posttrain. This file imports nothing of posttrain on that path.
  TRL 1.12's PPOTrainer always builds its dataloader with shuffle=True (no setting turns it
  off): the bench replaces trainer.dataloader with an unshuffled one over the same prompt stream
  (S x B rows, left-padded by TRL's own collator, prepared by the trainer's accelerator).

The passes of a step. Rollout: TRL samples with model.generate and takes the old log-probs
from its scores (no policy forward), then forwards the reference (LM head on every position),
the value model and the reward model on the padded prompt + response; posttrain samples with
its own decoder, then forwards the policy (old log-probs: with a KL term in the reward the
update's own forward cannot supply them, so reuse_update_logps is off), the reference and the
value model (LM and value heads on completion positions only), and scores every response with
the reward model. Update: TRL one forward of policy + value model (one wrapped module), one
backward, one AdamW step over both; posttrain a policy forward/backward and a value
forward/backward, then two AdamW steps.

Left as each library has them (structural, or a convention of its own; none is a knob):
- Optimisers: TRL wraps policy and value model in one module with one AdamW and the loss
  pg_loss + vf_coef x vf_loss; posttrain has one AdamW each, the value loss unscaled. AdamW's
  step is invariant to a constant loss scale (up to eps), so value_lr = LR with vf_coef 1 is
  TRL's vf_coef 0.1 at LR. TRL's default optim is adamw_torch_fused (the fused kernel on CPU
  too); posttrain fuses on CUDA only and loops over tensors on CPU.
- Gradient clipping: TRL's PPO loop never clips (max_grad_norm is accepted and unused);
  posttrain clips the policy and the value model at 1.0 each.
- The reward model's input: both score the sampled token ids, prompt + response with its stop
  token (posttrain's ModelReward.score_tokens under rollout.prompt_format plain); TRL reads the
  score at the last non-pad token of its left-padded grid, posttrain at each sequence's last
  token of a right-padded batch.
- Stop tokens: TRL stops at EOS (stop_token "eos"; its default None would never stop and would
  always train on L tokens); posttrain stops at EOS or the end-of-turn marker (<|im_end|>).
  TRL also takes a sampled pad token for the end of the response.
- Padding: TRL left-pads the prompts of a step to the longest and runs every forward on that
  (B, P_max + L) grid; posttrain right-pads prompt + response per sequence.
- TRL whitens advantages with the Bessel-corrected variance, posttrain with the population
  one; TRL adds the score one position past the EOS of a response that stopped early and
  trains the value there too. TRL gc.collect()s twice per step.
The two sides sample with different random numbers, so when a response stops before L the
token counts differ a little.

Prints one JSON line: {"impl", "tokens_per_s", "seconds", "peak_rss_mb", "generated_tokens",
"trained_tokens", "tokens", "mean_reward"}: generated_tokens are the sampled completion tokens
(EOS included; TRL: as it trains them, up to the first pad), trained_tokens the non-pad prompt +
completion tokens of the updates' policy forward passes, tokens their sum, seconds the wall
time of the S steps (rollout, reward and update; not loading the models), mean_reward the mean
of every completion's reward-model score.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rl_common import Tally, parser, posttrain_steps, run  # noqa: E402  (bench/ is not a package)


def scalar_head_dir(model_dir: str) -> Path:
    """DIR/../scalar_head: DIR's decoder with a seeded scalar head (N(0, 1/hidden), seed 0),
    saved as an HF *ForSequenceClassification directory (num_labels 1, pad_token_id set) with
    DIR's tokenizer; made once (written aside, then renamed into place), reused after."""
    out = Path(model_dir).resolve().parent / "scalar_head"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tok = AutoTokenizer.from_pretrained(model_dir)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head is new; HF would report it missing
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=1, pad_token_id=tok.pad_token_id, dtype=torch.float32
        )
    finally:
        hf_logging.set_verbosity(level)
    head = model.score  # (1, C), no bias on Llama
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head.weight.normal_(0.0, head.weight.shape[1] ** -0.5, generator=g)
        if head.bias is not None:
            head.bias.zero_()
    tmp = Path(tempfile.mkdtemp(prefix=".scalar_head.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's is 0o700
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, out)
    except OSError:  # another run made it first
        shutil.rmtree(tmp)
    return out


def run_posttrain(args, prompts: list[str], tally: Tally) -> float:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import io

    import torch

    from posttrain.config import Pipeline, PipelineConfig
    from posttrain.log import Logger
    from posttrain.stages.base import StageContext
    from posttrain.stages.rl import PPOConfig, RLTrainer

    head = scalar_head_dir(args.model)
    cfg = PPOConfig(model=args.model, prompts=args.prompts, steps=args.steps, epochs=1, lr=args.lr,
                    lr_schedule="linear", betas=(0.9, 0.999), value_lr=args.lr,
                    minibatch_size=args.batch, micro_batch_size=args.batch, clip_eps=0.2,
                    value_clip=0.2, max_grad_norm=1.0, gamma=1.0, lam=0.95,
                    kl={"coef": 0.05, "where": "reward", "estimator": "k1"}, no_eos_penalty=0.0,
                    whiten_rewards=False, whiten_advantages=True, loss_reduction="token_mean",
                    reward={"kind": "reward_model", "model": str(head)}, value_model=str(head),
                    rollout={"prompts_per_step": args.batch, "k": 1,
                             "max_new_tokens": args.max_new_tokens, "temperature": 0.7,
                             "top_p": 1.0, "prompt_format": "plain"})  # fmt: skip
    pipe = Pipeline(PipelineConfig(name="bench", device="cpu", stages=["ppo"]), [], "bench")
    paths = {"model": Path(args.model), "reward_model": head, "value_model": head}
    with tempfile.TemporaryDirectory() as tmp:
        ctx = StageContext("ppo", "ppo", Path(tmp), pipe, Logger(stream=io.StringIO()))
        torch.manual_seed(args.seed)
        trainer = RLTrainer(cfg, ctx, paths)
        return posttrain_steps(trainer, prompts, args.batch, args, tally)


def _count_trl_scores(ppo_mod, reward_model, pad: int, tally: Tally) -> None:
    """Wrap the PPO module's get_reward so that the reward model's call also tallies, from the
    very tensors TRL trains on, each sequence's non-pad prompt tokens, its response tokens up
    to the first pad (the stop token included: TRL's loss mask) and its score. The work is
    unchanged: the wrapper only reads the result."""
    get_reward = ppo_mod.get_reward

    def counted(model, query_responses, pad_token_id, context_length):
        out = get_reward(model, query_responses, pad_token_id, context_length)
        if model is reward_model:
            _, scores, ends = out  # (B,), (B,) index of each sequence's last non-pad token
            prompt_lens = (query_responses[:, :context_length] != pad).sum(-1)  # (B,)
            for p, e, s in zip(prompt_lens.tolist(), ends.tolist(), scores.tolist(), strict=True):
                tally.add(p, e - context_length + 1, s)
        return out

    ppo_mod.get_reward = counted


def run_trl(args, prompts: list[str], tally: Tally) -> float:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_mod

    head = scalar_head_dir(args.model)
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"  # queries are left-padded for generation
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # Every prompt S x B / len(prompts) times over, in file order: the dataset is the prompt stream.
    n = args.steps * args.batch
    ids = [tok(prompts[i % len(prompts)], add_special_tokens=False)["input_ids"] for i in range(n)]
    data = Dataset.from_dict({"input_ids": ids})
    with tempfile.TemporaryDirectory() as tmp:
        cfg = PPOConfig(
            output_dir=tmp, total_episodes=n, per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=1,
            response_length=args.max_new_tokens, temperature=0.7, stop_token="eos",
            missing_eos_penalty=None, kl_coef=0.05, kl_estimator="k1", cliprange=0.2,
            cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, whiten_rewards=False,
            learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0,
            adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0,
            max_grad_norm=1.0, use_cpu=True, bf16=False, fp16=False,
            gradient_checkpointing=False, seed=args.seed, logging_steps=1, report_to="none",
            save_strategy="no", num_sample_generations=0, dataloader_num_workers=0,
        )  # fmt: skip
        policy = AutoModelForCausalLM.from_pretrained(args.model, dtype="float32")
        ref = AutoModelForCausalLM.from_pretrained(args.model, dtype="float32")
        reward = AutoModelForSequenceClassification.from_pretrained(head, dtype="float32")
        value = AutoModelForSequenceClassification.from_pretrained(head, dtype="float32")
        trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref,
                             reward_model=reward, train_dataset=data,
                             value_model=value)  # fmt: skip
        # TRL's own dataloader shuffles, always: the same one, in file order.
        loader = DataLoader(data, batch_size=args.batch, shuffle=False,
                            collate_fn=trainer.data_collator, drop_last=True)  # fmt: skip
        trainer.dataloader = trainer.accelerator.prepare(loader)
        _count_trl_scores(ppo_mod, trainer.reward_model, tok.pad_token_id, tally)
        t0 = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, "prompts = completions per step (B)")
    args = ap.parse_args(argv)
    return run(args, run_posttrain, run_trl)


if __name__ == "__main__":
    main()
