"""The long PPO runs that overopt_rl and calibration_diversity share, and the evaluation of
their snapshots on held-out prompts.

Runs: the toy's `ppo` section (PPO on the learned reward model) copied under `lab_ppo_<label>`
for each KL coefficient of `lab.rl_runs.kl_coefs`, with `steps` and `snapshot_every` from
there. Both experiments' configs extend configs/lab/rl_runs.yaml, so their sections are the
same and the pipeline's cache runs them once per world seed.

One model (the SFT model as step 0, or a snapshot) is evaluated on the world's eval prompts:
- sampled: on the first `n_per_family` prompts of each family, k responses at temperature 1,
  each with its gold score (the world's checker), its proxy score (the run's reward model), its
  sequence log-ratio log pi(y|x) - log pi_ref(y|x) (the mean over samples estimates
  KL(pi || pi_ref), pi_ref the SFT model), its mean per-token entropy (eval/entropy.py) and
  its token ids (for EAD and self-BLEU);
- greedy: on the first `greedy_per_family` prompts of each family (null: all), the evaluate
  stage's records (evaluate.evaluate_model): gold, components and the response's log-prob
  (calibration).
Every model is sampled with the same seed, so snapshots differ by their weights, not their
random numbers. The result is cached in `<seed>/lab_ppo_eval/<label>/step_<k>.json` (`sft/` for
step 0, which every run shares) under a key of the settings and the hashes of the models and
prompts it read.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from posttrain.lab.base import Lab

EVAL_DIR = "lab_ppo_eval"


def run_stages(raw: dict) -> dict[str, str]:
    """label -> stage name of each long PPO run (first: the main one), its section added to
    `raw` from the toy's `ppo` with the KL coefficient, steps and snapshots of `lab.rl_runs`."""
    from posttrain.config import _deep_merge

    spec = raw["lab"]["rl_runs"]
    out = {}
    for label, coef in spec["kl_coefs"].items():
        sec = copy.deepcopy(raw["ppo"]) | {"kind": "ppo", "steps": spec["steps"],
                                           "snapshot_every": spec["snapshot_every"]}  # fmt: skip
        sec["kl"] = dict(sec.get("kl") or {}) | {"coef": float(coef), "target": None}
        sec = _deep_merge(sec, spec.get("ppo") or {})
        raw[f"lab_ppo_{label}"] = sec
        out[label] = f"lab_ppo_{label}"
    return out


def prepare(lab: Lab, seed: int, raw: dict) -> tuple[Path, dict]:
    """Run (or find cached) the base stages, the reward chain and the long PPO runs of one
    seed. Returns the seed's folder and label -> [(step, model dir)] of each run, step
    0 its initial policy (the SFT model)."""
    from posttrain.rl.snapshots import read_snapshots

    stages = run_stages(raw)
    chain = ["sample", "rank", raw["ppo"]["reward"]["model"]]
    seed_dir = lab.run_stages(seed, raw, chain + list(stages.values()))
    models = {}
    for label, stage in stages.items():
        snaps = read_snapshots(seed_dir / stage)
        models[label] = [(0, seed_dir / raw["ppo"]["model"] / "model")] + [
            (s["step"], seed_dir / stage / s["path"]) for s in snaps
        ]
    return seed_dir, models


def evaluate_runs(lab: Lab, seed_dir: Path, raw: dict, models: dict) -> dict:
    """label -> [(step, evaluation)] for prepare()'s models; step 0 (the SFT model, shared by
    every run) is evaluated once."""
    out = {}
    for label, points in models.items():
        out[label] = [(step, evaluation(lab, seed_dir, raw, "sft" if step == 0 else label, step,
                                        path)) for step, path in points]  # fmt: skip
    return out


def evaluation(lab: Lab, seed_dir: Path, raw: dict, name: str, step: int, model_dir: Path) -> dict:
    """{"vocab_size", "sampled": [per prompt {"prompt_id", "family", "prompt", "samples"}],
    "greedy": [evaluate records]} of one model, cached as <EVAL_DIR>/<name>/step_<step>.json
    (and read from there while its key matches)."""
    from posttrain.io import atomic_write_json, hash_path

    spec = raw["lab"]["rl_runs"]["eval"]
    ref_dir = seed_dir / raw["ppo"]["model"] / "model"
    rm_dir = seed_dir / raw["ppo"]["reward"]["model"] / "model"
    tasks_file = seed_dir / "world" / "tasks_eval.jsonl"
    key = {"eval": spec, "model": hash_path(model_dir), "ref": hash_path(ref_dir),
           "reward": hash_path(rm_dir), "tasks": hash_path(tasks_file)}  # fmt: skip
    path = seed_dir / EVAL_DIR / name / f"step_{step:07d}.json"
    if path.is_file():
        found = json.loads(path.read_text())
        if found.get("key") == key:
            return found
    lab.logger.info(f"rl_runs: evaluating {name} step {step} ({model_dir})")
    out = {"key": key} | _evaluate(model_dir, ref_dir, rm_dir, tasks_file, spec, raw)
    atomic_write_json(path, out)
    return out


def _evaluate(model_dir, ref_dir, rm_dir, tasks_file, spec: dict, raw: dict) -> dict:
    from posttrain.io import read_jsonl
    from posttrain.models.load import load_model, resolve_device
    from posttrain.models.tokenizer import load_tokenizer
    from posttrain.rl.rewards import ModelReward
    from posttrain.stages import evaluate as ev
    from posttrain.world import Task
    from posttrain.world.task import first_per_family

    device = resolve_device(raw.get("device", "auto"))
    tasks = [Task.from_dict(r) for r in read_jsonl(tasks_file)]
    model, tok = load_model(model_dir, device).eval(), load_tokenizer(model_dir)
    ref = load_model(ref_dir, device).eval()
    sampled = _sampled(model, ref, tok, first_per_family(tasks, spec["n_per_family"]), spec)
    rm = ModelReward(rm_dir, device, batch_size=64)
    flat = [(rec, s) for rec in sampled for s in rec["samples"]]
    convs = [{"messages": [{"role": "user", "content": rec["prompt"]}]} for rec, _ in flat]
    scores = rm(convs, [s["text"] for _, s in flat])
    for (_, s), sc in zip(flat, scores, strict=True):
        s["proxy"] = sc["reward"]
    cfg = ev.Config(max_new_tokens=spec["max_new_tokens"], batch_size=spec.get("batch_size", 64),
                    diversity={"n_prompts": 0})  # fmt: skip
    greedy_tasks = first_per_family(tasks, spec.get("greedy_per_family"))
    _, greedy = ev.evaluate_model(model, tok, greedy_tasks, None, "chat", cfg, spec["seed"])
    for r in greedy:
        r.pop("prompt", None)
    return {"vocab_size": len(tok), "sampled": sampled, "greedy": greedy}


def _sampled(model, ref, tok, tasks, spec: dict) -> list[dict]:
    """k samples per task with gold, log-ratio to `ref`, mean entropy and token ids."""
    from posttrain.eval.entropy import token_entropies
    from posttrain.generate import SamplingParams, sample_n
    from posttrain.world import check

    params = SamplingParams(max_new_tokens=spec["max_new_tokens"], temperature=1.0,
                            batch_size=spec.get("batch_size", 64), seed=spec["seed"])  # fmt: skip
    prompts = [tok.apply_chat_template(t.messages(), add_generation_prompt=True, tokenize=False)
               for t in tasks]  # fmt: skip
    groups = sample_n(model, tok, prompts, spec["k"], params)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    pairs = [(list(g.prompt_ids), list(g.token_ids)) for gs in groups for g in gs]
    pol = token_entropies(model, pairs, pad)  # (entropies, log-probs) per response, T = 1
    ref_lp = [lp for _, lp in token_entropies(ref, pairs, pad)]
    out, i = [], 0
    for task, gs in zip(tasks, groups, strict=True):
        samples = []
        for g in gs:
            ent, lp = pol[i]
            text = g.text.strip()
            # ids: the answer's tokens as the evaluate stage's diversity counts them
            ids = tok(text, add_special_tokens=False)["input_ids"]
            samples.append({"text": text, "ids": ids, "ended": bool(g.finished),
                            "gold": check(task, text).score,
                            "logratio": sum(lp) - sum(ref_lp[i]),
                            "entropy": sum(ent) / len(ent) if ent else None})  # fmt: skip
            i += 1
        out.append({"prompt_id": task.prompt_id, "family": task.family, "prompt": task.prompt,
                    "samples": samples})  # fmt: skip
    return out
