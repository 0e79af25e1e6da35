"""Per-item scores and routes of a finished run, read back from its prediction files.

Every CL metric is a linear function of the accuracy matrix, whose entry ``a[i][j]`` is the mean score of task
``j``'s test items after stage ``i``; so each metric is a sum over tasks of the mean of a per-item value
``v = sum_i w[i][j] * score_i(item)`` (the item's scores at the stages the metric reads, weighted as the metric
weighs them, :func:`metric_weights`). These values are what the study's bootstrap resamples and its paired test
flips. Scores are recomputed from each prediction's text with the item's own scorer, and checked against the
run's ``metrics.json``: a prediction file that does not reproduce the recorded matrix is an error, never a number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cl_service.data.schema import Sample
from cl_service.eval.confusion import prediction_path
from cl_service.eval.predictions import read_predictions
from cl_service.eval.scorers import SCORERS

METRICS = ("MFT", "MFN", "MAA", "BWT", "router_acc")
"""The metrics a study reports: those of :mod:`cl_service.eval.metrics` and the mean final router accuracy."""
_TOL = 1e-6


def metric_weights(metric: str, t: int) -> np.ndarray:
    """``w[i][j]`` with ``metric = sum_ij w[i][j] * a[i][j]`` for a ``t x t`` accuracy matrix (stage i, position j)."""
    w = np.zeros((t, t))
    if metric == "MFT":
        w[t - 1, :] = 1.0 / t
    elif metric == "MFN":
        w[np.arange(t), np.arange(t)] = 1.0 / t
    elif metric == "MAA":
        for i in range(t):
            w[i, : i + 1] = 1.0 / (t * (i + 1))
    elif metric == "BWT":
        for j in range(t - 1):
            w[t - 1, j] += 1.0 / (t - 1)
            w[j, j] -= 1.0 / (t - 1)
    else:
        raise ValueError(f"unknown metric {metric!r}; known: {list(METRICS[:4])}")
    return w


@dataclass
class RunItems:
    """One method's per-item results in one run."""

    tasks: list[str]
    """The run's stream, in the order it was learned."""
    scores: dict[tuple[int, str], dict[str, float]]
    """``(stage, task) -> {question id: score in percent}`` for every evaluated entry on or below the diagonal."""
    routes: dict[str, dict[str, str | None]] | None
    """Routed methods: ``task -> {question id: expert it was routed to}`` after the last stage."""
    metrics: dict[str, Any]
    """The method's entry of the run's ``metrics.json``."""


def load_test_items(ds: Any, tasks: Sequence[str]) -> dict[str, dict[str, Sample]]:
    """``task -> {id: test sample}`` of a :class:`~cl_service.data.shards.ShardDataset`."""
    return {t: {s.id: s for s in ds.samples(t, "test")} for t in tasks}


def _score(sample: Sample, text: str) -> float:
    return 100.0 * SCORERS.get(sample.scorer)(text, sample.answers, sample.question, sample.metadata)


def load_run_items(run_dir: str | Path, method: str, samples: dict[str, dict[str, Sample]]) -> RunItems:
    """Read ``method``'s predictions of every entry on or below the diagonal (and its final routes), rescored
    against ``samples``; raises ``ValueError`` when they do not give the matrix of ``metrics.json``."""
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    tasks = list(metrics["tasks"])
    entry = metrics["methods"][method]
    matrix = entry["matrix"]
    scores: dict[tuple[int, str], dict[str, float]] = {}
    for i in range(len(tasks)):
        for j in range(i + 1):
            if matrix[i][j] is None:
                continue
            t = tasks[j]
            got = {}
            for p in read_predictions(prediction_path(run_dir, method, i, tasks, t)):
                s = samples[t].get(p["question_id"])
                if s is None:
                    raise ValueError(f"{run_dir}: {method} answered {p['question_id']!r}, not a test item of {t}")
                got[p["question_id"]] = _score(s, p["text"])
            mean = sum(got.values()) / max(1, len(got))
            if abs(mean - matrix[i][j]) > _TOL:
                raise ValueError(f"{run_dir}: {method}'s predictions after stage {i + 1} score {mean:.4f} on {t}, "
                                 f"metrics.json says {matrix[i][j]:.4f}")
            scores[(i, t)] = got
    routes = None
    if entry.get("router_accuracy"):
        last = len(tasks) - 1
        routes = {t: {p["question_id"]: (p.get("metadata") or {}).get("expert")
                      for p in read_predictions(prediction_path(run_dir, method, last, tasks, t))} for t in tasks}
    return RunItems(tasks, scores, routes, entry)


def item_values(items: RunItems, metric: str) -> dict[str, dict[str, float]] | None:
    """``task -> {question id: per-item value}`` whose per-task means sum to ``metric``'s value; None when the run
    has no value of it (``joint`` evaluates only the last stage; router accuracy of an unrouted method)."""
    t = len(items.tasks)
    if metric == "router_acc":
        if items.routes is None:
            return None
        return {task: {q: (100.0 / t) * (e == task) for q, e in r.items()} for task, r in items.routes.items()}
    if items.metrics.get(metric) is None:
        return None
    w = metric_weights(metric, t)
    out: dict[str, dict[str, float]] = {}
    for j, task in enumerate(items.tasks):
        # every item of the task, also where the metric gives it no weight (BWT: the last task): 0 there
        ids = next((sc for (i, tk), sc in items.scores.items() if tk == task), {})
        vals: dict[str, float] = {q: 0.0 for q in ids}
        for i in range(t):
            if w[i, j] == 0.0:
                continue
            sc = items.scores.get((i, task))
            if sc is None:
                return None
            for q, v in sc.items():
                vals[q] = vals.get(q, 0.0) + w[i, j] * v
        out[task] = vals
    return out


def value_of(values: dict[str, dict[str, float]]) -> float:
    """The metric the per-item values describe: the sum over tasks of their means."""
    return sum(sum(v.values()) / len(v) for v in values.values() if v)
