"""GRPO throughput, like for like: posttrain's RL trainer against TRL's GRPOTrainer, same work.

    python bench/grpo.py --model DIR --prompts FILE --steps S --batch B --num-generations G
        --max-new-tokens L --lr LR [--impl posttrain|trl] [--seed 0] [--device cpu|cuda]

FILE: JSONL of {"prompt": text}, tokenised as plain text (no chat template, no special tokens).
Each step takes the next B/G prompts in file order (wrapping around), samples G completions of
each at temperature 1.0 (top-p 1, no top-k) up to L new tokens or EOS, scores every completion
with REWARD below, computes group-normalised advantages (mean and std within each prompt's
group) and makes one update: one optimiser step on the B sequences, one iteration, no KL term,
no reference model, the clipped (0.2) policy loss averaged over completion tokens; AdamW (0.9,
0.999, 1e-8, no weight decay), lr decaying linearly to 0 over S steps without warm-up, gradient
norm clipped at 1.0; float32.

--impl posttrain: posttrain.stages.rl_trainer.RLTrainer, the trainer of the grpo stage
  (lr_schedule linear, betas (0.9, 0.999), kl.coef 0, epochs 1, minibatch = micro-batch = B,
  rollout.prompt_format plain, no_eos_penalty 0).
--impl trl: trl.GRPOTrainer (use_vllm False, beta 0, num_iterations 1, loss_type "dapo": the
  token mean over the batch, scale_rewards "group", shuffle_dataset False, steps_per_generation
  1), run from the separate environment of bench/trl_env.sh; TRL is never a dependency of
  posttrain. This file imports nothing of posttrain on that path.

Two conventions differ and are TRL's and posttrain's own: TRL divides by the Bessel-corrected
group std plus 1e-4, posttrain by the population std plus 1e-6 (advantages ~sqrt((G-1)/G)
smaller in TRL); neither changes the work a step does.

Prints one JSON line: {"impl", "tokens_per_s", "seconds", "peak_rss_mb", "generated_tokens",
"trained_tokens", "tokens", "mean_reward"}: generated_tokens are the sampled completion tokens
(EOS included), trained_tokens the non-pad prompt + completion tokens of the updates' forward
passes, tokens their sum, seconds the wall time of the S steps (generation, reward and update;
not loading the model), mean_reward the mean of every completion's reward.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rl_common import Tally, parser, posttrain_steps, run  # noqa: E402  (bench/ is not a package)

WORDS = ("alpha", "beta", "gamma", "delta")


def reward(text: str) -> float:
    """The distinct words of WORDS that occur in the lower-cased completion, plus
    min(1, 0.01 x its number of whitespace-separated words)."""
    low = text.lower()
    return sum(w in low for w in WORDS) + min(1.0, 0.01 * len(text.split()))


def run_posttrain(args, prompts: list[str], tally: Tally) -> float:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import io

    import torch

    from posttrain.config import Pipeline, PipelineConfig
    from posttrain.log import Logger
    from posttrain.stages.base import StageContext
    from posttrain.stages.rl import GRPOConfig, RLTrainer

    per_step = args.batch // args.num_generations
    cfg = GRPOConfig(model=args.model, prompts=args.prompts, steps=args.steps, epochs=1, lr=args.lr, lr_schedule="linear",
                     betas=(0.9, 0.999), minibatch_size=args.batch, micro_batch_size=args.batch,
                     clip_eps=0.2, max_grad_norm=1.0, kl={"coef": 0.0}, no_eos_penalty=0.0,
                     loss_reduction="token_mean", reward={"kind": "verifier"},
                     rollout={"prompts_per_step": per_step, "k": args.num_generations,
                              "max_new_tokens": args.max_new_tokens, "temperature": 1.0,
                              "top_p": 1.0, "prompt_format": "plain"})  # fmt: skip
    pipe = Pipeline(PipelineConfig(name="bench", device=args.device, stages=["grpo"]), [], "bench")
    with tempfile.TemporaryDirectory() as tmp:
        ctx = StageContext("grpo", "grpo", Path(tmp), pipe, Logger(stream=io.StringIO()))
        torch.manual_seed(args.seed)
        trainer = RLTrainer(cfg, ctx, {"model": Path(args.model)})
        assert trainer.reuse_update_logps  # one forward per sequence in the update, as TRL's
        trainer.reward_fn = lambda ps, texts: [{"reward": reward(t)} for t in texts]
        return posttrain_steps(trainer, prompts, per_step, args, tally)


def run_trl(args, prompts: list[str], tally: Tally) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def reward_fn(prompts, completions, completion_ids, **_):
        out = []
        for p, c, ids in zip(prompts, completions, completion_ids, strict=True):
            r = reward(c)
            tally.add(len(tok(p, add_special_tokens=False)["input_ids"]), len(ids), r)
            out.append(r)
        return out

    per_step = args.batch // args.num_generations
    # Every prompt S/per_step times over, in file order: the dataset is the run's prompt stream.
    n = args.steps * per_step
    data = Dataset.from_list([{"prompt": prompts[i % len(prompts)]} for i in range(n)])
    with tempfile.TemporaryDirectory() as tmp:
        cfg = GRPOConfig(
            output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=args.batch,
            num_generations=args.num_generations, generation_batch_size=args.batch,
            gradient_accumulation_steps=1, num_iterations=1,
            max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
            beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group",
            learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0,
            adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0,
            max_grad_norm=1.0, shuffle_dataset=False, use_cpu=args.device == "cpu", bf16=False, fp16=False,
            seed=args.seed, logging_steps=1, report_to="none", save_strategy="no",
            use_vllm=False, disable_dropout=True, log_completions=False,
            dataloader_num_workers=0,
        )  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype="float32")
        trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=cfg, train_dataset=data,
                              processing_class=tok)  # fmt: skip
        t0 = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, "completions per step (B)")
    ap.add_argument("--num-generations", type=int, default=4, help="completions per prompt (G)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (float32 on both)")
    args = ap.parse_args(argv)
    if args.batch % args.num_generations:
        ap.error(f"--batch {args.batch} must be a multiple of --num-generations")
    return run(args, run_posttrain, run_trl)


if __name__ == "__main__":
    main()
