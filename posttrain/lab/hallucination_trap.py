"""hallucination_trap: fine-tuning on facts the model does not know teaches it to make facts up
(Gekhman et al. 2405.05904, "Does fine-tuning LLMs on new knowledge encourage hallucinations?").

Per world seed, on the toy world's knowledge questions ("Where does Brejor live?"), answered
with the entity's true attribute (also for unknown entities, whose facts no corpus text states):
- Held out: the world's eval questions (known entities, with `heldout_extra` more known facts
  no stage trains on: known accuracy; unknown entities: the hallucination rate, a confident
  answer where "I don't know." is right); every fact of an eval unknown entity stays out of
  training. A development split of `dev_size` other known
  facts chooses the early-stopping epoch.
- The probe (posttrain/data/probe.py, SliCK) sorts the candidate training examples (`pool` known
  and `pool` unknown facts) into HighlyKnown / MaybeKnown / WeaklyKnown / Unknown under the
  pretrained base; Known = the first three, as in the paper. Its agreement with the world's own
  known/unknown flag is reported.
- Arms: SFT sets of `n_examples` from the base model with a share of Unknown examples of 0, 25,
  50, 75, 100% (the rest Known; nested: each set's Unknown examples hold the smaller sets'),
  the same settings otherwise (the `halt_sft` template), plus the `relabel_share` set with the
  Unknown answers replaced by "I don't know.". Each arm checkpoints every epoch; every epoch's
  weights (and the base's as epoch 0) are measured: the per-example loss of the arm's training
  examples (mean per trained token), and greedy chat answers on the dev and eval questions,
  scored by the world's checker. Measurements are cached in <seed>/halt_eval/<arm>.json and
  the checkpoints then removed (a stage is re-run if they are needed again).

Criteria (the issue's): on the `fit_share` arm, the Unknown subset's mean loss falls below
`fit_loss` after >= 2x the epochs the Known subset's takes (linear between epochs; the ratio of
the seed-means); known accuracy at the end of training against the Unknown share: a line with a
negative slope (interval below 0) and R^2 >= 0.8 over the pooled points; at the early-stopping
epoch (best dev accuracy) the slope is at most half of that; relabelling lowers the
hallucination rate (interval below 0) and costs at most 0.05 known accuracy (against the same
set unrelabelled). Intervals: items resampled within each seed (held-out questions; training
examples for the fit), every figure recomputed from each resample.
"""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path

from pydantic import Field, PositiveFloat, field_validator, model_validator

from posttrain.data.probe import ABSTAIN, ProbeSettings
from posttrain.lab.base import CONFIG_DIR, Lab, write_outputs
from posttrain.settings import ConfigError, StrictModel

NAME = "hallucination_trap"
TITLE = "Unknown facts in SFT teach hallucination (Gekhman et al. 2405.05904)"
TEMPLATE, DATA_DIR, EVAL_DIR = "halt_sft", "halt_data", "halt_eval"


class Settings(StrictModel):
    """The config's `lab:` section."""

    shares: list[float] = Field(min_length=3, description="Unknown shares of the SFT sets.")
    n_examples: int = Field(ge=4, description="Examples in every SFT set (fixed).")
    dev_size: int = Field(ge=1, description="Known facts held out to pick the early stop.")
    heldout_extra: int = Field(
        0, ge=0, description="Known facts held out beside the world's eval ones (more items)."
    )
    pool: int | None = Field(
        None, ge=1, description="Candidates probed per world kind (known, unknown); null: all."
    )
    relabel_share: float = Field(description="The set whose Unknown answers are relabelled.")
    fit_share: float = Field(description="The set whose subsets' training loss measures fit.")
    fit_loss: PositiveFloat = Field(description="A subset is fitted below this mean loss.")
    probe: dict = Field(default_factory=dict, description="ProbeSettings but model and action.")
    fill: bool = Field(
        False,
        description="When the probe finds too few Known (Unknown) examples, take the rest from "
        "the world's known (unknown) facts it put in the other group (counted in figures); "
        "false: an error. For --quick, whose 3-step base knows nothing.",
    )
    max_new_tokens: int = Field(16, ge=1, description="Longest chat answer when measuring.")

    @field_validator("shares")
    @classmethod
    def _shares(cls, v: list[float]) -> list[float]:
        if sorted(set(v)) != v or not all(0 <= x <= 1 for x in v):
            raise ValueError(f"must be distinct, increasing and within [0, 1], got {v}")
        return v

    @field_validator("probe")
    @classmethod
    def _probe(cls, v: dict) -> dict:
        if {"model", "action", "relabel_text"} & set(v):
            raise ValueError("model, action and relabel_text are set by the experiment")
        ProbeSettings(model="pretrain", **v)
        return v

    @model_validator(mode="after")
    def _arms(self) -> Settings:
        if self.relabel_share not in self.shares or self.relabel_share == 0:
            raise ValueError(f"relabel_share {self.relabel_share} must be a share above 0")
        if self.fit_share not in self.shares or not 0 < self.fit_share < 1:
            raise ValueError(f"fit_share {self.fit_share} must be a share strictly within (0, 1)")
        return self


def arms(s: Settings) -> dict[str, dict]:
    """label -> {"share", "relabel", "stage"}: one per share, then the relabelled set."""
    out = {f"u{round(100 * u)}": {"share": u, "relabel": False} for u in s.shares}
    out[f"u{round(100 * s.relabel_share)}_relabel"] = {"share": s.relabel_share, "relabel": True}
    return {k: v | {"stage": f"{TEMPLATE}_{k}"} for k, v in out.items()}


# ---------------------------------------------------------------- data


def _fact(entity: dict, attribute: str, split: str, i: int) -> dict:
    """A knowledge task record (as the world writes them) about one fact, its true answer."""
    from posttrain.world.knowledge import ABSTAIN_REFERENCE
    from posttrain.world.lexicon import QUESTION_TEMPLATES

    gold = {"entity": entity["name"], "attribute": attribute, "known": entity["known"],
            "answer": entity["attributes"][attribute], "mentions": entity["mentions"]}  # fmt: skip
    ref = gold["answer"] if entity["known"] else ABSTAIN_REFERENCE
    return {"prompt_id": f"knowledge/{split}/{i:05d}", "family": "knowledge", "split": split,
            "prompt": QUESTION_TEMPLATES[attribute].format(n=entity["name"]), "reference": ref,
            "gold": gold}  # fmt: skip


def world_facts(seed_dir: Path, s: Settings, seed: int) -> dict[str, list[dict]]:
    """{"known": eval tasks about known entities and `heldout_extra` more
    known facts; "unknown": eval tasks about unknown entities; "dev": held-out known facts; "candidates": known then
    unknown facts to probe}, as task records (gold["answer"] the true attribute)."""
    from posttrain.io import read_jsonl
    from posttrain.world.lexicon import ATTRIBUTES

    world = seed_dir / "world"
    evals = [t for t in read_jsonl(world / "tasks_eval.jsonl") if t["family"] == "knowledge"]
    held = {(t["gold"]["entity"], t["gold"]["attribute"]) for t in evals if t["gold"]["known"]}
    held_people = {t["gold"]["entity"] for t in evals if not t["gold"]["known"]}
    facts = {True: [], False: []}
    for e in read_jsonl(world / "entities.jsonl"):
        for a in ATTRIBUTES:
            if (e["name"], a) not in held and e["name"] not in held_people:
                facts[e["known"]].append((e, a))
    rng = random.Random(f"{NAME}/{seed}")
    for kind in facts.values():
        rng.shuffle(kind)
    dev, extra = facts[True][: s.dev_size], facts[True][s.dev_size :][: s.heldout_extra]
    known, unknown = facts[True][s.dev_size + s.heldout_extra :], facts[False]
    if s.pool is not None:
        known, unknown = known[: s.pool], unknown[: s.pool]
    return {"known": [t for t in evals if t["gold"]["known"]]
                     + [_fact(e, a, "heldout", i) for i, (e, a) in enumerate(extra)],
            "unknown": [t for t in evals if not t["gold"]["known"]],
            "dev": [_fact(e, a, "dev", i) for i, (e, a) in enumerate(dev)],
            "candidates": [_fact(e, a, "train", i) for i, (e, a) in enumerate(known + unknown)]}  # fmt: skip


def example(task: dict, answer: str | None = None) -> dict:
    """The chat example of a fact: its question, its true answer (or `answer`)."""
    g = task["gold"]
    return {"id": f"{g['entity']}/{g['attribute']}",
            "messages": [{"role": "user", "content": task["prompt"]},
                         {"role": "assistant", "content": answer or g["answer"]}]}  # fmt: skip


def _cached(path: Path, key: dict) -> dict | None:
    if path.is_file():
        found = json.loads(path.read_text())
        if found.get("key") == key:
            return found
    return None


def probed(lab: Lab, seed_dir: Path, cands: list[dict], s: Settings, device) -> list[dict]:
    """The probe's record per candidate under the seed's pretrained model (cached)."""
    from posttrain.data.probe import probe_with
    from posttrain.io import atomic_write_json, hash_path

    base = seed_dir / "pretrain" / "model"
    facts = [[c["prompt"], c["gold"]["answer"]] for c in cands]
    key = {"probe": s.probe, "model": hash_path(base), "candidates": facts}
    path = seed_dir / DATA_DIR / "probe.json"
    if (found := _cached(path, key)) is not None:
        return found["records"]
    lab.logger.info(f"{NAME}: probing {len(cands)} candidate examples ({base})")
    records = probe_with(base, [example(c) for c in cands], ProbeSettings(model=str(base),
                         **s.probe), device)  # fmt: skip
    atomic_write_json(path, {"key": key, "records": records})
    return records


def split_pools(cands: list[dict], records: list[dict], s: Settings, seed: int) -> dict:
    """{"known", "unknown": the candidates by the probe (seeded order), "filled": how many
    were moved across because one side was short (only with s.fill)}."""
    pools = {"known": [], "unknown": []}
    for c, r in zip(cands, records, strict=True):
        pools["unknown" if r["category"] == "Unknown" else "known"].append(c)
    need = {"known": s.n_examples - round(s.n_examples * s.shares[0]),
            "unknown": round(s.n_examples * s.shares[-1])}  # fmt: skip
    filled = {"known": 0, "unknown": 0}
    for side, other, flag in (("known", "unknown", True), ("unknown", "known", False)):
        short = need[side] - len(pools[side])
        if short > 0 and s.fill:
            moved = [c for c in pools[other] if c["gold"]["known"] is flag][:short]
            pools[other] = [c for c in pools[other] if c not in moved]
            pools[side] += moved
            filled[side] = len(moved)
        if need[side] > len(pools[side]):
            raise ValueError(f"{NAME}: seed {seed}: the probe found {len(pools[side])} {side} "
                             f"examples, the sets need {need[side]} (lower lab.n_examples, or "
                             "raise lab.pool)")  # fmt: skip
    rng = random.Random(f"{NAME}/pools/{seed}")
    for side in ("known", "unknown"):
        rng.shuffle(pools[side])
    return pools | {"filled": filled}


def arm_examples(pools: dict, n: int, share: float, relabel: bool) -> list[dict]:
    """n examples: the first round(n * share) Unknown ones (answer "I don't know." when
    relabelled), then Known ones; ids prefixed "unknown:" / "known:"."""
    n_u = round(n * share)
    out = [example(t, ABSTAIN if relabel else None) for t in pools["unknown"][:n_u]]
    out = [e | {"id": "unknown:" + e["id"]} for e in out]
    return out + [
        example(t) | {"id": "known:" + example(t)["id"]} for t in pools["known"][: n - n_u]
    ]


def _write(path: Path, records: list[dict]) -> Path:
    from posttrain.io import atomic_write_text

    text = "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records)
    if not (path.is_file() and path.read_text() == text):
        atomic_write_text(path, text)
    return path


# ---------------------------------------------------------------- stages


def epoch_steps(template: dict, n: int) -> tuple[int, int]:
    """(optimiser steps per epoch, epochs) of the arms' SFT: unpacked batches of batch_size,
    one optimiser step each (per_epoch as data.sft.SFTBatches counts them)."""
    from posttrain.data.collate import length_grouped

    where = f"{CONFIG_DIR / f'{NAME}.yaml'}: {TEMPLATE}"
    train = template.get("train") or {}
    epochs = template.get("epochs")
    checks = [("packing", template.get("packing") is False, "must be false (a fixed number "
               "of batches per epoch)"), ("val_fraction", template.get("val_fraction") == 0,
               "must be 0 (the lab holds out its own dev split)"),
              ("epochs", isinstance(epochs, int) and epochs >= 1, "must be a whole number >= 1"),
              ("train.grad_accum", train.get("grad_accum", 1) == 1, "must be 1")]  # fmt: skip
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"{where}.{key} {why}")
    return len(length_grouped([1] * n, template.get("batch_size", 16), 0)), epochs


def stage_sections(template: dict, labels: dict, paths: dict, per_epoch: int, epochs: int):
    out = {}
    for label, arm in labels.items():
        sec = copy.deepcopy(template)
        sec["data"] = dict(sec.get("data") or {}) | {"path": str(paths[label].resolve())}
        sec["train"] = dict(sec.get("train") or {}) | {"checkpoint_every": per_epoch,
                                                       "keep_checkpoints": epochs}  # fmt: skip
        out[arm["stage"]] = sec
    return out


# ---------------------------------------------------------------- measuring each epoch


def example_losses(model, tok, examples: list[dict], batch_size: int = 64) -> list[float]:
    """Mean loss per trained token of each example, as the SFT stage trains it (chat template,
    assistant tokens)."""
    import torch
    import torch.nn.functional as F

    from posttrain.data.collate import pad_batch
    from posttrain.data.sft import tokenize_examples
    from posttrain.models.forward import target_logits
    from posttrain.ops.lm import IGNORE_INDEX

    tokd, _ = tokenize_examples(tok, examples, 10_000, "truncate", "all_assistant")
    if len(tokd) != len(examples):
        raise ValueError(f"{NAME}: {len(examples) - len(tokd)} examples have no trained token")
    device, out = next(model.parameters()).device, []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(tokd), batch_size):
            b = pad_batch(tokd[i : i + batch_size], tok.pad_token_id or 0).to(device)
            logits, targets = target_logits(model, b.input_ids, b.labels, b.attention_mask,
                                            b.position_ids)  # fmt: skip
            nll = F.cross_entropy(logits.float(), targets, reduction="none")  # (N,)
            counts = (b.labels != IGNORE_INDEX).sum(-1).tolist()  # (B,) row-major as nll
            out += [float(x.mean()) for x in torch.split(nll, counts)]
    return out


def measure(model, tok, examples: list[dict], tasks: dict, s: Settings, seed: int) -> dict:
    """One set of weights: per-example training loss; per question of dev / known / unknown
    the checker's score and (unknown) whether it hallucinated."""
    from posttrain.stages import evaluate as ev
    from posttrain.world import Task

    flat = [Task.from_dict(t) for part in ("dev", "known", "unknown") for t in tasks[part]]
    cfg = ev.Config(max_new_tokens=s.max_new_tokens, diversity={"n_prompts": 0})
    _, recs = ev.evaluate_model(model, tok, flat, None, "chat", cfg, seed)
    out, i = {"loss": example_losses(model, tok, examples)}, 0
    for part in ("dev", "known", "unknown"):
        got = recs[i : i + len(tasks[part])]
        out[part] = [r["score"] for r in got]
        i += len(got)
    out["hallucinated"] = [float(r["components"]["hallucinated"]) for r in got]
    return out


def evaluate_arm(lab: Lab, seed_dir: Path, stage: str, data: Path, tasks: dict, s: Settings,
                 per_epoch: int, epochs: int, device) -> dict | None:  # fmt: skip
    """{"epochs": [measure()] for epoch 0 (the base) ... epochs}, cached; None when the
    checkpoints are gone and the cache does not match (the stage must run again)."""
    import torch

    from posttrain.io import atomic_write_json, hash_path, read_jsonl
    from posttrain.models.load import load_model
    from posttrain.models.tokenizer import load_tokenizer
    from posttrain.train.checkpoint import checkpoint_path

    key = {"max_new_tokens": s.max_new_tokens, "model": hash_path(seed_dir / stage / "model"),
           "data": hash_path(data), "tasks": [t["prompt"] for p in tasks.values() for t in p],
           "base": hash_path(seed_dir / "pretrain" / "model")}  # fmt: skip
    path = seed_dir / EVAL_DIR / f"{stage}.json"
    if (found := _cached(path, key)) is not None:
        return found
    ckpts = [checkpoint_path(seed_dir / stage / "checkpoints", e * per_epoch)
             for e in range(1, epochs + 1)]  # fmt: skip
    if not all(p.is_file() for p in ckpts):
        return None
    lab.logger.info(f"{NAME}: measuring {stage}, epochs 0-{epochs}")
    examples = read_jsonl(data)
    model = load_model(seed_dir / "pretrain" / "model", device)
    tok = load_tokenizer(seed_dir / "pretrain" / "model")
    rows = [measure(model, tok, examples, tasks, s, 0)]
    for p in ckpts:
        model.load_state_dict(torch.load(p, map_location=device, weights_only=False)["model"])
        rows.append(measure(model, tok, examples, tasks, s, 0))
    found = {"key": key, "unknown": [e["id"].startswith("unknown:") for e in examples],
             "epochs": rows}  # fmt: skip
    atomic_write_json(path, found)
    for p in ckpts:  # measured: ~11 MB each, no longer needed
        p.unlink()
    return found


def run_seed(lab: Lab, seed: int, raw: dict, template: dict, s: Settings, device) -> dict:
    """Every measurement of one world seed: {"probe": [...], "world_known": [...], "filled",
    "arms": {label: evaluate_arm(...)}}."""
    from posttrain.config import build_pipeline
    from posttrain.pipeline import run_pipeline

    seed_dir = lab.run_stages(seed, raw, [])  # world, pretrain, sft
    facts = world_facts(seed_dir, s, seed)
    records = probed(lab, seed_dir, facts["candidates"], s, device)
    pools = split_pools(facts["candidates"], records, s, seed)
    labels = arms(s)
    paths = {lb: _write(seed_dir / DATA_DIR / f"{lb}.jsonl",
                        arm_examples(pools, s.n_examples, a["share"], a["relabel"]))
             for lb, a in labels.items()}  # fmt: skip
    per_epoch, epochs = epoch_steps(template, s.n_examples)
    sections = stage_sections(template, labels, paths, per_epoch, epochs)
    tasks = {k: facts[k] for k in ("dev", "known", "unknown")}
    lab.run_stages(seed, raw | sections, list(sections))
    out = {}
    for label, arm in labels.items():
        args = (seed_dir, arm["stage"], paths[label], tasks, s, per_epoch, epochs, device)
        if (got := evaluate_arm(lab, *args)) is None:  # checkpoints pruned: train it again
            cfg = {k: v for k, v in (raw | sections).items() if k != "lab"}
            cfg |= {"name": f"lab-{seed}", "seed": seed, "out": str(lab.seed_dir(seed)),
                    "world": dict(cfg.get("world") or {}) | {"seed": seed},
                    "stages": ["world", "pretrain", arm["stage"]]}  # fmt: skip
            run_pipeline(build_pipeline(cfg, f"lab seed {seed}"), force={arm["stage"]},
                         logger=lab.logger, report=False)  # fmt: skip
            got = evaluate_arm(lab, *args)
        out[label] = got
    return {"probe": [r["category"] for r in records],
            "world_known": [c["gold"]["known"] for c in facts["candidates"]],
            "filled": pools["filled"], "arms": out}  # fmt: skip


def run(lab: Lab) -> dict:
    started = time.perf_counter()
    from posttrain.lab import hallucination_trap_stats as hs
    from posttrain.models.load import resolve_device

    raw, s, template = lab.settings(
        NAME, Settings, TEMPLATE, "the template of every arm's sft stage"
    )
    device = resolve_device(raw.get("device", "auto"))
    seeds = {seed: run_seed(lab, seed, raw, template, s, device) for seed in lab.seeds}
    figures = hs.figures(seeds, arms(s), s)
    criteria = hs.criteria(figures, s)
    plots = hs.plot(lab.out / NAME / "plots", figures, s)
    return write_outputs(lab, NAME, TITLE, figures, criteria, plots, body=hs.body(figures, s),
                         started=started, intervals="95% bootstrap over held-out questions (over "
                         "training examples for the fit) within each seed")  # fmt: skip
