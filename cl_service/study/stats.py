"""Intervals and paired tests of a study (numpy only; checked against scipy in tests/unit/study/test_stats.py).

- :func:`t_interval`: mean ± t(1 - (1 - level)/2, n - 1) · s / sqrt(n) over per-cell values (n >= 2), with the
  Student t quantile computed here (:func:`t_quantile`, through the regularised incomplete beta function).
- :func:`item_bootstrap`: the percentile bootstrap of a sum over tasks of per-item means, items resampled with
  replacement within each task, the same draw for every cell that holds the same items (so cells that answered
  the same items move together, as do the stages of one cell: a per-item value already sums its stages).
- :func:`sign_flip_test`: a paired test over units (cell x item): under the null hypothesis that the two methods
  are exchangeable on every unit, each unit's difference is as likely negated; the two-sided p-value is the share of
  random sign flips whose |sum| reaches the observed one (Monte Carlo, counting the observed statistic itself).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 2000
PERMUTATIONS = 10000


@dataclass(frozen=True)
class Interval:
    """A mean with its confidence interval and how it was computed."""

    mean: float
    low: float
    high: float
    n: int
    """Cells the mean is taken over."""
    method: str
    """How the interval was computed, in words."""

    def to_dict(self) -> dict:
        return asdict(self)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean of ``values`` (one per cell) with the two-sided Student t interval; needs at least two values."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n < 2:
        raise ValueError(f"a t interval needs at least 2 values, got {n}")
    mean = float(x.mean())
    half = t_quantile(1.0 - (1.0 - level) / 2.0, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n,
                    f"t interval over {n} cells ({level:.0%}, t with {n - 1} df)")


Blocks = Sequence[Sequence[np.ndarray]]
"""Per task, blocks of cells that answered the same items: each block an array ``[cells, items]`` of per-item
values (one row per cell, the same item in each column)."""


def _total_cells(tasks: Blocks) -> int:
    counts = {sum(b.shape[0] for b in blocks) for blocks in tasks}
    if len(counts) != 1:
        raise ValueError(f"every task must hold the same cells, got {sorted(counts)} cells")
    return counts.pop()


def point(tasks: Blocks) -> float:
    """The mean over cells of the sum over tasks of the mean per-item value: the metric the blocks describe."""
    c = _total_cells(tasks)
    return float(sum(b.mean(axis=1).sum() for blocks in tasks for b in blocks) / c)


def item_bootstrap(tasks: Blocks, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> np.ndarray:
    """``resamples`` bootstrap replicates of :func:`point`: each task's items resampled with replacement, one
    draw per block (shared by the block's cells)."""
    c = _total_cells(tasks)
    rng = np.random.default_rng(seed)
    reps = np.zeros(resamples)
    for blocks in tasks:
        for b in blocks:
            n = b.shape[1]
            if n == 0:
                raise ValueError("a task without items cannot be resampled")
            idx = rng.integers(0, n, size=(resamples, n))
            reps += b[:, idx].mean(axis=2).sum(axis=0) / c  # [cells, resamples, items] -> [resamples]
    return reps


def percentile_interval(reps: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates (numpy's linear interpolation between order statistics)."""
    a = (1.0 - level) / 2.0
    lo, hi = np.percentile(reps, [100 * a, 100 * (1 - a)])
    return float(lo), float(hi)


def bootstrap_interval(tasks: Blocks, level: float = LEVEL, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0) -> Interval:
    """:func:`point` with its percentile bootstrap interval over test items (:func:`item_bootstrap`)."""
    lo, hi = percentile_interval(item_bootstrap(tasks, resamples, seed), level)
    n = _total_cells(tasks)
    return Interval(point(tasks), lo, hi, n,
                    f"percentile bootstrap over test items ({level:.0%}, {resamples} resamples; items resampled "
                    f"within each task, the same draw for every cell and stage that answered them; {n} cell(s))")


def interval(per_cell: Sequence[float], tasks: Blocks | None, level: float = LEVEL, min_cells: int = 3,
             seed: int = 0) -> Interval:
    """The study's rule: a t interval across cells when there are at least ``min_cells``; else the bootstrap
    over the test items inside the cells (``tasks``; None: no interval, the mean alone)."""
    if len(per_cell) >= min_cells:
        return t_interval(per_cell, level)
    if tasks is not None:
        return bootstrap_interval(tasks, level, seed=seed)
    m = float(np.mean(per_cell))
    return Interval(m, math.nan, math.nan, len(per_cell), "no interval: too few cells and no per-item values")


def sign_flip_test(units: np.ndarray, permutations: int = PERMUTATIONS, seed: int = 0) -> float:
    """Two-sided p-value of ``sum(units) = 0`` by random sign flips of the units (each unit: one cell x item's
    weighted difference between two methods); ``(1 + #{|flipped sum| >= |observed|}) / (1 + permutations)``."""
    u = np.asarray(units, dtype=float).ravel()
    u = u[u != 0.0]  # a zero difference flips to itself
    observed = abs(float(u.sum()))
    if observed == 0.0:
        return 1.0
    rng = np.random.default_rng(seed)
    hits, chunk = 0, max(1, min(permutations, 4_000_000 // max(1, len(u))))
    done = 0
    tol = 1e-12 * max(1.0, float(np.abs(u).sum()))  # flips that equal the observed sum up to rounding count
    while done < permutations:
        k = min(chunk, permutations - done)
        signs = rng.integers(0, 2, size=(k, len(u)), dtype=np.int8) * 2 - 1
        hits += int((np.abs(signs @ u) >= observed - tol).sum())
        done += k
    return (1 + hits) / (1 + permutations)
