"""Human labels out of the database, in exactly the rank stage's records.

`export(run_dir)` writes `RUN/annotate/rankings.jsonl` (`{"prompt_id", "annotator", "group",
"order"}`), `pairs.jsonl` (the rank stage's `build_pairs` with its default settings) and
`metrics.json` (the rank stage's agreement and pair figures over the human labels), each
atomically. Skips are not labels and are not exported. A stored ranking that fails the checks
(`checks.check_ranking`, or a prompt or candidate count that no longer matches) is left out and
listed, with its row id, in `Export.invalid`; the admin pages list the same rows. The last
export's summary is kept in the database (`last_export`), for the admin page to show.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from posttrain.annotate import db
from posttrain.annotate.checks import check_ranking, clip


@dataclass
class Export:
    paths: dict[str, Path]
    rankings: int
    pairs: int
    metrics: dict[str, float] = field(default_factory=dict)
    invalid: list[dict] = field(default_factory=list)  # {"id", "prompt_id", "annotator", "problem"}


def candidates_path(run_dir: str | Path, stage: str) -> Path:
    """The sample stage's candidates.jsonl, or an error that says which part is missing."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} not found")
    if not (run / stage).is_dir():
        have = sorted(p.name for p in run.iterdir() if (p / "candidates.jsonl").is_file())
        hint = f" (stages with candidates: {', '.join(have)})" if have else ""
        raise FileNotFoundError(f"{run}: no stage directory {stage!r}{hint}")
    path = run / stage / "candidates.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: stage {stage!r} wrote no candidates (run the sample stage first)"
        )
    return path


def served_stage(run_dir: str | Path) -> str:
    path = db.db_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: no annotation app has run on {run_dir}")
    with db.opened(path) as conn:
        stage = db.get_meta(conn, "stage")
    if stage is None:
        raise ValueError(f"{path}: the app has not served this run yet (no stage recorded)")
    return stage


def human_rankings(conn, cands: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """The stored rankings as rank-stage records, each checked against today's candidates, and
    the rows that fail (`{"id", "prompt_id", "annotator", "problem"}`): left out, never raised,
    so one bad row cannot take the admin pages or the export down."""
    out, invalid = [], []
    for r in db.all_rankings(conn):
        where = f"ranking {r['id']} of {clip(r['prompt_id'])} by {r['annotator']!r}"
        try:
            if r["order"] is None:
                raise ValueError(f"{where}: the stored order {clip(r['order_json'])} is not "
                                 "valid JSON")  # fmt: skip
            if r["prompt_id"] not in cands:
                raise ValueError(f"{where}: the prompt is no longer among the candidates")
            n = len(cands[r["prompt_id"]]["responses"])
            if n != r["n_candidates"]:
                raise ValueError(f"{where}: ranked {r['n_candidates']} candidates, now {n}")
            check_ranking(r["order"], n, where)
        except ValueError as e:
            invalid.append({k: r[k] for k in ("id", "prompt_id", "annotator")}
                           | {"problem": str(e)})  # fmt: skip
            continue
        out.append({k: r[k] for k in ("prompt_id", "annotator", "group", "order")})
    return out, invalid


def check_candidates_unchanged(conn, path: Path) -> None:
    from posttrain.io import hash_path

    want, have = db.get_meta(conn, "candidates_hash"), hash_path(path)
    if want is not None and want != have:
        raise ValueError(
            f"{path} changed since labelling began (hash {have}, labels made against {want}): "
            "the stored candidate indices would point at different responses"
        )


def export(run_dir: str | Path, stage: str | None = None) -> Export:
    from posttrain.io import atomic_write_json, atomic_write_jsonl
    from posttrain.stages._annotator_groups import group_metrics
    from posttrain.stages.rank import (
        PairSettings,
        agreement_metrics,
        build_pairs,
        load_candidates,
        pair_metrics,
    )

    stage = stage or served_stage(run_dir)
    path = candidates_path(run_dir, stage)
    cands = load_candidates(path)
    with db.opened(db.db_path(run_dir)) as conn:
        check_candidates_unchanged(conn, path)
        rankings, invalid = human_rankings(conn, cands)
    if not rankings:
        bad = f" ({len(invalid)} invalid: {invalid[0]['problem']})" if invalid else ""
        raise ValueError(f"{db.db_path(run_dir)}: no rankings stored yet, nothing to export{bad}")
    pairs = build_pairs(cands, rankings, PairSettings())
    labelled = {r["prompt_id"] for r in rankings}
    metrics: dict = {"rank/rankings": len(rankings), "rank/prompts": len(labelled)}
    metrics |= agreement_metrics(rankings, cands)
    metrics |= group_metrics(rankings, cands)  # per annotator group, as the rank stage reports
    metrics |= pair_metrics(pairs, cands)[0]
    out = Path(run_dir) / "annotate"
    paths = {
        "rankings": atomic_write_jsonl(out / "rankings.jsonl", rankings),
        "pairs": atomic_write_jsonl(out / "pairs.jsonl", pairs),
        "metrics": atomic_write_json(out / "metrics.json", metrics),
    }
    e = Export(paths, len(rankings), len(pairs), metrics, invalid)
    summary = asdict(e) | {"paths": {k: str(v) for k, v in paths.items()}, "time": time.time()}
    with db.opened(db.db_path(run_dir)) as conn, db.transaction(conn):
        db.set_meta(conn, "last_export", json.dumps(summary))
    return e


def last_export(conn) -> dict | None:
    """The summary of the last export (Export's fields and its time), or None before any."""
    text = db.get_meta(conn, "last_export")
    return json.loads(text) if text else None
