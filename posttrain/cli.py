"""The `posttrain` command.

posttrain run CONFIG [KEY=VALUE ...] [--force STAGE] [--resume]
posttrain config show CONFIG [KEY=VALUE ...]
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
    return p


def main(argv: list[str] | None = None) -> int:
    from posttrain.config import ConfigError, load_pipeline

    args = _parser().parse_args(argv)
    try:
        pipeline = load_pipeline(args.config, args.overrides)
        if args.command == "config":
            print(yaml.safe_dump(pipeline.resolved(), sort_keys=False), end="")
            return 0
        from posttrain.pipeline import run_pipeline
        from posttrain.train.loop import TrainingDiverged

        try:
            run_pipeline(pipeline, force=set(args.force), resume=args.resume)
        except TrainingDiverged as e:
            print(f"posttrain: training diverged: {e}", file=sys.stderr)
            return 3
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"posttrain: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
