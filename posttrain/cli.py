"""The `posttrain` command.

posttrain run CONFIG [KEY=VALUE ...] [--force STAGE|all] [--resume]
posttrain STAGE --config FILE [KEY=VALUE ...] [--out DIR] [--force STAGE|all] [--resume]
    one stage alone from a file of its own settings; STAGE is any stage type:
    world pretrain sft sample rank reward dpo kto best_of_n ppo grpo rloo online_dpo evaluate
posttrain config show CONFIG [KEY=VALUE ...] [--stage STAGE]
posttrain data inspect|curate|probe|lc-winrate|generate ...
posttrain annotate serve|add-annotator|add-admin|export --run RUN ...
posttrain lab list|run|diagnose ...
posttrain serve MODEL_DIR [--host H] [--port P] [--name N] [--device D] [--dtype T] ...
"""

from __future__ import annotations

import argparse
import sys

import yaml

# One line of `--help` per stage type; every type of posttrain.stages.STAGES has a subcommand
# (tests/test_cli.py checks the two agree, so a new stage without one fails).
STAGE_HELP = {
    "world": "build the toy world: corpus, prompts with gold, tokenizer",
    "pretrain": "pre-train a base model (a toy preset, or continue your HF model on your text)",
    "sft": "supervised fine-tuning on chat data (full or LoRA; packing, replay, distillation)",
    "sample": "sample n candidate responses per prompt from a model (candidates.jsonl)",
    "rank": "rank candidates (simulated annotators or human labels) into preference pairs",
    "reward": "fit a reward model to preferences (Bradley-Terry or Plackett-Luce)",
    "dpo": "DPO and its relatives (IPO, SLiC, SimPO, ORPO) on preference pairs",
    "kto": "KTO on unpaired feedback: single replies judged good or bad",
    "best_of_n": "the best of n samples per prompt under a reward model (rejection sampling)",
    "ppo": "PPO with a KL penalty, on a reward model, verifier or reward function",
    "grpo": "GRPO: group-normalised advantages over k samples per prompt",
    "rloo": "RLOO: a leave-one-out baseline over k samples per prompt",
    "online_dpo": "online DPO: the best and worst of the policy's own samples as pairs",
    "self_instruct": "a teacher model writes SFT data from seed tasks (Self-Instruct)",
    "evaluate": "evaluate models on toy-world prompts and public benchmarks (report card)",
}

FORCE_HELP = "re-run STAGE even if cached (repeatable; 'all': every stage)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="posttrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run a pipeline")
    run.add_argument("config", help="pipeline YAML file")
    run.add_argument(
        "overrides",
        nargs="*",
        help="dotted KEY=VALUE overrides, e.g. pretrain.train.lr=3e-4 out=runs/x",
    )
    run.add_argument("--force", action="append", default=[], metavar="STAGE", help=FORCE_HELP)
    run.add_argument(
        "--resume", action="store_true", help="resume an interrupted stage from its last checkpoint"
    )
    cfg = sub.add_parser("config", help="inspect a config")
    cfg_sub = cfg.add_subparsers(dest="action", required=True)
    show = cfg_sub.add_parser(
        "show", help="print the resolved config with defaults (a pipeline, or one stage's file)"
    )
    show.add_argument("config", nargs="?", help="pipeline YAML, or a file of one stage's settings")
    show.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides")
    show.add_argument(
        "--stage",
        metavar="STAGE",
        help="only this stage: a pipeline file's section, or a file of this stage type's "
        "settings alone (as `posttrain STAGE --config` takes); without a file, its defaults",
    )
    for kind, line in STAGE_HELP.items():
        one = sub.add_parser(kind, help=line, description=f"{line}; runs the {kind} stage alone")
        one.add_argument("--config", required=True, help=f"YAML with the {kind} stage's settings")
        one.add_argument(
            "overrides", nargs="*", help="dotted KEY=VALUE overrides of those settings"
        )
        one.add_argument("--out", help="run directory (default runs/<config file stem>)")
        one.add_argument("--force", action="append", default=[], metavar="STAGE", help=FORCE_HELP)
        one.add_argument(
            "--resume", action="store_true", help="resume from the stage's last checkpoint"
        )
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
    from posttrain.data.probe import add_parser as add_probe_parser

    add_probe_parser(data_sub)
    from posttrain.eval.lc_winrate import add_parser as add_lc_winrate_parser

    add_lc_winrate_parser(data_sub)
    from posttrain.synth.cli import add_parser as add_generate_parser

    add_generate_parser(data_sub)
    from posttrain.annotate.cli import add_parser as add_annotate_parser

    add_annotate_parser(sub)
    from posttrain.lab.cli import add_parser as add_lab_parser

    add_lab_parser(sub)
    from posttrain.serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    return p


def _single_stage(args):
    """A one-stage pipeline from a file holding just that stage's settings."""
    from posttrain.config import load_stage_file

    return load_stage_file(args.config, args.command, args.overrides, args.out)


def _show(args) -> int:
    """`config show`: a pipeline file resolved, or one stage's settings (a stage-alone file,
    or the stage's defaults)."""
    from pathlib import Path

    from posttrain.config import (
        ConfigError,
        apply_overrides,
        load_pipeline,
        load_stage_file,
        read_config,
        stage_pipeline,
    )

    kind = args.stage
    if args.config is None and kind is None:
        raise ConfigError("config show: name a config file, or --stage STAGE for its defaults")
    raw = read_config(Path(args.config)) if args.config else {}
    if isinstance(raw, dict) and "stages" in raw:  # a pipeline file: all of it, or one section
        resolved = load_pipeline(args.config, args.overrides).resolved()
        if kind is None:
            print(yaml.safe_dump(resolved, sort_keys=False), end="")
            return 0
        if not isinstance(resolved.get(kind), dict):
            raise ConfigError(f"{args.config}: no stage section {kind!r}")
        return _show_stage(resolved[kind], kind)
    kind = kind or _guess_stage(args.config)
    if kind not in STAGE_HELP:
        raise ConfigError(f"--stage {kind}: not a stage type; known: {sorted(STAGE_HELP)}")
    if args.config is None:
        section = apply_overrides({}, args.overrides)
        pipeline = stage_pipeline(section, kind, f"{kind} defaults", kind)
    else:
        pipeline = load_stage_file(args.config, kind, args.overrides)
    return _show_stage(pipeline.resolved()[kind], kind)


def _show_stage(section: dict, kind: str) -> int:
    print(f"# the {kind} stage's settings, every default filled in")
    print(yaml.safe_dump(section, sort_keys=False), end="")
    return 0


def _guess_stage(path: str) -> str:
    """The stage a file without `stages` holds settings of, when only one stage type fits."""
    from posttrain.config import ConfigError, stage_kinds_of

    fits = stage_kinds_of(path)
    if len(fits) == 1:
        return fits[0]
    which = f"it fits {fits}" if fits else "its keys fit no stage type as they are"
    raise ConfigError(
        f"{path}: no 'stages' list, so not a pipeline file; if it holds one stage's settings (as "
        f"`posttrain sft --config {path}` takes), name the stage: posttrain config show {path} "
        f"--stage STAGE ({which})"
    )


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
        if args.command == "serve":
            from posttrain.serve.cli import main as serve_main

            return serve_main(args)
        if args.command == "data" and args.action == "generate":
            from posttrain.synth.cli import main as generate_main

            return generate_main(args)
        if args.command == "data" and args.action == "curate":
            return _curate(args)
        if args.command == "data" and args.action == "probe":
            from posttrain.data.probe import main as probe_main

            return probe_main(args)
        if args.command == "data" and args.action == "lc-winrate":
            from posttrain.eval.lc_winrate import main as lc_winrate_main

            return lc_winrate_main(args)
        if args.command == "data":
            from posttrain.data.inspect import inspect

            inspect(args.tokenizer, args.data, args.format, args.n, args.train_on, args.json)
            return 0
        if args.command == "config":
            return _show(args)
        if args.command == "run":
            pipeline = load_pipeline(args.config, args.overrides)
        else:
            pipeline = _single_stage(args)
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
