"""L1-regularised logistic regression on soft labels, with the regularisation strength chosen by
cross-validated log loss over groups (sklearn's LogisticRegressionCV with penalty="l1", as
AlpacaEval's length-controlled GLM uses it), in numpy alone.

The solver is a proximal Newton method (as newGLMNET, liblinear's L1 solver): a quadratic model
of the log loss per outer step, minimised exactly with the L1 term by feature-sign search (an
active-set method), then a backtracking line search on the true objective.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CS = np.logspace(-4, 4, 10)  # sklearn LogisticRegressionCV(Cs=10)
N_SPLITS = 5  # AlpacaEval's GLM_INFO kwargs
DEFAULT_C = 100.0  # AlpacaEval's C when there is nothing to cross-validate on


# ---------------------------------------------------------------------------------------------
# L1-regularised logistic regression on soft labels


def sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def logloss(X: np.ndarray, y: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Per-row soft-label log loss -y log p - (1 - y) log(1 - p), p = sigmoid(X beta). (N,)"""
    z = X @ beta
    return np.logaddexp(0.0, z) - y * z


def l1_objective(X, y, beta, C: float, weight=None) -> float:
    """||beta||_1 + C * sum_i w_i * logloss_i (liblinear's L1 logistic objective)."""
    w = np.ones(len(y)) if weight is None else weight
    return float(np.abs(beta).sum() + C * (w * logloss(X, y, beta)).sum())


def _segment_best(H, c, v, A, new_A) -> np.ndarray:
    """The lowest point of 1/2 v'Hv + c'v + ||v||_1 on the segment from v to v with v[A] =
    new_A, checked at its end and where a coefficient of A crosses zero (the objective is a
    convex quadratic between crossings)."""
    cur = v[A]
    ts = [1.0] + [float(a / (a - b)) for a, b in zip(cur, new_A, strict=True) if a * b < 0]
    best, best_f = v, np.inf
    for t in sorted(ts):
        u = v.copy()
        u[A] = cur + t * (new_A - cur)
        u[A[np.abs(u[A]) <= 1e-15 * (1 + np.abs(cur))]] = 0.0  # the crossing coordinate
        f = 0.5 * u @ H @ u + c @ u + np.abs(u).sum()
        if f < best_f:
            best, best_f = u, f
    return best


def l1_quadratic(H, c, v, max_steps: int | None = None) -> np.ndarray:
    """argmin_v 1/2 v'Hv + c'v + ||v||_1, H (P, P) positive semi-definite, from `v`, by
    feature-sign search (Lee et al. 2007, "Efficient sparse coding algorithms"): on the current
    signs the minimiser is one linear solve; a line search to it keeps the objective falling
    and drops coefficients that cross zero; a zero coefficient whose gradient exceeds 1 in
    size joins with the sign that lowers the objective. Exact in finitely many steps, and
    unhurt by near-collinear columns, which make coordinate descent crawl."""
    v = np.asarray(v, float).copy()
    tol = 1e-9 * (1.0 + float(np.abs(c).max()))
    theta = np.sign(v)
    for _ in range(max_steps or 20 * len(v) + 100):
        grad = H @ v + c
        on = v != 0
        if not on.any() or np.abs(grad[on] + theta[on]).max() <= tol:  # optimal on the support
            viol = np.where(on, 0.0, np.abs(grad))
            viol[np.diag(H) <= 0] = 0.0  # a zero column stays 0
            j = int(np.argmax(viol))
            if viol[j] <= 1.0 + tol:
                return v
            theta[j] = -np.sign(grad[j])
        A = np.flatnonzero(theta)
        new_A = np.linalg.lstsq(H[np.ix_(A, A)], -(c[A] + theta[A]), rcond=None)[0]
        v = _segment_best(H, c, v, A, new_A)
        theta = np.sign(v)
    return v


def kkt_residual(g: np.ndarray, beta: np.ndarray) -> float:
    """How far beta is from optimal, in units of the L1 weight: |g_j + sign(beta_j)| where
    beta_j != 0, max(|g_j| - 1, 0) where beta_j = 0 (g: the smooth part's gradient)."""
    on = beta != 0
    r = np.where(on, np.abs(g + np.sign(beta)), np.maximum(np.abs(g) - 1.0, 0.0))
    return float(r.max()) if len(r) else 0.0


def fit_l1_logistic(X, y, C: float, weight=None, beta=None, tol: float = 1e-7,
                    max_iter: int = 100) -> np.ndarray:  # fmt: skip
    """argmin_beta ||beta||_1 + C * sum_i w_i [log(1 + e^{z_i}) - y_i z_i], z = X beta.

    X (N, P) features (no intercept is added), y (N,) soft labels in [0, 1], weight (N,) >= 0.
    At the optimum g = C * X' (w * (p - y)) satisfies g_j = -sign(beta_j) where beta_j != 0 and
    |g_j| <= 1 where beta_j = 0; it stops when `kkt_residual` is below tol."""
    X, y = np.asarray(X, float), np.asarray(y, float)
    w = np.ones(len(y)) if weight is None else np.asarray(weight, float)
    b = np.zeros(X.shape[1]) if beta is None else np.asarray(beta, float).copy()
    f = l1_objective(X, y, b, C, w)
    for _ in range(max_iter):
        p = sigmoid(X @ b)  # (N,)
        g = C * X.T @ (w * (p - y))  # (P,) gradient of the smooth part
        if kkt_residual(g, b) <= tol:
            break
        h = C * w * np.maximum(p * (1 - p), 1e-12)  # (N,) its curvature per row
        H = (X.T * h) @ X  # (P, P)
        d = l1_quadratic(H, g - H @ b, b) - b  # the Newton step
        decrease = float(g @ d + np.abs(b + d).sum() - np.abs(b).sum())  # <= 0
        if decrease >= 0:  # no descent left at floating-point precision
            break
        t = 1.0
        while True:  # Armijo backtracking on the true objective
            f_new = l1_objective(X, y, b + t * d, C, w)
            if f_new <= f + 0.01 * t * decrease or t < 1e-10:
                break
            t /= 2
        if f_new > f:
            break
        b, f = b + t * d, f_new
    return b


def folds_by_group(groups: Sequence, n_splits: int) -> np.ndarray:
    """(N,) fold of every row: the distinct groups in order of first appearance, round-robin."""
    first: dict = {}
    for g in groups:
        first.setdefault(g, len(first))
    return np.array([first[g] % n_splits for g in groups])


def choose_C(X, y, weight, groups, Cs=CS, n_splits: int = N_SPLITS) -> float:
    """The C of `Cs` with the lowest mean held-out weighted log loss over folds grouped by
    `groups` (LogisticRegressionCV's rule: the first best, i.e. the strongest regularisation
    among ties); DEFAULT_C when there are fewer than two groups."""
    X, y, w = np.asarray(X, float), np.asarray(y, float), np.asarray(weight, float)
    k = min(n_splits, len(set(groups)))
    if k < 2:
        return DEFAULT_C
    fold = folds_by_group(groups, k)
    losses = np.zeros(len(Cs))
    for f in range(k):
        train, test = fold != f, fold == f
        beta = None
        for c, C in enumerate(Cs):  # warm start along the path, as sklearn does
            beta = fit_l1_logistic(X[train], y[train], C, w[train], beta)
            losses[c] += float(np.mean(w[test] * logloss(X[test], y[test], beta))) / k
    return float(Cs[int(np.argmin(losses))])
