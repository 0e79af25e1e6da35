"""Continual-learning metrics from an accuracy matrix, and router accuracy.

``a[i][j]`` (percent) is the accuracy on task ``j`` after training task ``i``; ``T`` tasks, a ``T x T`` matrix.
Indices below are 0-based, so the final row is ``a[T-1]`` (the paper's ``a[T]``):

- MFT = mean_j a[T-1][j]                         (mean final accuracy)
- MFN = mean_i a[i][i]                           (mean accuracy right after learning each task)
- MAA = mean_i ( mean_{j<=i} a[i][j] )           (mean over stages of the average accuracy on tasks seen)
- BWT = mean_{j<T-1} ( a[T-1][j] - a[j][j] )     (= T/(T-1) * (MFT - MFN); defined as 0.0 when T = 1)
- forgetting f_j = max_{j<=i<T-1} a[i][j] - a[T-1][j] for j < T-1 (Chaudhry et al. 2018: the best accuracy
  task j had at any stage after it was learned and before the last, minus its final accuracy; >= 0 unless
  the task improved). ``mean_forgetting`` is their mean, 0.0 when T = 1.

Entries above the diagonal (``j > i``: tasks not yet trained) are ignored by every formula; they may hold a
number, ``None`` or NaN ("not evaluated"). Entries on and below the diagonal must be finite numbers in
[0, 100]; anything else is a ``ValueError`` naming the entry.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class CLMetrics:
    """CL metrics of one method on one stream; all values in percent (points for BWT and forgetting)."""

    num_tasks: int
    """T, the number of tasks (rows and columns of the matrix)."""
    mft: float
    """Mean final accuracy: mean of the last row."""
    mfn: float
    """Mean accuracy on each task right after learning it: mean of the diagonal."""
    maa: float
    """Mean over stages i of the mean accuracy on tasks 0..i."""
    bwt: float
    """Backward transfer: mean over j < T-1 of (final - just-learned accuracy); 0.0 when T = 1."""
    forgetting: tuple[float, ...]
    """f_j for j < T-1 (length T-1): max accuracy over stages j..T-2 minus final accuracy."""
    mean_forgetting: float
    """Mean of ``forgetting``; 0.0 when T = 1."""

    def to_dict(self, tasks: Sequence[str] | None = None) -> dict[str, Any]:
        """``{"MFT", "MFN", "MAA", "BWT", "forgetting", "mean_forgetting", "num_tasks"}``.

        With ``tasks`` (the T task names in stream order) ``forgetting`` is ``{task: f}`` for all but the last
        task; without, a list in stream order.
        """
        if tasks is not None and len(tasks) != self.num_tasks:
            raise ValueError(f"got {len(tasks)} task names for {self.num_tasks} tasks")
        d = asdict(self)
        forgetting: Any = list(self.forgetting)
        if tasks is not None:
            forgetting = dict(zip(tasks[:-1], self.forgetting))
        return {"MFT": d["mft"], "MFN": d["mfn"], "MAA": d["maa"], "BWT": d["bwt"], "forgetting": forgetting,
                "mean_forgetting": d["mean_forgetting"], "num_tasks": d["num_tasks"]}


def _validated(matrix: Sequence[Sequence[Any]]) -> list[list[float]]:
    """The matrix as floats (NaN above the diagonal where absent); raises ``ValueError`` on bad shape/values."""
    try:
        rows = [list(r) for r in matrix]
    except TypeError:
        raise ValueError("accuracy matrix must be a sequence of rows (T x T)") from None
    t = len(rows)
    if t == 0:
        raise ValueError("accuracy matrix is empty (T = 0); need at least one task")
    out: list[list[float]] = []
    for i, row in enumerate(rows):
        if len(row) != t:
            raise ValueError(f"accuracy matrix must be square (T x T with T = {t}); row {i} has {len(row)} entries")
        vals: list[float] = []
        for j, v in enumerate(row):
            if j > i and (v is None or (isinstance(v, float) and math.isnan(v))):
                vals.append(math.nan)  # not-yet-trained task: ignored by every formula
                continue
            if isinstance(v, bool) or v is None:
                raise ValueError(f"accuracy matrix entry [{i}][{j}] must be a number, got {v!r}")
            try:
                x = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"accuracy matrix entry [{i}][{j}] must be a number, got {v!r}") from None
            if j <= i and not math.isfinite(x):
                raise ValueError(f"accuracy matrix entry [{i}][{j}] is {x}; entries with j <= i must be finite")
            if j <= i and not 0.0 <= x <= 100.0:
                raise ValueError(f"accuracy matrix entry [{i}][{j}] = {x} is outside [0, 100] (percent expected)")
            vals.append(x)
        out.append(vals)
    return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def compute_cl_metrics(matrix: Sequence[Sequence[Any]]) -> CLMetrics:
    """MFT, MFN, MAA, BWT and per-task forgetting from a ``T x T`` accuracy matrix (percent).

    ``matrix[i][j]``: accuracy on task j after training task i. Entries with ``j > i`` are ignored.
    Raises ``ValueError`` for T = 0, a non-square matrix, or a non-finite / out-of-range entry with j <= i.
    """
    a = _validated(matrix)
    t = len(a)
    last = a[t - 1]
    mft = _mean(last)
    mfn = _mean([a[i][i] for i in range(t)])
    maa = _mean([_mean(a[i][: i + 1]) for i in range(t)])
    if t == 1:
        return CLMetrics(num_tasks=1, mft=mft, mfn=mfn, maa=maa, bwt=0.0, forgetting=(), mean_forgetting=0.0)
    bwt = _mean([last[j] - a[j][j] for j in range(t - 1)])
    forgetting = tuple(max(a[i][j] for i in range(j, t - 1)) - last[j] for j in range(t - 1))
    return CLMetrics(num_tasks=t, mft=mft, mfn=mfn, maa=maa, bwt=bwt, forgetting=forgetting,
                     mean_forgetting=_mean(forgetting))


def router_accuracy(routed: Sequence[str], truth: Sequence[str]) -> float:
    """Percent of requests routed to their true expert: ``100 * mean(routed[k] == truth[k])``.

    For one task's test set ``truth`` is that task's expert id repeated, which gives the paper's per-task
    router accuracy. Raises ``ValueError`` on empty or unequal-length inputs.
    """
    if len(routed) != len(truth):
        raise ValueError(f"routed has {len(routed)} entries but truth has {len(truth)}")
    if not truth:
        raise ValueError("router accuracy of zero requests is undefined")
    return 100.0 * sum(r == g for r, g in zip(routed, truth)) / len(truth)


def router_accuracy_per_task(routed: Sequence[str], truth: Sequence[str]) -> dict[str, float]:
    """``{task: router accuracy over the requests whose true expert is task}``, tasks in first-seen order."""
    if len(routed) != len(truth):
        raise ValueError(f"routed has {len(routed)} entries but truth has {len(truth)}")
    groups: dict[str, list[str]] = {}
    for r, g in zip(routed, truth):
        groups.setdefault(g, []).append(r)
    return {g: router_accuracy(rs, [g] * len(rs)) for g, rs in groups.items()}
