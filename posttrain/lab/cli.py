"""`posttrain lab list` and `posttrain lab run NAME|all [--seeds 0,1,2] [--quick] [--out DIR]
[--runs DIR] [--jobs N]`."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def add_parser(sub) -> None:
    lab = sub.add_parser("lab", help="the lecture's claims as experiments with computed verdicts")
    lab_sub = lab.add_subparsers(dest="action", required=True)
    lab_sub.add_parser("list", help="list the experiments")
    run = lab_sub.add_parser("run", help="run an experiment (or all) and write its verdict table")
    run.add_argument("name", help="experiment name, or 'all'")
    run.add_argument("--seeds", default="0,1,2", help="comma-separated world seeds (default 0,1,2)")
    run.add_argument("--quick", action="store_true", help="toy sizes: the machinery, not verdicts")
    run.add_argument("--out", default=None, help="output folder (default runs/lab)")
    run.add_argument(
        "--runs",
        default=None,
        help="folder of the per-seed runs whose stages are cached (default --out)",
    )
    run.add_argument("--jobs", type=int, default=1,
                     help="run up to this many seeds at once, each in a process of its own "
                          "(one thread each), then pool them (default 1: one process)")  # fmt: skip
    diag = lab_sub.add_parser(
        "diagnose",
        help="per family: greedy vs sampled gold and pass@k (where RL can help), the reward "
        "model's gold agreement, whether samples reveal known entities",
    )
    diag.add_argument("run_dir", help="a toy-world run directory (e.g. runs/toy, runs/lab/seeds/0)")
    diag.add_argument("--model", default="sft", help="policy: a stage of run_dir or a model dir")
    diag.add_argument("--reward", default="reward", help="reward-model stage ('none': skip)")
    diag.add_argument("--k", type=int, default=8, help="samples per prompt (default 8)")
    diag.add_argument("--temperature", type=float, default=1.2, help="sampling temperature")
    diag.add_argument("--per-family", type=int, default=40, help="prompts per (sub)family")
    diag.add_argument("--split", default="eval", choices=["eval", "rl", "train"])
    diag.add_argument("--json", default=None, help="also write the figures to this JSON file")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: expected distinct non-negative integers, got {text!r}")
    return seeds


def main(args) -> int:
    from posttrain.lab import EXPERIMENTS, experiment
    from posttrain.lab.base import Lab

    if args.action == "diagnose":
        return _diagnose(args)
    if args.action == "list":
        for name in EXPERIMENTS:
            mod = experiment(name)
            print(f"{name:24s} {mod.TITLE}")
        return 0
    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    mods = [experiment(n) for n in names]  # unknown names fail before anything runs
    if args.jobs < 1:
        raise ValueError(f"--jobs: expected a positive integer, got {args.jobs}")
    out = Path(args.out or "runs/lab")
    runs = Path(args.runs) if args.runs else None
    lab = Lab(out, parse_seeds(args.seeds), args.quick, runs=runs)
    if args.jobs > 1 and len(lab.seeds) > 1:
        from posttrain.lab.jobs import run_seeds

        bad = run_seeds(args.name, lab.seeds, out, runs or out, lab.quick, args.jobs, lab.logger)
        if bad:
            print(f"lab: seed(s) {', '.join(map(str, bad))} failed; see {out / 'jobs'}/seed-<seed>"
                  ".log; the pooled pass did not run", file=sys.stderr)  # fmt: skip
            return 1
        lab.logger.info(f"lab: every seed done; pooling seeds {lab.seeds} from the cache")
    failed = []
    for name, mod in zip(names, mods, strict=True):
        t0 = time.perf_counter()
        lab.logger.info(f"lab {name}: seeds {lab.seeds}{' (quick)' if lab.quick else ''}")
        result = mod.run(lab)
        lab.logger.info(
            f"lab {name}: {result['verdict']} in {time.perf_counter() - t0:.0f}s; "
            f"report: {lab.out / name / 'report.md'}"
        )
        if result["verdict"] != "PASS":
            failed.append(name)
    print(f"lab: {len(names) - len(failed)} of {len(names)} experiments PASS"
          + (f"; FAIL: {', '.join(failed)}" if failed else ""), file=sys.stderr)  # fmt: skip
    return 0


def _diagnose(args) -> int:
    from posttrain.io import atomic_write_json
    from posttrain.lab.diagnose import diagnose, table

    run_dir = Path(args.run_dir)
    if not (run_dir / "world" / f"tasks_{args.split}.jsonl").is_file():
        raise ValueError(f"{run_dir}: no world/tasks_{args.split}.jsonl (not a toy-world run?)")
    if args.k < 2 or args.per_family < 1 or args.temperature <= 0:
        raise ValueError("diagnose: --k must be >= 2, --per-family >= 1, --temperature > 0")
    reward = None if args.reward == "none" else args.reward
    if reward and not (run_dir / reward / "model").is_dir():
        raise ValueError(f"{run_dir / reward}: no reward model (use --reward none to skip)")
    result = diagnose(run_dir, args.model, reward, args.k, args.temperature, args.per_family,
                      split=args.split)  # fmt: skip
    print(table(result))
    if args.json:
        atomic_write_json(Path(args.json), result)
    return 0
