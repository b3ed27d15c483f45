"""The `posttrain` command.

posttrain run CONFIG [KEY=VALUE ...] [--force STAGE] [--resume]
posttrain config show CONFIG [KEY=VALUE ...]
posttrain data inspect|curate ...
posttrain annotate serve|add-annotator|add-admin|export --run RUN ...
"""

from __future__ import annotations

import argparse
import sys

import yaml


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="posttrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a pipeline")
    run.add_argument("config", help="pipeline YAML file")
    run.add_argument(
        "overrides",
        nargs="*",
        help="dotted KEY=VALUE overrides, e.g. pretrain.train.lr=3e-4 out=runs/x",
    )
    run.add_argument(
        "--force", action="append", default=[], metavar="STAGE", help="re-run STAGE even if cached"
    )
    run.add_argument(
        "--resume", action="store_true", help="resume an interrupted stage from its last checkpoint"
    )
    cfg = sub.add_parser("config", help="inspect a config")
    cfg_sub = cfg.add_subparsers(dest="action", required=True)
    show = cfg_sub.add_parser("show", help="print the resolved config with defaults")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*")
    for kind in ("pretrain", "sft", "sample", "rank", "reward", "dpo", "kto", "evaluate"):
        one = sub.add_parser(
            kind, help=f"run the {kind} stage alone from a config of its own settings"
        )
        one.add_argument("--config", required=True, help=f"YAML with the {kind} stage's settings")
        one.add_argument(
            "overrides", nargs="*", help="dotted KEY=VALUE overrides of those settings"
        )
        one.add_argument("--out", help="run directory (default runs/<config file stem>)")
        one.add_argument("--resume", action="store_true")
    data = sub.add_parser("data", help="look at data as a stage sees it")
    data_sub = data.add_subparsers(dest="action", required=True)
    inspect = data_sub.add_parser("inspect", help="show examples token by token with the loss mask")
    inspect.add_argument("--tokenizer", required=True, help="tokenizer (or model) directory")
    inspect.add_argument("--data", required=True, help="chat data file")
    inspect.add_argument("--format", default="auto")
    inspect.add_argument("--n", type=int, default=3, help="examples to show")
    inspect.add_argument(
        "--train-on", default="all_assistant", choices=["all_assistant", "last_assistant"]
    )
    inspect.add_argument(
        "--json", action="store_true", help="one JSON line per example: input_ids, loss_mask"
    )
    curate = data_sub.add_parser(
        "curate", help="filter, decontaminate and deduplicate chat data into a messages JSONL"
    )
    curate.add_argument("--data", required=True, help="chat data file")
    curate.add_argument("--out", required=True, help="output messages JSONL")
    curate.add_argument(
        "--format",
        default="auto",
        choices=["auto", "messages", "alpaca", "sharegpt", "oasst", "hh"],
    )
    curate.add_argument("--dedup", default="exact", choices=["none", "exact", "near"])
    curate.add_argument("--near-threshold", type=float, default=0.8, help="MinHash Jaccard")
    curate.add_argument(
        "--decontaminate",
        nargs="+",
        default=[],
        metavar="PATH_OR_NAME",
        help="eval files or benchmark names (e.g. gsm8k) whose prompts must not be trained on",
    )
    curate.add_argument("--data-dir", default="../shared/data", help="where named benchmarks are")
    curate.add_argument("--min-response-words", type=int, default=1)
    curate.add_argument("--max-response-words", type=int, default=None)
    curate.add_argument(
        "--drop-pattern",
        nargs="+",
        default=[],
        metavar="REGEX",
        help="drop examples whose assistant text matches (case-insensitive)",
    )
    from posttrain.annotate.cli import add_parser as add_annotate_parser

    add_annotate_parser(sub)
    from posttrain.lab.cli import add_parser as add_lab_parser

    add_lab_parser(sub)
    return p


def _single_stage(args):
    """A one-stage pipeline from a file holding just that stage's settings."""
    from pathlib import Path

    from posttrain.config import ConfigError, apply_overrides, build_pipeline

    path = Path(args.config)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    section = yaml.safe_load(path.read_text()) or {}
    if not isinstance(section, dict):
        raise ConfigError(
            f"{path}: the file must hold the {args.command} stage's settings as a mapping"
        )
    section = apply_overrides(section, args.overrides)
    raw = {
        "name": path.stem,
        "out": args.out or f"runs/{path.stem}",
        "stages": [args.command],
        args.command: section,
    }
    source = str(path) + (f" (with overrides {' '.join(args.overrides)})" if args.overrides else "")
    return build_pipeline(raw, source)


def _curate(args) -> int:
    import json

    from posttrain.data.curate import CurateSettings, curate_file

    settings = CurateSettings(
        dedup=args.dedup,
        near_threshold=args.near_threshold,
        decontaminate=args.decontaminate,
        data_dir=args.data_dir,
        min_response_words=args.min_response_words,
        max_response_words=args.max_response_words,
        drop_patterns=args.drop_pattern,
    )
    print(json.dumps(curate_file(args.data, args.out, args.format, settings)))
    return 0


def main(argv: list[str] | None = None) -> int:
    import os

    # Our own progress line covers long work; Hugging Face's per-load bars only clutter the log.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from posttrain.config import ConfigError, load_pipeline

    args = _parser().parse_args(argv)
    try:
        if args.command == "annotate":
            from posttrain.annotate.cli import main as annotate_main

            return annotate_main(args)
        if args.command == "lab":
            from posttrain.lab.cli import main as lab_main

            return lab_main(args)
        if args.command == "data" and args.action == "curate":
            return _curate(args)
        if args.command == "data":
            from posttrain.data.inspect import inspect

            inspect(args.tokenizer, args.data, args.format, args.n, args.train_on, args.json)
            return 0
        if args.command in ("run", "config"):
            pipeline = load_pipeline(args.config, args.overrides)
        else:
            pipeline = _single_stage(args)
        if args.command == "config":
            print(yaml.safe_dump(pipeline.resolved(), sort_keys=False), end="")
            return 0
        from posttrain.pipeline import run_pipeline
        from posttrain.train import dist
        from posttrain.train.loop import TrainingDiverged

        finished = False
        try:
            run_pipeline(pipeline, force=set(getattr(args, "force", [])), resume=args.resume)
            finished = True
        except TrainingDiverged as e:
            print(f"posttrain: training diverged: {e}", file=sys.stderr)
            return 3
        finally:
            # A barrier only when this rank finished (none on errors: no hang), then free the group.
            freed = dist.close(ok=finished)
        if not freed:  # the group outlives close: end before the interpreter shuts down
            dist.exit_now(0)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"posttrain: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
