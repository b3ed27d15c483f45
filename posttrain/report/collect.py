"""report.json: what the run did, gathered from its stages' result.json files.

{"run", "header": {config, its hash, commit, versions, device, date, wall time},
 "settings": {stage: {flattened resolved config}}, "stages": {stage: {kind, seconds, metrics}},
 "evals": {model: {metric: value, "ci95": {metric: [lo, hi]}, "vs_sft": {metric: [d, lo, hi]}}},
 "eval_prompts": {model: prompts evaluated}, "samples": {model: [records]}, "lab": {...},
 "summary": {stage: sentence}}

Intervals come from the evaluate stage (eval/intervals.py). An evaluate result cached before it
computed them gets them here, from its per-prompt records, by the same function.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from posttrain.io import read_jsonl

ROOT = Path(__file__).resolve().parents[2]  # the checkout (for its git commit)
VERSIONS = ("posttrain", "torch", "transformers", "numpy")


def collect(pipeline, run_dir: Path) -> dict:
    stages, evals, samples, prompts = {}, {}, {}, {}
    for spec in pipeline.stages:
        f = run_dir / spec.name / "result.json"
        if not f.is_file():
            continue
        r = json.loads(f.read_text())
        stages[spec.name] = {"kind": r["kind"], "seconds": r["seconds"], **r["metrics"]}
        if r.get("evals"):
            _backfill(r, run_dir)
            prompts |= {label: _count_lines(run_dir / r["artifacts"][label])
                        for label in r["evals"] if label in r.get("artifacts", {})}  # fmt: skip
        evals |= r.get("evals", {})
        samples |= r.get("samples", {})
    return {"run": pipeline.config.name, "header": header(pipeline, run_dir, stages),
            "settings": {s.name: flatten(s.config.model_dump(mode="json"))
                         for s in pipeline.stages},
            "stages": stages, "evals": evals, "eval_prompts": prompts, "samples": samples,
            "lab": lab_verdicts(run_dir)}  # fmt: skip


def _count_lines(path: Path) -> int | None:
    if not path.is_file():
        return None
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def _backfill(result: dict, run_dir: Path) -> None:
    """Intervals and sample details of an evaluate result written before it kept them."""
    from posttrain.eval.intervals import add_intervals

    arts = {k: run_dir / v for k, v in result.get("artifacts", {}).items()}
    if any("ci95" not in ev for ev in result["evals"].values()):
        add_intervals(result["evals"], arts)
    for label, rows in result.get("samples", {}).items():
        if rows and "truncated" not in rows[0] and label in arts and arts[label].is_file():
            by_prompt = {(r["family"], r["prompt"]): r for r in read_jsonl(arts[label])}
            for row in rows:
                rec = by_prompt.get((row["family"], row["prompt"]), {})
                row |= {k: rec[k] for k in ("prompt_id", "n_tokens", "truncated") if k in rec}


def flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def git_commit(root: Path = ROOT) -> str | None:
    """The checkout's commit, "+ local changes" when tracked files differ; None outside git."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args],
                                 capture_output=True, text=True, timeout=10)  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "--short=10", "HEAD")
    if commit is None:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return commit + (" + local changes" if dirty else "")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def device_name(setting: str) -> str:
    from posttrain.models.load import resolve_device

    dev = resolve_device(setting)
    if dev.type == "cuda":
        import torch

        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"{dev} ({platform.processor() or platform.machine()})"


def header(pipeline, run_dir: Path, stages: dict) -> dict:
    """Where the figures come from: the config (and the hash of the file and of the resolved
    pipeline.yaml), the code, the device, the date and each stage's wall time."""
    source = pipeline.source
    path = Path(source.split(" (with overrides", 1)[0])
    return {
        "run": pipeline.config.name,
        "run_dir": str(run_dir),
        "config": source,
        "config_sha256": _sha256(path),
        "resolved_sha256": _sha256(run_dir / "pipeline.yaml"),
        "commit": git_commit(),
        "versions": versions(),
        "device": device_name(pipeline.config.device),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "seconds": {name: m["seconds"] for name, m in stages.items()},
        "wall_seconds": round(sum(m["seconds"] for m in stages.values()), 2),
    }


def lab_verdicts(run_dir: Path) -> dict:
    """The lab's verdicts when `posttrain lab` has written them next to this run (its default
    folder, runs/lab beside runs/<name>): experiment -> verdict, criteria passed, seeds, and
    its report's path relative to the run directory."""
    out = {}
    for f in sorted((run_dir.parent / "lab").glob("*/result.json")):
        try:
            r = json.loads(f.read_text())
            crit = r["criteria"]
            out[r["experiment"]] = {"verdict": r["verdict"], "passed": sum(c["passed"] for c in crit),
                                    "criteria": len(crit), "seeds": r["seeds"], "quick": r["quick"],
                                    "report": f"../lab/{f.parent.name}/report.md"}  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a lab result being written or from another version: not linked
    return out
