"""Run a pipeline: each stage in order, cached by (resolved config, input hashes), then the report.

A stage's `config.yaml` also records the posttrain version and a fingerprint of the code the
stage ran (`code_fingerprint`), outside the cache key: a cached stage whose code has changed
since is still reused (the lab shares cached stages across experiments while the code changes
all day), with a warning that names it and how to recompute it (`--force STAGE`, `--force all`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import time
from pathlib import Path

import yaml

from posttrain import runlock
from posttrain.config import Pipeline, StageSpec
from posttrain.io import atomic_write_json, atomic_write_yaml, clean_stale_temps, hash_path
from posttrain.log import Logger, check_wandb, wandb_run
from posttrain.models.load import resolve_device
from posttrain.stages.base import StageContext, StageResult
from posttrain.train import dist

FORMAT_VERSION = 1
PACKAGE = Path(__file__).resolve().parent
# The code every stage may run besides its own module (and the stage modules that one imports):
# the shared machinery below the stages (DESIGN.md's layers) and the base modules they use.
# Not the entry points (cli, config, pipeline, report), the lab, the server or the annotation
# app: a stage never runs them, and an edit there must not flag every cached stage.
SHARED_CODE = ("ops", "train", "generate", "eval", "data", "world", "models", "rl",
               "settings.py", "io.py", "log.py", "stages/base.py")  # fmt: skip


def code_fingerprint(kind: str) -> str:
    """sha256 over the source files a stage of this kind runs: its module, the stage modules it
    imports (e.g. best_of_n: sample; dpo: _prefs) and SHARED_CODE. Recorded with a stage's
    result; not part of the cache key (see the module docstring)."""
    import inspect

    from posttrain.stages import STAGES

    return _hash_files(tuple(_stage_files(Path(inspect.getfile(STAGES[kind].run)))))


def _stage_files(module_file: Path) -> list[Path]:
    """The stage module and, transitively, the modules of posttrain/stages it imports."""
    found, todo = [], [module_file]
    while todo:
        f = todo.pop()
        if f in found or not f.is_file():
            continue
        found.append(f)
        for a, b in re.findall(r"posttrain\.stages(?:\.(\w+)| import ([\w ,]+))", f.read_text()):
            todo += [
                PACKAGE / "stages" / f"{n.strip()}.py" for n in (a or b).split(",") if n.strip()
            ]
    shared = [PACKAGE / part for part in SHARED_CODE]
    files = [
        f for part in shared for f in (sorted(part.rglob("*.py")) if part.is_dir() else [part])
    ]
    return sorted(set(found) | set(files))


@functools.cache
def _hash_files(files: tuple[Path, ...]) -> str:
    """Once per process: the code that runs is the code imported at start, edits after it aside."""
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(PACKAGE)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def code_record(kind: str) -> dict:
    from posttrain import __version__

    return {"posttrain": __version__, "fingerprint": code_fingerprint(kind)}


def _hub_name_hint(spec: StageSpec, key: str, path: Path) -> None:
    """A missing input named like "org/name" is taken for a Hub name: say that nothing is
    downloaded and how to save it locally."""
    from posttrain.data.tables import check_data_path, looks_like_hub_name

    if not looks_like_hub_name(path):
        return
    where = f"stage '{spec.name}': input '{key}'"
    if "model" in key or key in ("teacher", "tokenizer"):
        raise FileNotFoundError(
            f"{where}: {path} is not a local directory and reads as a Hugging Face Hub model "
            "name: posttrain downloads nothing. Save it once where the hub is reachable "
            f"(AutoModelForCausalLM.from_pretrained('{path}').save_pretrained(DIR), and its "
            "tokenizer likewise) and give DIR"
        )
    check_data_path(path, where)


def fingerprint(spec: StageSpec, ctx: StageContext, input_paths: dict[str, Path]) -> dict:
    """What a stage's output depends on: its config, the world and seed, and its inputs' hashes."""
    missing = {k: p for k, p in input_paths.items() if not Path(p).exists()}
    if missing:
        k, p = next(iter(missing.items()))
        _hub_name_hint(spec, k, p)
        raise FileNotFoundError(f"stage '{spec.name}': input '{k}' not found at {_where(p, ctx)}")
    return {
        "format": FORMAT_VERSION,
        "stage": spec.name,
        "kind": spec.kind,
        "seed": ctx.pipeline.config.seed,
        "world": ctx.pipeline.world_config().model_dump(mode="json"),
        "config": _run_relative(spec.config.model_dump(mode="json"), ctx.run_dir),
        "inputs": {
            k: {"path": ctx.relative(p), "hash": hash_path(p)}
            for k, p in sorted(input_paths.items())
        },
    }


def _run_relative(value, run_dir: Path):
    """A config with every absolute path inside the run directory written as `$RUN/<relative>`,
    so that a run directory moved or copied elsewhere keeps its cache (the files' contents are
    in the key through the inputs' hashes)."""
    if isinstance(value, dict):
        return {k: _run_relative(v, run_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_run_relative(v, run_dir) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        try:
            rel = Path(value).resolve().relative_to(Path(run_dir).resolve())
        except ValueError:
            return value
        return f"$RUN/{rel.as_posix()}"
    return value


def _where(path, ctx: StageContext) -> str:
    """A missing input's path, absolute, with what a relative path was relative to."""
    path = Path(path)
    full = path if path.is_absolute() else Path(os.getcwd()) / path
    try:
        full.resolve().relative_to(ctx.run_dir.resolve())
        return f"{full} (is the stage that makes it listed before it?)"
    except ValueError:
        pass
    if path.is_absolute():
        return str(path)
    return f"{full} ({path} is relative to the current directory, not to the config file)"


def recorded(stage_dir: Path) -> dict | None:
    """The lineage a stage folder holds (config.yaml), or None."""
    cfg_file = stage_dir / "config.yaml"
    return yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else None


def _same(record: dict | None, fp: dict) -> bool:
    """Whether a recorded lineage matches: everything but the code record (never a cache key)."""
    return isinstance(record, dict) and {k: v for k, v in record.items() if k != "code"} == fp


def is_cached(stage_dir: Path, fp: dict) -> bool:
    return (stage_dir / "result.json").is_file() and _same(recorded(stage_dir), fp)


def code_warning(name: str, stage_dir: Path, was: dict | None, now: dict) -> str | None:
    """What to say when a cached stage is reused: None if its code is the same; "unknown" when
    it was cached before the code was recorded; else a warning with both fingerprints."""
    if was is None:
        return "unknown"
    if was == now:
        return None
    return (f"{name}: reused from the cache, but its code changed since it was computed "
            f"(posttrain {was.get('posttrain')} code {str(was.get('fingerprint'))[:12]} -> "
            f"{now['posttrain']} code {now['fingerprint'][:12]}), so it may differ from what this "
            f"code computes; --force {name} recomputes it (--force all: every stage; or delete "
            f"{stage_dir})")  # fmt: skip


def _prepare_dir(stage_dir: Path, fp: dict, resume: bool, logger: Logger, name: str,
                 code: dict) -> bool:  # fmt: skip
    """Make the stage folder ready to run; returns whether a resume from its checkpoints is possible."""
    cfg_file = stage_dir / "config.yaml"
    same = _same(recorded(stage_dir), fp)
    if resume and same:
        logger.info(f"{name}: resuming from its last checkpoint (config and inputs unchanged)")
        (stage_dir / "result.json").unlink(missing_ok=True)
        clean_stale_temps(stage_dir)  # what a killed write left (checkpoints/ cleans its own)
        return True
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)
    atomic_write_yaml(cfg_file, fp | {"code": code})
    return False


@contextlib.contextmanager
def _hold_run_dir(run_dir: Path, logger: Logger):
    """Rank 0 holds the run directory's lock for the whole run (the other ranks share the folder
    legitimately); every rank learns if it could not be had, so that all of them stop with the
    same error instead of waiting for rank 0 at a barrier."""
    with contextlib.ExitStack() as stack:
        refused = None
        if dist.is_main():
            try:
                stack.enter_context(runlock.hold(run_dir, logger.info))
            except runlock.RunDirLocked as e:
                refused = str(e)
        refused = dist.gather(refused)[0]  # rank 0's answer, on every rank
        if refused is not None:
            raise runlock.RunDirLocked(refused)
        yield


def _check_settings(spec: StageSpec, ctx: StageContext) -> None:
    """Training settings that only the run can judge: sharding needs ranks; bf16 on a CPU is
    emulated (slower than fp32 on most CPUs), which deserves a word."""
    train = getattr(spec.config, "train", None)
    if getattr(train, "fsdp", False) and not dist.active():
        raise ValueError(f"config key '{spec.name}.train.fsdp': true shards the model over the "
                         "ranks of a torchrun job, and this is a single process; run it under "
                         "`torchrun --nproc_per_node N -m posttrain.cli ...`, or set "
                         f"{spec.name}.train.fsdp: false")  # fmt: skip
    if getattr(train, "precision", None) == "bf16" and ctx.device.type == "cpu":
        ctx.logger.warning(f"{spec.name}.train.precision: bf16 on the CPU is usually slower than "
                           "fp32 (autocast emulates bf16 on most CPUs) and less precise; it "
                           f"pays on a GPU. Set {spec.name}.train.precision: fp32 for CPU runs")  # fmt: skip


def _wandb_run(spec: StageSpec, ctx: StageContext):
    """The stage's W&B run under `log.wandb` (see posttrain.log.wandb_run): named
    <run name>/<stage>, its config the stage's resolved settings and the pipeline's own."""
    cfg = ctx.pipeline.config
    config = spec.config.model_dump(mode="json") | {"pipeline": cfg.model_dump(mode="json")}
    return wandb_run(ctx.logger, cfg.log.wandb, name=f"{cfg.name}/{spec.name}", group=cfg.name,
                     job_type=spec.kind, config=config, run_dir=ctx.run_dir)  # fmt: skip


def _run_stage(spec: StageSpec, ctx: StageContext, force: set[str], resume: bool,
               seen: set[str] | None = None) -> None:  # fmt: skip
    """One stage on every rank: skipped if cached, else run (data-parallel, or on rank 0 while
    the others wait) with rank 0 writing its result. `seen` collects the warnings said once a
    run ("unknown code")."""
    from posttrain.stages import STAGES

    module, main, logger = STAGES[spec.kind], dist.is_main(), ctx.logger
    fp = fingerprint(spec, ctx, module.inputs(spec.config, ctx))
    code = code_record(spec.kind)
    if spec.name not in force and is_cached(ctx.stage_dir, fp):
        logger.info(
            f"{spec.name}: skipped (config and inputs unchanged; --force {spec.name} re-runs it)"
        )
        note = code_warning(spec.name, ctx.stage_dir, recorded(ctx.stage_dir).get("code"), code)
        seen = set() if seen is None else seen
        if note == "unknown" and note not in seen:
            seen.add(note)
            logger.warning(f"{spec.name}: reused from the cache; it was computed before "
                           "posttrain recorded the code a stage ran, so whether its code changed "
                           f"since is unknown; --force {spec.name} recomputes it (--force all: "
                           "every stage). Said once per run: later stages cached as long ago "
                           "are reused without it")  # fmt: skip
        elif note not in (None, "unknown"):
            logger.warning(note)
        return
    _check_settings(spec, ctx)
    can_resume = resume and spec.name not in force
    if main:
        ctx.resume = _prepare_dir(ctx.stage_dir, fp, can_resume, logger, spec.name, code)
    dist.barrier()
    if not main:  # where rank 0 cleared the folder there is no checkpoint: a fresh start
        ctx.resume = can_resume
    parallel = spec.kind in dist.DATA_PARALLEL_KINDS
    if dist.active():
        how = f"data-parallel on {dist.world()} ranks" if parallel else "on rank 0"
        logger.info(f"{spec.name}: running ({how})")
    else:
        logger.info(f"{spec.name}: running")
    t0 = time.perf_counter()
    with _wandb_run(spec, ctx) as tracked:
        if parallel:
            result: StageResult = module.run(spec.config, ctx)
        elif main:
            with dist.alone():
                result = module.run(spec.config, ctx)
        seconds = time.perf_counter() - t0
        if main:
            record = {"stage": spec.name, "kind": spec.kind, "seconds": round(seconds, 2),
                      "metrics": result.metrics, "artifacts": result.artifacts}  # fmt: skip
            if result.evals:
                record |= {"evals": result.evals, "samples": result.samples}
            atomic_write_json(ctx.stage_dir / "result.json", record)
            if tracked is not None:
                tracked.summarize(result.metrics | {"seconds": record["seconds"]})
    dist.barrier()  # the next stage reads what this one wrote
    logger.info(f"{spec.name}: done in {seconds:.1f}s")


def run_pipeline(
    pipeline: Pipeline,
    *,
    force: set[str] | None = None,
    resume: bool = False,
    logger: Logger | None = None,
    report: bool = True,
) -> dict:
    """Run every stage (skipping cached ones), then write the report (unless `report` is False:
    the lab writes its own). Returns report.json's dict ({} without a report).
    Under torchrun, every rank calls it; rank 0 holds the run directory's lock and writes."""
    from posttrain.report import write_report

    force = set(force or ())
    names = [s.name for s in pipeline.stages]
    if "all" in force and "all" not in names:
        force = (force - {"all"}) | set(names)
    unknown = force - set(names)
    if unknown:
        raise ValueError(f"--force: no stage named {sorted(unknown)}; stages: {names} (or all)")
    cfg = pipeline.config
    logger = logger or Logger(every=cfg.log.every, tensorboard=cfg.log.tensorboard)
    check_wandb(cfg.log.wandb)
    dist.init(resolve_device(cfg.device))
    main = dist.is_main()
    run_dir = cfg.run_dir
    with _hold_run_dir(run_dir, logger):
        if main:
            atomic_write_yaml(run_dir / "pipeline.yaml", pipeline.resolved())
        t_start = time.perf_counter()
        seen: set[str] = set()
        for spec in pipeline.stages:
            ctx = StageContext(spec.name, spec.kind, run_dir, pipeline, logger)
            _run_stage(spec, ctx, force, resume, seen)
        report = write_report(pipeline, run_dir) if main and report else {}
        dist.barrier()  # every rank is done with the folder before rank 0 releases the lock
    where = f"; report: {run_dir / 'report.html'}" if report else ""
    logger.info(f"pipeline done in {time.perf_counter() - t_start:.1f}s{where}")
    return report
