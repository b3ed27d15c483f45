"""What every experiment shares: its config, the cached stages of each world seed, criteria and
the files an experiment writes (result.json, report.md, plots).

One run directory per world seed (`<runs>/seeds/<seed>/`, `<runs>` = `<out>` unless given) holds the stages every experiment
builds on (world, pretrain, SFT) and each experiment's own stages under names of its own, so
the pipeline's cache makes every experiment after the first reuse them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.io import atomic_write_json, atomic_write_text
from posttrain.lab.stats import Estimate
from posttrain.log import Logger

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "lab"
BASE_STAGES = ["world", "pretrain", "sft"]


@dataclass
class Criterion:
    """One claim of the paper, its threshold and what the runs measured.

    `passed` is computed by the experiment from the estimate; `rule` says how (for example
    "value >= 0.9" or "interval above 0"), so a reader can check it against the figures."""

    name: str
    claim: str
    rule: str
    estimate: Estimate | None
    passed: bool
    note: str = ""

    def as_dict(self) -> dict:
        est = self.estimate.as_dict() if self.estimate is not None else None
        return {"name": self.name, "claim": self.claim, "rule": self.rule, "estimate": est,
                "passed": bool(self.passed), "note": self.note}  # fmt: skip


def at_least(name: str, claim: str, est: Estimate, t: float, by: str = "value") -> Criterion:
    """value (or the interval's lower end, by="lo") >= t."""
    x = est.value if by == "value" else est.lo
    rule = f"{'value' if by == 'value' else 'interval low end'} >= {t:g}"
    return Criterion(name, claim, rule, est, bool(math.isfinite(x) and x >= t))


def at_most(name: str, claim: str, est: Estimate, t: float, by: str = "value") -> Criterion:
    """value (or the interval's upper end, by="hi") <= t."""
    x = est.value if by == "value" else est.hi
    rule = f"{'value' if by == 'value' else 'interval high end'} <= {t:g}"
    return Criterion(name, claim, rule, est, bool(math.isfinite(x) and x <= t))


@dataclass
class Lab:
    """Where and how an experiment runs: output folder, world seeds, quick or full sizes."""

    out: Path
    seeds: list[int]
    quick: bool = False
    logger: Logger = field(default_factory=Logger)
    runs: Path | None = None  # where the per-seed runs live (default: `out`)

    def seed_dir(self, seed: int) -> Path:
        root = self.out if self.runs is None else self.runs
        return root / ("seeds-quick" if self.quick else "seeds") / str(seed)

    def config(self, name: str) -> dict:
        """configs/lab/<name>.yaml (extends toy.yaml) with, under --quick, configs/lab/quick.yaml
        and the file's own `quick:` section merged over it. Returns the pipeline sections and
        the experiment's `lab:` settings under "lab"."""
        from posttrain.config import _deep_merge, read_config

        raw = read_config(CONFIG_DIR / f"{name}.yaml")
        quick = raw.pop("quick", {}) or {}
        if self.quick:
            raw = _deep_merge(raw, read_config(CONFIG_DIR / "quick.yaml"))
            raw = _deep_merge(raw, quick)
        return raw

    def settings(self, name: str, settings_cls, template: str, what: str) -> tuple[dict, Any, dict]:
        """(the config, its validated `lab:` settings, the `template` section taken out of it):
        an experiment whose arms are stages derived from one template section (`what` says
        which, in the error when it is missing)."""
        from posttrain.config import validate
        from posttrain.settings import ConfigError

        raw = self.config(name)
        found = validate(settings_cls, raw.get("lab"), str(CONFIG_DIR / f"{name}.yaml"), "lab")
        if not isinstance(raw.get(template), dict):
            raise ConfigError(f"{CONFIG_DIR / f'{name}.yaml'}: config key {template!r} is "
                              f"missing ({what})")  # fmt: skip
        return raw, found, raw.pop(template)

    def run_stages(self, seed: int, raw: dict, stages: list[str], base: bool = True) -> Path:
        """Run the base stages (unless `base` is False: an experiment with a world of its own)
        and `stages` (sections from `raw`) for one world seed; cached stages are skipped.
        Returns the seed's run directory."""
        from posttrain.config import build_pipeline
        from posttrain.pipeline import run_pipeline

        cfg = {k: v for k, v in raw.items() if k != "lab"}
        cfg |= {"name": f"lab-{seed}", "seed": seed, "out": str(self.seed_dir(seed))}
        cfg["world"] = dict(cfg.get("world") or {}) | {"seed": seed}
        cfg["stages"] = (BASE_STAGES if base else []) + [s for s in stages if s not in BASE_STAGES]
        pipeline = build_pipeline(cfg, f"lab seed {seed}")
        run_pipeline(pipeline, logger=self.logger, report=False)
        return self.seed_dir(seed)


def save_figure(fig, path: Path) -> None:
    """Lay out, write (110 dpi, the folder made if missing) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict_table(criteria: list[Criterion]) -> str:
    rows = [
        "| criterion | claim | rule | measured (95% interval) | verdict |",
        "|---|---|---|---|---|",
    ]
    for c in criteria:
        if c.estimate is None:
            measured = "-"
        else:
            measured = f"{c.estimate.value:.3g} [{c.estimate.lo:.3g}, {c.estimate.hi:.3g}]"
        rows.append(f"| {c.name} | {c.claim} | {c.rule} | {measured} | "
                    f"{'PASS' if c.passed else 'FAIL'}{' - ' + c.note if c.note else ''} |")  # fmt: skip
    return "\n".join(rows) + "\n"


def write_outputs(lab: Lab, name: str, title: str, figures: dict, criteria: list[Criterion],
                  plots: dict[str, str], body: str = "", started: float | None = None,
                  intervals: str = "95% bootstrap over held-out prompts within each seed") -> dict:  # fmt: skip
    """<out>/<name>/result.json and report.md (the verdict table, then the plots with their
    captions and the experiment's own text). plots: file name under plots/ -> caption."""
    folder = lab.out / name
    result = {
        "experiment": name,
        "seeds": lab.seeds,
        "quick": lab.quick,
        "verdict": "PASS" if criteria and all(c.passed for c in criteria) else "FAIL",
        "criteria": [_jsonable(c.as_dict()) for c in criteria],
        "figures": _jsonable(figures),
        "seconds": round(time.perf_counter() - started, 1) if started else None,
    }
    atomic_write_json(folder / "result.json", result)
    lines = [f"# {title}", "",
             f"Seeds {', '.join(map(str, lab.seeds))}{' (quick sizes)' if lab.quick else ''}; "
             f"overall: **{result['verdict']}** ({sum(c.passed for c in criteria)} of "
             f"{len(criteria)} criteria). Intervals: {intervals}.", "", verdict_table(criteria)]  # fmt: skip
    for file, caption in plots.items():
        lines += [f"![{file}](plots/{file})", "", f"*{caption}*", ""]
    if body:
        lines += [body, ""]
    atomic_write_text(folder / "report.md", "\n".join(lines))
    return result


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple) and not isinstance(x, Estimate):
        return [_jsonable(v) for v in x]
    if isinstance(x, Estimate):
        return _jsonable(x.as_dict())  # a missing interval (nan) is written as null
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x
