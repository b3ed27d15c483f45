"""The KL-regularised optimum over a finite response set, its reward-KL frontier, and a
bootstrap that resamples once for many figures. Pure numpy.

Rows are prompts, columns responses: `ref` (N, Y) holds pi_ref(y|x) over each prompt's
responses (a prompt with fewer responses has zeros past its own, which no formula here counts),
`rewards` (N, Y) holds r(x, y). The optimum of E_pi[r] - beta KL(pi || pi_ref) on one prompt is
pi*(y) = pi_ref(y) exp(lam r(y)) / Z with lam = 1 / beta, and

    KL(pi* || pi_ref) = lam E_pi*[r] - log Z,    dE_pi*[r] / dlam = Var_pi*(r) >= 0,
    dKL / dlam = lam Var_pi*(r) >= 0,

so both rise with lam, and with one lam for every prompt the weighted means (E[r], KL) trace
the frontier: the highest mean reward of any policy at that mean KL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from posttrain.lab.stats import Estimate

LAM_MAX = 2.0**40  # beyond this pi* is the argmax to float precision


def tilt(ref: np.ndarray, rewards: np.ndarray, lam) -> tuple[np.ndarray, np.ndarray]:
    """pi* ∝ ref exp(lam r) over the last axis, and log Z.

    ref, rewards: (N, Y); lam: a number or an array broadcasting against (N, Y), e.g. (B, 1, 1).
    Returns pi* (..., N, Y) and log Z (..., N); responses with ref 0 get 0."""
    with np.errstate(divide="ignore"):
        logits = np.log(ref) + lam * rewards  # (..., N, Y); -inf where ref is 0
    top = logits.max(-1, keepdims=True)
    e = np.exp(logits - top)
    z = e.sum(-1, keepdims=True)
    return e / z, (top + np.log(z))[..., 0]


def kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) of each row over the last axis, 0 log 0 = 0 (inf where q is 0 and p is not)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return terms.sum(-1)


def limit(ref: np.ndarray, rewards: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """The frontier's end (lam -> inf): pi_ref restricted to each prompt's best responses.
    Returns (mean reward, mean KL) = (mean of max r, mean of -log pi_ref(best))."""
    best = np.where(ref > 0, rewards, -np.inf).max(-1, keepdims=True)  # (N, 1)
    mass = np.where((ref > 0) & (rewards >= best), ref, 0.0).sum(-1)  # (N,)
    return float(weights @ best[:, 0]), float(weights @ -np.log(mass))


def _mean_point(ref, rewards, lam: np.ndarray, weights) -> tuple[np.ndarray, ...]:
    """(J,) lambdas -> (J,) weighted means of pi*'s reward, its KL and dKL/dlam."""
    star, log_z = tilt(ref, rewards, lam[:, None, None])  # (J, N, Y), (J, N)
    star_r = (star * rewards).sum(-1)  # (J, N)
    var = (star * rewards**2).sum(-1) - star_r**2  # (J, N)
    kl = lam[:, None] * star_r - log_z  # (J, N)
    return star_r @ weights, kl @ weights, lam * (var @ weights)


def frontier_lambda(
    ref: np.ndarray, rewards: np.ndarray, kl, weights: np.ndarray | None = None, iters: int = 100
) -> np.ndarray:
    """The lam = 1/beta whose pi* has mean KL `kl` (a number or (J,)): 0 at kl <= 0, inf at or
    past the frontier's end, nan for nan. Newton's method on KL(lam) = kl inside a bracket that
    bisection takes over whenever a Newton step would leave it."""
    kl = np.atleast_1d(np.asarray(kl, float))  # (J,)
    w = np.full(len(ref), 1 / len(ref)) if weights is None else np.asarray(weights, float)
    kl_end = limit(ref, rewards, w)[1]
    inside = (kl > 0) & (kl < kl_end)  # (nan is neither)
    lo, hi = np.zeros_like(kl), np.ones_like(kl)
    while True:  # grow hi until it brackets kl
        short = inside & (_mean_point(ref, rewards, hi, w)[1] < kl) & (hi < LAM_MAX)
        if not short.any():
            break
        lo, hi = np.where(short, hi, lo), np.where(short, 2 * hi, hi)
    lam = (lo + hi) / 2
    for _ in range(iters):
        _, k, slope = _mean_point(ref, rewards, lam, w)
        err = np.where(inside, k - kl, 0.0)
        if np.all(np.abs(err) <= 1e-13 * np.maximum(kl_end, 1e-300)):
            break
        lo, hi = np.where(err < 0, lam, lo), np.where(err > 0, lam, hi)
        with np.errstate(divide="ignore", invalid="ignore"):
            step = lam - err / slope
        ok = np.isfinite(step) & (step > lo) & (step < hi)
        lam = np.where(ok, step, (lo + hi) / 2)
    out = np.where(inside, lam, np.where(kl <= 0, 0.0, np.inf))
    return np.where(np.isnan(kl), np.nan, out)


def frontier_reward_at(
    ref: np.ndarray, rewards: np.ndarray, kl, weights: np.ndarray | None = None
) -> np.ndarray:
    """The frontier's mean reward at mean KL `kl` (a number or (J,)): E[r] of pi* at
    frontier_lambda, so pi_ref's reward at kl <= 0 and every prompt's best reward at or past
    the frontier's end."""
    w = np.full(len(ref), 1 / len(ref)) if weights is None else np.asarray(weights, float)
    lam = frontier_lambda(ref, rewards, kl, w)
    finite = np.isfinite(lam)
    reward = _mean_point(ref, rewards, np.where(finite, lam, 0.0), w)[0]
    return np.where(np.isinf(lam), limit(ref, rewards, w)[0], np.where(finite, reward, np.nan))


def joint_bootstrap(
    stat: Callable[[list[np.ndarray]], dict[str, float]],
    groups: Sequence[np.ndarray],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Estimate]:
    """stats.bootstrap for a statistic with many named figures: each resample of items within
    groups (seeds) is drawn once, as stats.bootstrap draws it, and serves every figure. A
    figure not finite on more than a tenth of the resamples gets the interval (nan, nan);
    n_boot=0 gives values only (intervals nan)."""
    groups = [np.asarray(g) for g in groups]
    value = stat(groups)
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in value}
    for _ in range(n_boot):
        got = stat([g[rng.integers(0, len(g), len(g))] for g in groups])
        for k in value:
            draws[k].append(got[k])
    a = (1 - level) / 2
    out = {}
    for k, v in value.items():
        d = np.asarray(draws[k], float)
        finite = d[np.isfinite(d)]
        if n_boot == 0 or len(finite) < 0.9 * n_boot:
            out[k] = Estimate(float(v), float("nan"), float("nan"))
        else:
            lo, hi = np.quantile(finite, [a, 1 - a])
            out[k] = Estimate(float(v), float(lo), float(hi))
    return out
