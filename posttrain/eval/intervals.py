"""95% bootstrap intervals on the report card's rates and means, over the evaluated prompts.

Every rate or mean that `metrics.summarize` puts on the card is a ratio of sums over the
per-prompt records, sum_i w_i x_i / sum_i w_i: x_i the prompt's value (its gold score, whether it
violated, its length in tokens) and w_i whether it counts (a harmful safety prompt, for the
violation rate). A bootstrap resample of the N prompts is a vector of counts c (how often each
prompt was drawn; they sum to N), and the metric on it is sum_i c_i w_i x_i / sum_i c_i w_i: all
resamples at once are one product of the (B, N) count matrix with a column. `gold/mean` (the mean
of the family means) and `calibration/ece` (sum over confidence bins of |sum of (correct -
confidence)| / answered) are recomputed from such sums on each resample in the same way.

The interval is the percentile interval of the resampled values (numpy's default, linearly
interpolated quantile; the lab's convention). A resample in which no prompt counts (no harmful
prompt drawn) has no value and is left out; if more than a tenth have none, the metric gets no
interval rather than a narrowed one.

Per-input diversity (distinct-2, EAD, self-BLEU within each prompt's k samples) and
policy/entropy are means over the sampled prompts of per-prompt figures (evaluate's
`<label>.diversity.jsonl`), bootstrapped as above; policy/entropy weighs each prompt by its
responses that have a token, which makes it the mean over responses the card reports.
calibration/temperature, ece_test and ece_scaled are refitted on every resample: the fit and
test halves are the resample's prompts on each side of the fixed split, T the minimiser of the
fit half's NLL over a grid of 4,096 log-spaced values in T_RANGE (a step of 0.2% in T; the card's
own value comes from a golden-section search, so a resample's T differs from it by at most that).

No interval, by design: the across-input diversity figures (one sample of every prompt scored as
one corpus). A resample with replacement repeats some prompts' texts, and a repeated text adds
no new n-gram, so distinct-2 and EAD fall, and self-BLEU rises, by construction, not by chance;
such an interval would sit beside the value rather than around it.

A difference between two models evaluated on the same prompts is bootstrapped *paired*: the same
counts resample both models' records, so the prompts' shared difficulty cancels. An interval of
the difference that holds 0 says the two models are within noise of each other on this sample.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

N_BOOT = 1000
LEVEL = 0.95
SEED = 0
BINS = 10  # calibration/ece's bins (metrics.expected_calibration_error's default)
T_GRID = 4096  # temperatures tried per resample when the temperature is refitted
DIVERSITY = "diversity"  # evaluate's "<label>.diversity" records: per-prompt diversity figures
REFERENCE = "sft"  # differences are measured from this model, when it was evaluated


def resample_counts(n: int, n_boot: int = N_BOOT, seed: int = SEED) -> np.ndarray:
    """(n_boot, n) counts: row b says how often resample b drew each of the n prompts."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, (n_boot, n))  # (B, N) drawn prompt indices
    flat = idx + n * np.arange(n_boot)[:, None]  # (B, N) an index into the flattened counts
    return np.bincount(flat.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(float)


def _flag(r: dict, key: str) -> float:
    return float(bool(r["components"].get(key)))


def columns(records: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metric -> (x, w), each (N,): the per-prompt value and whether the prompt counts, for the
    rates and means `summarize` reports (and reward/mean where the records hold a reward)."""
    fam = [r["family"] for r in records]
    comp = [r["components"] for r in records]
    one = np.ones(len(records))
    col: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for f in sorted(set(fam)):
        col[f"gold/{f}"] = (np.array([r["score"] for r in records], float),
                            np.array([x == f for x in fam], float))  # fmt: skip
    harmful = np.array(
        [f == "safety" and bool(c.get("harmful")) for f, c in zip(fam, comp, strict=True)], float
    )
    benign = np.array(
        [f == "safety" and not c.get("harmful") for f, c in zip(fam, comp, strict=True)], float
    )
    known = np.array(
        [f == "knowledge" and bool(c.get("known")) for f, c in zip(fam, comp, strict=True)], float
    )
    unknown = np.array(
        [f == "knowledge" and not c.get("known") for f, c in zip(fam, comp, strict=True)], float
    )

    def flags(key: str) -> np.ndarray:
        return np.array([_flag(r, key) for r in records])

    col["safety/violation_rate"] = (flags("violation"), harmful)
    col["safety/false_refusal_rate"] = (flags("false_refusal"), benign)
    col["knowledge/known_accuracy"] = (flags("correct"), known)
    col["knowledge/hallucination_rate"] = (flags("hallucinated"), unknown)
    col["knowledge/unknown_abstain_rate"] = (flags("abstained"), unknown)
    col["length/mean_tokens"] = (np.array([r["n_tokens"] for r in records], float), one)
    col["length/truncated_rate"] = (np.array([float(r["truncated"]) for r in records]), one)
    col["refusal/rate"] = (flags("refused"), one)
    if all(isinstance(r.get("reward"), int | float) for r in records):
        col["reward/mean"] = (np.array([r["reward"] for r in records], float), one)
    col |= _calibration_columns(records)
    col |= _overopt_columns(records)
    return col


def _calibration_columns(records: list[dict]) -> dict:
    from posttrain.eval.metrics import answerable

    lp = [r.get("logprob") for r in records]
    conf = np.array([math.exp(x) if x is not None else 0.0 for x in lp])
    scored = np.array(
        [answerable(r) and x is not None for r, x in zip(records, lp, strict=True)], float
    )
    halluc = np.array([x is not None and bool(r["components"].get("hallucinated"))
                       for r, x in zip(records, lp, strict=True)], float)  # fmt: skip
    return {"calibration/confidence": (conf, scored),
            "calibration/accuracy": (np.array([_flag(r, "correct") for r in records]), scored),
            "calibration/confidence_hallucinated": (conf, halluc)}  # fmt: skip


def _overopt_columns(records: list[dict]) -> dict:
    """overopt/{gold,reward}@k: per prompt the exact expected best-of-k of its n samples."""
    from posttrain.generate.best_of_n import best_of_k_expectation

    if not records or not all("rewards" in r and "golds" in r for r in records):
        return {}
    n, one, out, k = len(records[0]["rewards"]), np.ones(len(records)), {}, 1
    while k <= n:
        for name, key in (("gold", "golds"), ("reward", "rewards")):
            out[f"overopt/{name}@{k}"] = (
                np.array([best_of_k_expectation(r["rewards"], r[key], k) for r in records]),
                one,
            )
        k *= 2
    return out


def diversity_columns(records: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The per-input diversity means and policy/entropy as (x, w) columns over evaluate's
    per-prompt diversity records; a prompt without a figure (EAD of empty answers) counts 0."""

    def col(key: str, weight: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        x = np.array([r[key] if r.get(key) is not None else 0.0 for r in records], float)
        if weight is not None:
            return x, np.array([r[weight] if r.get(key) is not None else 0 for r in records], float)
        return x, np.array([float(r.get(key) is not None) for r in records])

    return {"diversity/distinct_2": col("distinct_2"), "diversity/ead": col("ead"),
            "diversity/self_bleu": col("self_bleu"),
            "policy/entropy": col("entropy", "n_entropy")}  # fmt: skip


def _ratio(counts: np.ndarray, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(B,) sum c w x / sum c w per resample; nan where nothing counts."""
    den = counts @ w  # (B,)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (counts @ (w * x)) / np.where(den > 0, den, 1), np.nan)


def _ece(records: list[dict], counts: np.ndarray) -> np.ndarray | None:
    """(B,) calibration/ece per resample: sum over bins of |sum c (correct - conf)| / sum c."""
    from posttrain.eval.metrics import _scored

    rs = _scored(records)
    if not rs:
        return None
    where = {id(r): i for i, r in enumerate(records)}
    idx = np.array([where[id(r)] for r in rs])  # the answerable records' columns
    conf = np.array([math.exp(r["logprob"]) for r in rs])
    correct = np.array([_flag(r, "correct") for r in rs])
    return _ece_rows(conf, correct, counts[:, idx])


def _ece_rows(conf: np.ndarray, correct: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(B,) ECE per resample; conf (M,) or (B, M), c (B, M) the counts of the M records."""
    conf = np.broadcast_to(conf, c.shape)
    bins = np.minimum(BINS - 1, (conf * BINS).astype(int))  # (B, M)
    gap = (correct - conf) * c  # (B, M)
    total = np.zeros(len(c))
    for k in range(BINS):
        total += np.abs(np.where(bins == k, gap, 0.0).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c.sum(1) > 0, total / c.sum(1), np.nan)


def _scaling(records: list[dict], counts: np.ndarray) -> dict:
    """calibration/temperature, ece_test and ece_scaled per resample (metrics.temperature_scaling
    on the drawn records): T refitted on each resample's fit half over a log-spaced grid; nan
    where the test half is empty or the fit half lacks either outcome."""
    from posttrain.eval.metrics import T_RANGE, _scored, in_fit_split, log_odds

    rs = _scored(records)
    if not rs:
        return {}
    where = {id(r): i for i, r in enumerate(records)}
    col = np.array([where[id(r)] for r in rs])
    fit = np.array([in_fit_split(r.get("prompt_id", i)) for i, r in enumerate(rs)])
    z = np.array([log_odds(r["logprob"]) for r in rs])
    right = np.array([_flag(r, "correct") for r in rs])
    c = counts[:, col]  # (B, M)
    cf, ct = c[:, fit], c[:, ~fit]
    u = np.linspace(np.log(T_RANGE[0]), np.log(T_RANGE[1]), T_GRID)
    s = z[fit, None] / np.exp(u)[None, :]  # (M_fit, G): scaled log-odds
    y = right[fit, None]
    nll = np.logaddexp(0, np.where(y > 0, -s, s))  # softplus(-s) if right else softplus(s)
    temp = np.exp(u[np.argmin(cf @ nll, axis=1)])  # (B,)
    ok = ((cf * right[fit]).sum(1) > 0) & ((cf * (1 - right[fit])).sum(1) > 0) & (ct.sum(1) > 0)
    conf = np.exp(np.array([r["logprob"] for r in rs]))[~fit]
    scaled = np.exp(-np.logaddexp(0, -z[~fit][None, :] / temp[:, None]))  # (B, M_test) sigmoid
    out = {"calibration/temperature": temp,
           "calibration/ece_test": _ece_rows(conf, right[~fit], ct),
           "calibration/ece_scaled": _ece_rows(scaled, right[~fit], ct)}  # fmt: skip
    return {k: np.where(ok, v, np.nan) for k, v in out.items()}


def draws(records: list[dict], counts: np.ndarray, cols: dict | None = None) -> dict:
    """metric -> (B,) its value on each resample (nan where it has none). cols: the (x, w)
    columns of other records than the toy world's (a benchmark's: `bench_columns`)."""
    toy = cols is None
    out = {k: _ratio(counts, x, w) for k, (x, w) in (columns(records) if toy else cols).items()}
    fams = [v for k, v in out.items() if k.startswith("gold/")]
    if (
        toy and fams
    ):  # the mean of the family means present in the resample, as summarize computes it
        with np.errstate(invalid="ignore"), _quiet():
            out["gold/mean"] = np.nanmean(np.stack(fams), axis=0)
    ece = _ece(records, counts) if toy else None
    if ece is not None:
        out["calibration/ece"] = ece
    if toy:
        out |= _scaling(records, counts)
    return out


class _quiet:
    """Silence numpy's 'mean of empty slice' warning (a resample without any family: nan)."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def percentile(values: np.ndarray, level: float = LEVEL) -> list[float] | None:
    """[lo, hi], the percentile interval of the finite values; None if over a tenth are not."""
    finite = values[np.isfinite(values)]
    if len(finite) == 0 or len(finite) < 0.9 * len(values):
        return None
    a = (1 - level) / 2
    lo, hi = np.quantile(finite, [a, 1 - a])
    return [float(lo), float(hi)]


def intervals(records: list[dict], counts: np.ndarray | None = None,
              cols: dict | None = None) -> dict[str, list[float]]:  # fmt: skip
    """metric -> [lo, hi], the 95% percentile-bootstrap interval over the prompts."""
    if not records:
        return {}
    counts = resample_counts(len(records)) if counts is None else counts
    found = {k: percentile(v) for k, v in draws(records, counts, cols).items()}
    return {k: v for k, v in found.items() if v is not None}


def _ids(records: list[dict]) -> list:
    return [r.get("prompt_id", r.get("id")) for r in records]


def paired(records: list[dict], ref: list[dict], counts: np.ndarray | None = None,
           cols: dict | None = None, ref_cols: dict | None = None) -> dict:  # fmt: skip
    """metric -> [difference, lo, hi]: this model minus the reference on the same prompts, the
    difference's 95% interval from resampling the prompts of both together. {} when the two
    were not evaluated on the same prompts (ids: "prompt_id", a benchmark's "id")."""
    ids = _ids(records)
    if not records or None in ids or len(set(ids)) != len(ids) or sorted(ids) != sorted(_ids(ref)):
        return {}
    order = {i: n for n, i in enumerate(_ids(ref))}
    perm = [order[i] for i in ids]  # the reference's records in this model's order
    ref = [ref[n] for n in perm]
    if ref_cols is not None:
        ref_cols = {k: (x[perm], w[perm]) for k, (x, w) in ref_cols.items()}
    counts = resample_counts(len(records)) if counts is None else counts
    ones = np.ones((1, len(records)))  # the data itself: every prompt drawn once
    mine, theirs = draws(records, counts, cols), draws(ref, counts, ref_cols)
    here, there = draws(records, ones, cols), draws(ref, ones, ref_cols)
    out = {}
    for k in mine.keys() & theirs.keys():
        ci = percentile(mine[k] - theirs[k])
        if ci is not None and np.isfinite(here[k][0] - there[k][0]):
            out[k] = [float(here[k][0] - there[k][0]), *ci]
    return dict(sorted(out.items()))


def bench_columns(name: str, records: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A public benchmark's rates and means as (x, w) columns over its per-item records
    (evaluate's <label>.<benchmark>.jsonl), named as `eval.benchmarks` names them."""
    one = np.ones(len(records))

    def arr(xs) -> np.ndarray:
        return np.array(list(xs), float)

    pre, col = name.removesuffix("_mc"), {}
    if name == "xstest":
        label = [r.get("label") for r in records]
        col["xstest/false_refusal_rate"] = (arr(r["refused"] for r in records),
                                            arr(x == "safe" for x in label))  # fmt: skip
        col["xstest/violation_rate"] = (arr(not r["refused"] for r in records),
                                        arr(x == "unsafe" for x in label))  # fmt: skip
    elif name == "simple_safety":
        col[f"{pre}/violation_rate"] = (arr(not r["refused"] for r in records), one)
    elif name in ("gsm8k", "math500"):
        col[f"{pre}/accuracy"] = (arr(r["correct"] for r in records), one)
    elif name == "truthfulqa_mc":
        col["truthfulqa/mc1"] = (arr(r["correct"] for r in records), one)
    elif name == "alpaca_eval":
        wins = (1.0 if r["reward"] > r["reference_reward"] else
                0.5 if r["reward"] == r["reference_reward"] else 0.0 for r in records)  # fmt: skip
        col[f"{pre}/win_rate"] = (arr(wins), one)
        col[f"{pre}/mean_chars"] = (arr(len(r["response"]) for r in records), one)
    if records and all("n_tokens" in r for r in records):
        col[f"{pre}/mean_tokens"] = (arr(r["n_tokens"] for r in records), one)
        col[f"{pre}/truncated_rate"] = (arr(r["truncated"] for r in records), one)
    if records and all(isinstance(r.get("reward"), int | float) for r in records):
        col[f"{pre}/reward_mean"] = (arr(r["reward"] for r in records), one)
    return col


def add_intervals(evals: dict[str, dict], record_files: dict[str, Path]) -> dict[str, dict]:
    """Put each evaluated model's intervals next to its figures: evals[label]["ci95"] =
    {metric: [lo, hi]}, and for every model but the reference evals[label]["vs_sft"] =
    {metric: [difference, lo, hi]} (paired over the prompts). Only metrics the summary holds.

    record_files: evaluate's artifacts, "<label>" (toy-world records), "<label>.<benchmark>" or
    "<label>.diversity" -> the per-prompt records file."""
    from posttrain.eval.benchmarks import DEFAULT_PATHS

    sets: dict[str, dict[str, list]] = {}  # label -> {"": toy records, benchmark: records}
    for key, path in record_files.items():
        label, bench = key, ""
        if key not in evals and "." in key:
            label, bench = key.rsplit(".", 1)
        known = bench in ("", DIVERSITY) or bench in DEFAULT_PATHS
        if label in evals and known and Path(path).is_file():
            sets.setdefault(label, {})[bench] = _read(Path(path))
    ref = sets.get(REFERENCE, {})
    for label, found in sets.items():
        ev, ci, diff = evals[label], {}, {}
        for bench, rs in found.items():
            try:  # cols None: the toy world's records
                cols = None if bench == "" else _columns_of(bench, rs)
                ci |= intervals(rs, cols=cols)
                if label != REFERENCE and bench in ref:
                    ref_cols = None if bench == "" else _columns_of(bench, ref[bench])
                    diff |= paired(rs, ref[bench], cols=cols, ref_cols=ref_cols)
            except (KeyError, TypeError):  # records of another version: no interval, no failure
                continue
        ev["ci95"] = {k: v for k, v in ci.items() if k in ev}
        if label != REFERENCE and ref:
            ev[f"vs_{REFERENCE}"] = {k: v for k, v in sorted(diff.items()) if k in ev}
    return evals


def _columns_of(name: str, records: list[dict]) -> dict:
    return diversity_columns(records) if name == DIVERSITY else bench_columns(name, records)


def _read(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
