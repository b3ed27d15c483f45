"""The lab's statistics: bootstrap intervals pooled over seeds, and the curve fits of Gao et al.

Every figure of an experiment is a function of per-item measurements (one value per held-out
prompt, per seed). Its 95% interval is a percentile bootstrap that resamples the items within
each seed (a stratified bootstrap: every seed keeps its item count), so the pooled interval
reflects both the prompt sample and the seeds' spread, and the figure is recomputed from each
resample exactly as from the data (curves, fits, peaks, differences).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

N_BOOT = 1000


class Estimate(NamedTuple):
    """A figure with its percentile-bootstrap interval."""

    value: float
    lo: float
    hi: float

    def as_dict(self) -> dict:
        return {"value": self.value, "lo": self.lo, "hi": self.hi}


def bootstrap(
    stat: Callable[[list[np.ndarray]], float],
    groups: Sequence[np.ndarray],
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = 0.95,
) -> Estimate:
    """`stat(groups)` with a stratified percentile-bootstrap interval.

    groups: one array per seed whose first axis indexes items (prompts); each resample draws
    that many items with replacement from each group independently and re-applies `stat`.
    Resamples on which `stat` is not finite (a fit that does not exist) are left out; if more
    than a tenth are, the interval is (nan, nan), said as such rather than narrowed.
    """
    groups = [np.asarray(g) for g in groups]
    value = float(stat(groups))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        sample = [g[rng.integers(0, len(g), len(g))] for g in groups]
        draws.append(float(stat(sample)))
    draws = np.asarray(draws)
    finite = draws[np.isfinite(draws)]
    if len(finite) < 0.9 * n_boot:
        return Estimate(value, float("nan"), float("nan"))
    a = (1 - level) / 2
    lo, hi = np.quantile(finite, [a, 1 - a])
    return Estimate(value, float(lo), float(hi))


def mean_estimate(groups: Sequence[Sequence[float]], seed: int = 0) -> Estimate:
    """The pooled mean over seeds (each seed's mean weighted equally), with its interval."""
    return bootstrap(
        lambda gs: float(np.mean([g.mean() for g in gs])),
        [np.asarray(g, float) for g in groups],
        seed=seed,
    )


class Fit(NamedTuple):
    """y = a * f1(x) + b * f2(x), least squares through the origin, with R^2 about y's mean."""

    alpha: float
    beta: float
    r2: float


def _fit_through_origin(features: np.ndarray, y: np.ndarray) -> Fit:
    coef, *_ = np.linalg.lstsq(features, y, rcond=None)
    resid = y - features @ coef
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    return Fit(float(coef[0]), float(coef[1]), r2)


def fit_bon(d: Sequence[float], gain: Sequence[float]) -> Fit:
    """Gao et al. (2210.10760) best-of-n form: gain(d) = d (alpha - beta d), d = sqrt(KL).

    `gain` is the gold score minus the initial policy's (the form is 0 at d = 0)."""
    d, y = np.asarray(d, float), np.asarray(gain, float)
    return _fit_through_origin(np.stack([d, -(d**2)], 1), y)


def fit_rl(d: Sequence[float], gain: Sequence[float]) -> Fit:
    """Gao et al. RL form: gain(d) = d (alpha - beta log d); points at d = 0 contribute 0."""
    d, y = np.asarray(d, float), np.asarray(gain, float)
    dlogd = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
    return _fit_through_origin(np.stack([d, -dlogd], 1), y)


def bon_peak(fit: Fit) -> float:
    """d* = alpha / (2 beta), where d (alpha - beta d) is highest (inf when beta <= 0)."""
    return fit.alpha / (2 * fit.beta) if fit.beta > 0 else float("inf")


def rl_peak(fit: Fit) -> float:
    """d* where d (alpha - beta log d) is highest: alpha - beta (log d + 1) = 0."""
    return float(np.exp(fit.alpha / fit.beta - 1)) if fit.beta > 0 else float("inf")


def error_bars(ests: Sequence[Estimate]) -> np.ndarray:
    """(2, n) matplotlib error bars (below, above) of estimates; a missing interval draws none."""
    below = [e.value - e.lo for e in ests]
    above = [e.hi - e.value for e in ests]
    return np.nan_to_num(np.array([below, above], float)).clip(min=0)
