"""Length-controlled win rate (Dubois et al. 2404.04475, AlpacaEval 2's `length_controlled_v1`).

A judge compared the outputs of one or more models with a baseline's, one instruction at a
time. The raw win rate of model m is the mean of its preferences (a win 1, a tie 0.5). Judges
like long answers, so the raw win rate rewards padding. The length-controlled (LC) win rate
asks what the judge would have said had both outputs been equally long: a GLM per model,

    logit P(m beats b | instruction i) = theta_m + phi_m * tanh(delta_len / std(delta_len))
                                         + psi_m * gamma_i,

delta_len = len(m's output) - len(b's output), std over m's own judgements (unscaled, so
tanh(0) = 0 stays "equal length"); gamma_i the instruction's difficulty, fit once on every
model's judgements (`instruction_difficulty`). LC = the mean over m's instructions of the
predicted win rate at delta_len = 0, sigmoid(theta_m + psi_m * gamma_i).

As in AlpacaEval's code (src/alpaca_eval/metrics/glm_winrate.py, tatsu-lab/alpaca_eval@cd543a1):
- the fit is an L1-regularised logistic regression without intercept on soft labels (a tie
  is 0.5), liblinear's objective ||beta||_1 + C * sum_i w_i * logloss_i, with C chosen among
  `CS` = 10 values in [1e-4, 1e4] (sklearn's LogisticRegressionCV default) by 5-fold
  cross-validated log loss, then refit on everything;
- regularisation to the baseline (`gamed`, lambda = 0.2): judgements of the baseline's own
  outputs made verbose and concise against the baseline enter every model's fit with weight
  lambda / (number of gamed generators) and no theta term (their whole effect is length), so
  phi is pinned by how much length alone is worth to the judge;
- gamma is the per-instruction coefficient of a joint fit on every model (per-model theta and
  phi, one-hot instructions, the first instruction the reference level 0).
Differences: the folds of a model's fit hold out whole instructions (AlpacaEval's, one
judgement per instruction, hold out judgements; the same there, not when several annotators
judged each instruction), those of the joint fit single judgements, both round-robin in
order of first appearance (sklearn's GroupKFold balances group sizes); rows with no preference are left out everywhere (AlpacaEval
averages LC over them too); AlpacaEval's precomputed `instruction_difficulty.csv` and
`df_gamed.csv` live on the Hugging Face hub, not here: with a single model there is no joint
fit (each instruction's one-hot would absorb its only judgement), so gamma is left out unless
given.

The solver is a proximal Newton method (as newGLMNET, liblinear's L1 solver): a quadratic model
of the log loss per outer step, minimised exactly with the L1 term by feature-sign search (an
active-set method), then a backtracking line search on the true objective.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from posttrain.eval.l1_logistic import (  # noqa: F401  (importable from here too)
    CS,
    DEFAULT_C,
    N_SPLITS,
    choose_C,
    fit_l1_logistic,
    kkt_residual,
    l1_objective,
    l1_quadratic,
    logloss,
    sigmoid,
)

LAMBDA = 0.2  # AlpacaEval's regularize_to_baseline_lambda (length_controlled_v1)


# ---------------------------------------------------------------------------------------------
# Judgements and the GLM


@dataclass
class Judgements:
    """Judgements of models against one baseline, one row each.

    instruction (N,) the instruction's id; model (N,) the generator compared with the baseline;
    preference (N,) P(model's output preferred) in [0, 1], a tie 0.5, nan: no judgement;
    delta_len (N,) len(model's output) - len(baseline's output)."""

    instruction: np.ndarray
    model: np.ndarray
    preference: np.ndarray
    delta_len: np.ndarray

    def __post_init__(self):
        self.instruction = np.asarray(self.instruction, dtype=object)
        self.model = np.asarray(self.model, dtype=object)
        self.preference = np.asarray(self.preference, float)
        self.delta_len = np.asarray(self.delta_len, float)
        n = {len(self.instruction), len(self.model), len(self.preference), len(self.delta_len)}
        if len(n) != 1:
            raise ValueError(f"Judgements: columns of different lengths {sorted(n)}")
        p = self.preference[np.isfinite(self.preference)]
        if ((p < 0) | (p > 1)).any():
            raise ValueError("Judgements: preferences must lie in [0, 1] (a tie is 0.5)")

    def take(self, rows) -> Judgements:
        return Judgements(self.instruction[rows], self.model[rows], self.preference[rows],
                          self.delta_len[rows])  # fmt: skip

    def models(self) -> list[str]:
        return list(dict.fromkeys(self.model.tolist()))


def concat(parts: Sequence[Judgements]) -> Judgements:
    """The rows of several Judgements, in order."""
    fields = ("instruction", "model", "preference", "delta_len")
    return Judgements(*(np.concatenate([getattr(j, f) for j in parts]) for f in fields))


def std_tanh(delta_len: np.ndarray) -> np.ndarray:
    """tanh(delta_len / std(delta_len)) (std with ddof 1, as pandas); 0 where it is undefined
    (one row, or every delta equal)."""
    d = np.asarray(delta_len, float)
    s = float(np.std(d, ddof=1)) if len(d) > 1 else 0.0
    return np.tanh(d / s) if s > 0 else np.zeros_like(d)


class GLMFit(NamedTuple):
    """One model's GLM: logit = theta + phi * tanh(std delta_len) + psi * difficulty."""

    theta: float
    phi: float
    psi: float
    C: float
    raw: float  # mean preference (a tie 0.5)
    lc: float  # mean over instructions of sigmoid(theta + psi * difficulty)
    n: int  # judgements fitted (the model's own)


def _design(j: Judgements, difficulty: Mapping | None, played: float) -> np.ndarray:
    """(N, 3): tanh(std delta_len), difficulty, 1 (the theta column; 0 for gamed rows)."""
    diff = np.zeros(len(j.preference)) if difficulty is None else np.array(
        [difficulty.get(i, 0.0) for i in j.instruction], float)  # fmt: skip
    return np.stack([std_tanh(j.delta_len), diff, np.full(len(diff), played)], 1)


def glm_data(j: Judgements, difficulty: Mapping | None = None, gamed: Judgements | None = None,
             lam: float = LAMBDA):  # fmt: skip
    """(X, y, weight, groups) of one model's fit: its own rows (weight 1) and, with `gamed`,
    each gamed generator's rows (std per generator, weight lam / number of generators, theta
    column 0). Rows without a preference are left out."""
    parts = [(j, 1.0, 1.0)]
    if gamed is not None and len(gamed.preference):
        names = gamed.models()
        parts += [(gamed.take(gamed.model == g), 0.0, lam / len(names)) for g in names]
    X, y, w, groups = [], [], [], []
    for part, played, weight in parts:
        ok = np.isfinite(part.preference)
        X.append(_design(part, difficulty, played)[ok])
        y.append(part.preference[ok])
        w.append(np.full(int(ok.sum()), weight))
        groups += part.instruction[ok].tolist()
    return np.concatenate(X), np.concatenate(y), np.concatenate(w), groups


def fit_glm(j: Judgements, difficulty: Mapping | None = None, gamed: Judgements | None = None,
            lam: float = LAMBDA, C: float | None = None, Cs=CS) -> GLMFit:  # fmt: skip
    """One model's GLM from its judgements `j` (one model only), C by cross-validation unless
    given. LC is the mean of sigmoid(theta + psi * gamma_i) over the model's judgements, as
    AlpacaEval averages its predictions (over instructions when each has as many judgements;
    a bootstrap resample's repeated instructions count as often as they were drawn)."""
    if len(set(j.model.tolist())) > 1:
        raise ValueError(f"fit_glm: one model at a time, got {j.models()}")
    X, y, w, groups = glm_data(j, difficulty, gamed, lam)
    if len(y) == 0:
        raise ValueError("fit_glm: no judgement with a preference")
    C = choose_C(X, y, w, groups, Cs) if C is None else C
    phi, psi, theta = fit_l1_logistic(X, y, C, w)
    ok = np.isfinite(j.preference)
    d = np.array([0.0 if difficulty is None else difficulty.get(i, 0.0)
                  for i in j.instruction[ok]])  # fmt: skip
    lc = float(sigmoid(theta + psi * d).mean())
    return GLMFit(float(theta), float(phi), float(psi), float(C),
                  float(j.preference[ok].mean()), lc, int(ok.sum()))  # fmt: skip


def instruction_difficulty(j: Judgements, Cs=CS) -> dict:
    """gamma_i: the instruction coefficients of AlpacaEval's joint fit on every model,
    logit = theta_m + phi_m * tanh(std_m delta_len) + gamma_i (the first instruction the
    reference level, 0), L1 with C by cross-validation over folds of judgements. Needs two or
    more models."""
    ok = np.isfinite(j.preference)
    j = j.take(ok)
    models = j.models()
    if len(models) < 2:
        raise ValueError("instruction_difficulty needs judgements of two or more models")
    instr = list(dict.fromkeys(j.instruction.tolist()))
    col = {i: k for k, i in enumerate(instr[1:])}
    X = np.zeros((len(j.preference), 2 * len(models) + len(col)))  # (N, 2M + I - 1)
    for m, name in enumerate(models):
        rows = j.model == name
        X[rows, m] = 1.0
        X[rows, len(models) + m] = std_tanh(j.delta_len[rows])
    for r, i in enumerate(j.instruction):
        if i in col:
            X[r, 2 * len(models) + col[i]] = 1.0
    w = np.ones(len(j.preference))
    # folds of single judgements, as AlpacaEval's (GroupKFold over annotation rows): folds of
    # instructions would hold out the very terms being fit, and prefer a C that shrinks them
    C = choose_C(X, j.preference, w, list(range(len(w))), Cs)
    beta = fit_l1_logistic(X, j.preference, C, w)
    return {instr[0]: 0.0} | {i: float(beta[2 * len(models) + k]) for i, k in col.items()}


# ---------------------------------------------------------------------------------------------
# The whole metric, with a bootstrap over instructions


def length_controlled(j: Judgements, difficulty: Mapping | str | None = "joint",
                      gamed: Judgements | None = None, lam: float = LAMBDA,
                      n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:  # fmt: skip
    """model -> {"raw", "lc": (value, lo, hi), "theta", "phi", "psi", "C", "n"} for every model
    of `j`; `difficulty`: "joint" (instruction_difficulty when two or more models, else none),
    None, or a mapping instruction -> gamma. Intervals: percentile bootstrap over instructions
    (one draw of the instructions for every model, gamed rows following theirs), each resample
    refit at the model's C and with gamma fixed, as AlpacaEval fixes both."""
    if isinstance(difficulty, str):
        if difficulty != "joint":
            raise ValueError(f"difficulty must be 'joint', None or a mapping, got {difficulty!r}")
        difficulty = instruction_difficulty(j) if len(j.models()) > 1 else None
    fits = {m: fit_glm(j.take(j.model == m), difficulty, gamed, lam) for m in j.models()}
    instr = list(dict.fromkeys(j.instruction.tolist()))
    rows = {i: [] for i in instr}
    for r, i in enumerate(j.instruction):
        rows[i].append(r)
    g_rows = {i: [] for i in instr}
    if gamed is not None:
        for r, i in enumerate(gamed.instruction):
            g_rows.setdefault(i, []).append(r)
    rng = np.random.default_rng(seed)
    draws = {m: [] for m in fits}
    for _ in range(n_boot):
        pick = [instr[k] for k in rng.integers(0, len(instr), len(instr))]
        sample = j.take(np.array([r for i in pick for r in rows[i]], int))
        g = (
            None
            if gamed is None
            else gamed.take(np.array([r for i in pick for r in g_rows[i]], int))
        )
        for m, fit in fits.items():
            mine = sample.take(sample.model == m)
            if not np.isfinite(mine.preference).any():
                continue
            f = fit_glm(mine, difficulty, g, lam, C=fit.C)
            draws[m].append((f.raw, f.lc))
    a = (1 - level) / 2
    out = {}
    for m, fit in fits.items():
        d = np.array(draws[m]).reshape(-1, 2)
        q = np.quantile(d, [a, 1 - a], axis=0) if len(d) else np.full((2, 2), np.nan)
        out[m] = {"raw": (fit.raw, float(q[0, 0]), float(q[1, 0])),
                  "lc": (fit.lc, float(q[0, 1]), float(q[1, 1])),
                  "theta": fit.theta, "phi": fit.phi, "psi": fit.psi, "C": fit.C, "n": fit.n}  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# AlpacaEval annotation files


def _preference(value, where: str) -> float:
    """AlpacaEval's preference -> P(output_2 preferred): 1 -> 0, 2 -> 1, 0 or 1.5 -> 0.5 (a
    tie), a weighted annotator's float in [1, 2] -> value - 1, null/NaN -> nan (no judgement)."""
    from posttrain.data.schema import DataError

    if value is None:
        return float("nan")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{where}: preference {value!r} is not a number")
    v = float(value)
    if np.isnan(v):
        return v
    if v == 0:
        return 0.5
    if not 1 <= v <= 2:
        raise DataError(f"{where}: preference {value!r} outside 0 or [1, 2]")
    return v - 1


def read_alpaca_eval(path: str | Path, baseline: str | None = None) -> tuple[Judgements, dict]:
    """An AlpacaEval annotations.json (a list of {"instruction", "output_1", "generator_1",
    "output_2", "generator_2", "preference", "annotator"?}) as Judgements against `baseline`
    (default: generator_1 of the first record, AlpacaEval's convention), lengths in characters
    as AlpacaEval counts them. Returns (judgements, info: baseline, annotators, records)."""
    from posttrain.data.schema import DataError

    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"{path}: expected a non-empty JSON list of annotations")
    rows = {"instruction": [], "model": [], "preference": [], "delta_len": []}
    annotators: dict[str, int] = {}
    for n, r in enumerate(records):
        where = f"{path}:record {n}"
        keys = ("instruction", "output_1", "generator_1", "output_2", "generator_2", "preference")
        missing = [k for k in keys if k not in r] if isinstance(r, dict) else list(keys)
        if missing:
            raise DataError(f"{where}: missing {', '.join(missing)}")
        baseline = r["generator_1"] if baseline is None else baseline
        p2 = _preference(r["preference"], where)
        l1, l2 = len(r["output_1"] or ""), len(r["output_2"] or "")
        if r["generator_1"] == baseline:
            model, p, delta = r["generator_2"], p2, l2 - l1
        elif r["generator_2"] == baseline:
            model, p, delta = r["generator_1"], 1 - p2, l1 - l2
        else:
            raise DataError(f"{where}: neither generator is the baseline {baseline!r} "
                            f"({r['generator_1']!r}, {r['generator_2']!r})")  # fmt: skip
        rows["instruction"].append(r["instruction"])
        rows["model"].append(model)
        rows["preference"].append(p)
        rows["delta_len"].append(delta)
        name = str(r.get("annotator", "?"))
        annotators[name] = annotators.get(name, 0) + 1
    info = {"baseline": baseline, "annotators": annotators, "records": len(records)}
    return Judgements(**rows), info


def format_table(results: dict, info: dict) -> str:
    """The command's table: per model n, raw and LC win rates (percent, 95% intervals), phi, C;
    above it `info` (baseline, annotators, and any other key: value)."""
    head = [
        f"baseline: {info['baseline']}",
        "annotator(s): " + ", ".join(f"{a} ({n})" for a, n in info["annotators"].items()),
    ]
    head += [f"{k}: {v}" for k, v in info.items() if k not in ("baseline", "annotators")]
    lines = [*head, "", "| model | n | raw win rate % (95%) | LC win rate % (95%) | phi | C |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for m, r in results.items():
        raw, lc = (f"{100 * r[k][0]:.2f} [{100 * r[k][1]:.2f}, {100 * r[k][2]:.2f}]"
                   for k in ("raw", "lc"))  # fmt: skip
        lines.append(f"| {m} | {r['n']} | {raw} | {lc} | {r['phi']:.3f} | {r['C']:.3g} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# `posttrain data lc-winrate`


def add_parser(data_sub) -> None:
    """The `data lc-winrate` subcommand (posttrain/cli.py adds it under `data`)."""
    p = data_sub.add_parser(
        "lc-winrate",
        help="raw and length-controlled win rates of AlpacaEval-style pairwise judgements",
        description="Raw and length-controlled win rates (Dubois et al. 2404.04475; AlpacaEval "
        "2's GLM) of every model judged against one baseline, with bootstrap intervals over "
        "instructions.",
    )
    p.add_argument("--annotations", nargs="+", required=True, metavar="FILE",
                   help="AlpacaEval annotations.json file(s), one or more models")  # fmt: skip
    p.add_argument("--baseline", default=None,
                   help="the baseline generator (default: generator_1 of the first record)")  # fmt: skip
    p.add_argument("--gamed", nargs="+", default=[], metavar="FILE",
                   help="annotations of the baseline's own outputs made verbose / concise "
                   "against it: regularise to the baseline as length_controlled_v1 does")  # fmt: skip
    p.add_argument("--lambda", dest="lam", type=float, default=LAMBDA,
                   help="weight of the gamed judgements (AlpacaEval: 0.2); needs --gamed")  # fmt: skip
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (0: none)")
    p.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results here")


def main(args) -> int:
    """Run `data lc-winrate`: print the table (and write --json)."""
    if args.lam != LAMBDA and not args.gamed:
        raise ValueError("data lc-winrate: --lambda weighs the --gamed judgements; give them")
    parts, infos = [], []
    for path in args.annotations:
        j, info = read_alpaca_eval(path, args.baseline or (infos[0]["baseline"] if infos else None))
        parts.append(j)
        infos.append(info)
    j, baseline = concat(parts), infos[0]["baseline"]
    gamed = concat([read_alpaca_eval(p, baseline)[0] for p in args.gamed]) if args.gamed else None
    annotators: dict[str, int] = {}
    for info in infos:
        for a, n in info["annotators"].items():
            annotators[a] = annotators.get(a, 0) + n
    many = len(j.models()) > 1
    info = {"baseline": baseline, "annotators": annotators,
            "difficulty": "joint fit on every model" if many else
            "none (one model: a joint fit needs several models' judgements)",
            "regularised to the baseline": f"lambda {args.lam:g}" if gamed is not None else "no"}  # fmt: skip
    results = length_controlled(j, "joint", gamed, args.lam, args.n_boot, args.seed)
    print(format_table(results, info))
    if args.json:
        from posttrain.io import atomic_write_json

        atomic_write_json(args.json, {"info": info, "results": results})
    return 0
