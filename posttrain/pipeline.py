"""Run a pipeline: each stage in order, cached by (resolved config, input hashes), then the report."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import yaml

from posttrain import runlock
from posttrain.config import Pipeline, StageSpec
from posttrain.io import atomic_write_json, atomic_write_yaml, clean_stale_temps, hash_path
from posttrain.log import Logger
from posttrain.models.load import resolve_device
from posttrain.stages.base import StageContext, StageResult
from posttrain.train import dist

FORMAT_VERSION = 1


def fingerprint(spec: StageSpec, ctx: StageContext, input_paths: dict[str, Path]) -> dict:
    """What a stage's output depends on: its config, the world and seed, and its inputs' hashes."""
    missing = {k: p for k, p in input_paths.items() if not Path(p).exists()}
    if missing:
        k, p = next(iter(missing.items()))
        raise FileNotFoundError(
            f"stage '{spec.name}': input '{k}' not found at {p} (is the stage that makes it listed before it?)"
        )
    return {
        "format": FORMAT_VERSION,
        "stage": spec.name,
        "kind": spec.kind,
        "seed": ctx.pipeline.config.seed,
        "world": ctx.pipeline.world_config().model_dump(mode="json"),
        "config": spec.config.model_dump(mode="json"),
        "inputs": {
            k: {"path": ctx.relative(p), "hash": hash_path(p)}
            for k, p in sorted(input_paths.items())
        },
    }


def is_cached(stage_dir: Path, fp: dict) -> bool:
    cfg_file, result_file = stage_dir / "config.yaml", stage_dir / "result.json"
    if not (cfg_file.is_file() and result_file.is_file()):
        return False
    return yaml.safe_load(cfg_file.read_text()) == fp


def _prepare_dir(stage_dir: Path, fp: dict, resume: bool, logger: Logger, name: str) -> bool:
    """Make the stage folder ready to run; returns whether a resume from its checkpoints is possible."""
    cfg_file = stage_dir / "config.yaml"
    same = cfg_file.is_file() and yaml.safe_load(cfg_file.read_text()) == fp
    if resume and same:
        logger.info(f"{name}: resuming from its last checkpoint (config and inputs unchanged)")
        (stage_dir / "result.json").unlink(missing_ok=True)
        clean_stale_temps(stage_dir)  # what a killed write left (checkpoints/ cleans its own)
        return True
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)
    atomic_write_yaml(cfg_file, fp)
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


def _run_stage(spec: StageSpec, ctx: StageContext, force: set[str], resume: bool) -> None:
    """One stage on every rank: skipped if cached, else run (data-parallel, or on rank 0 while
    the others wait) with rank 0 writing its result."""
    from posttrain.stages import STAGES

    module, main, logger = STAGES[spec.kind], dist.is_main(), ctx.logger
    fp = fingerprint(spec, ctx, module.inputs(spec.config, ctx))
    if spec.name not in force and is_cached(ctx.stage_dir, fp):
        logger.info(
            f"{spec.name}: skipped (config and inputs unchanged; --force {spec.name} re-runs it)"
        )
        return
    can_resume = resume and spec.name not in force
    if main:
        ctx.resume = _prepare_dir(ctx.stage_dir, fp, can_resume, logger, spec.name)
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
    unknown = force - {s.name for s in pipeline.stages}
    if unknown:
        raise ValueError(
            f"--force: no stage named {sorted(unknown)}; stages: {[s.name for s in pipeline.stages]}"
        )
    cfg = pipeline.config
    logger = logger or Logger(every=cfg.log.every, tensorboard=cfg.log.tensorboard)
    dist.init(resolve_device(cfg.device))
    main = dist.is_main()
    run_dir = cfg.run_dir
    with _hold_run_dir(run_dir, logger):
        if main:
            atomic_write_yaml(run_dir / "pipeline.yaml", pipeline.resolved())
        t_start = time.perf_counter()
        for spec in pipeline.stages:
            _run_stage(
                spec, StageContext(spec.name, spec.kind, run_dir, pipeline, logger), force, resume
            )
        report = write_report(pipeline, run_dir) if main and report else {}
        dist.barrier()  # every rank is done with the folder before rank 0 releases the lock
    where = f"; report: {run_dir / 'report.html'}" if report else ""
    logger.info(f"pipeline done in {time.perf_counter() - t_start:.1f}s{where}")
    return report
