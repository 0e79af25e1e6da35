"""A study's numbers (``study.json``): metrics with intervals, paired comparisons, order effects, routing.

Built from the finished cells' run folders only (``metrics.json`` and the prediction files), so it is the same
whether the study ran in one go or was resumed, and it can be rebuilt any time.

- Per method and metric: the mean over cells with a 95% interval — a t interval across cells when there are at
  least 3, else the percentile bootstrap over the test items inside the cells (:mod:`cl_service.study.stats`).
- Paired comparisons of every two methods on the same cells and items: the mean difference with its interval (the
  same rule, on per-cell differences or per-item differences), the item bootstrap interval of the difference (what
  the test items alone make uncertain), and the p-value of a sign-flip permutation test over cells x items. The
  t interval asks whether the difference holds across orders and seeds; the item interval and the test whether it
  holds on these cells' items: a difference that changes with the order can be clear on the items of every cell
  and still have a t interval across cells that spans 0.
- Order effects: each task's final accuracy by the position it was learned at; each metric's spread across orders.
- Routing: the confusion matrices of the routed methods summed over cells, per stage; the accuracy matrix by
  position (stage i, i-th learned task j) as mean and standard deviation over cells.
"""

from __future__ import annotations

import itertools
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cl_service.study.items import METRICS, RunItems, item_values, load_run_items, value_of
from cl_service.study.plan import Cell, cell_dir
from cl_service.study.stats import LEVEL, bootstrap_interval, interval, sign_flip_test

_TOL = 1e-6


def _blocks(cells: Sequence[dict[str, dict[str, float]]]) -> list[list[np.ndarray]]:
    """Per task, the cells' per-item values grouped by the items they hold (:data:`cl_service.study.stats.Blocks`)."""
    tasks = list(cells[0])
    out = []
    for t in tasks:
        groups: dict[tuple[str, ...], list[list[float]]] = {}
        for c in cells:
            ids = tuple(sorted(c[t]))
            groups.setdefault(ids, []).append([c[t][q] for q in ids])
        out.append([np.array(rows, dtype=float) for rows in groups.values()])
    return out


def _recorded(items: RunItems, metric: str) -> float | None:
    if metric == "router_acc":
        ra = items.metrics.get("router_accuracy") or {}
        return sum(ra.values()) / len(ra) if ra else None
    return items.metrics.get(metric)


def method_intervals(runs: dict[str, RunItems], level: float = LEVEL) -> dict[str, Any]:
    """Per metric: ``{mean, low, high, n, method, values: {cell: value}}`` over the cells in ``runs`` (cell id ->
    one method's :class:`RunItems`); metrics a cell has no value of are left out."""
    out: dict[str, Any] = {}
    for metric in METRICS:
        vals = {cid: item_values(it, metric) for cid, it in runs.items()}
        if not vals or any(v is None for v in vals.values()):
            continue
        per_cell = {}
        for cid, v in vals.items():
            per_cell[cid] = value_of(v)
            rec = _recorded(runs[cid], metric)
            if rec is None or abs(per_cell[cid] - rec) > _TOL:
                raise ValueError(f"cell {cid}: {metric} from the predictions is {per_cell[cid]:.4f}, the run "
                                 f"recorded {rec}")
        iv = interval(list(per_cell.values()), _blocks(list(vals.values())), level)
        out[metric] = {**iv.to_dict(), "values": per_cell}
    return out


def compare(a: dict[str, RunItems], b: dict[str, RunItems], level: float = LEVEL) -> dict[str, Any]:
    """Method ``a`` minus method ``b`` per metric over the same cells and items: the mean difference with its
    interval, and the two-sided p-value of the sign-flip test over cells x items."""
    out: dict[str, Any] = {}
    cids = list(a)
    for metric in METRICS:
        va = {c: item_values(a[c], metric) for c in cids}
        vb = {c: item_values(b[c], metric) for c in cids}
        if any(v is None for v in (*va.values(), *vb.values())):
            continue
        diffs: list[dict[str, dict[str, float]]] = []
        units: list[float] = []
        for c in cids:
            d: dict[str, dict[str, float]] = {}
            for t in va[c]:
                if set(va[c][t]) != set(vb[c][t]):
                    raise ValueError(f"cell {c}: the two methods answered different items of {t}")
                d[t] = {q: va[c][t][q] - vb[c][t][q] for q in va[c][t]}
                units += [x / (len(d[t]) * len(cids)) for x in d[t].values()]
            diffs.append(d)
        blocks = _blocks(diffs)
        iv = interval([value_of(d) for d in diffs], blocks, level)
        items = bootstrap_interval(blocks, level)  # the test items' share of the uncertainty, whatever the cells
        out[metric] = {**iv.to_dict(), "items": {"low": items.low, "high": items.high, "method": items.method},
                       "p_value": sign_flip_test(np.array(units)), "units": len(units)}
    return out


def _spread(values: dict[str, float], order_of: dict[str, int]) -> dict[str, Any]:
    per: dict[int, list[float]] = {}
    for cid, v in values.items():
        per.setdefault(order_of[cid], []).append(v)
    means = {k: statistics.fmean(v) for k, v in sorted(per.items())}
    m = list(means.values())
    return {"per_order": {f"o{k}": round(v, 4) for k, v in means.items()},
            "sd": statistics.stdev(m) if len(m) > 1 else None, "range": max(m) - min(m) if m else None}


def by_position(runs: dict[str, RunItems], tasks: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """``task -> per position p: {mean, n}`` of the task's final accuracy in the cells that learned it p-th."""
    t = len(tasks)
    out: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        cells: list[list[float]] = [[] for _ in range(t)]
        for it in runs.values():
            final = it.metrics["matrix"][-1]
            p = it.tasks.index(task)
            if final[p] is not None:
                cells[p].append(final[p])
        out[task] = [{"mean": statistics.fmean(v) if v else None, "n": len(v)} for v in cells]
    return out


def matrix_by_position(runs: dict[str, RunItems]) -> dict[str, list[list[float | None]]]:
    """Mean and standard deviation over cells of ``a[i][j]`` (after the i-th stage, on the j-th learned task)."""
    mats = [[[math.nan if v is None else v for v in row] for row in it.metrics["matrix"]] for it in runs.values()]
    a = np.array(mats, dtype=float)
    with np.errstate(all="ignore"):
        mean = np.nanmean(a, axis=0) if len(a) else a
        sd = np.nanstd(a, axis=0, ddof=1) if len(a) > 1 else np.full(a.shape[1:], np.nan)

    def clean(x: np.ndarray) -> list[list[float | None]]:
        return [[None if not np.isfinite(v) else round(float(v), 4) for v in row] for row in x]

    return {"mean": clean(mean), "sd": clean(sd)}


def confusion_sum(runs: dict[str, RunItems]) -> list[dict[str, dict[str, int]]] | None:
    """The routed method's confusion per stage (``metrics.json``), summed over cells by task and expert name."""
    confs = [it.metrics.get("confusion") for it in runs.values()]
    if not confs or any(c is None for c in confs):
        return None
    out: list[dict[str, dict[str, int]]] = [{} for _ in confs[0]]
    for conf in confs:
        for i, stage in enumerate(conf):
            for true, row in stage.items():
                dst = out[i].setdefault(true, {})
                for e, n in row.items():
                    dst[e] = dst.get(e, 0) + n
    return out


def analyse(study_dir: str | Path, cells: Sequence[Cell], methods: Sequence[str], samples: dict[str, dict[str, Any]],
            level: float = LEVEL) -> dict[str, Any]:
    """The study's numbers over ``cells`` (finished ones): see the module docstring. Paths are relative to
    ``study_dir``."""
    study_dir = Path(study_dir)
    runs = {m: {c.id: load_run_items(cell_dir(study_dir, c), m, samples) for c in cells} for m in methods}
    order_of = {c.id: c.order_index for c in cells}
    tasks = list(cells[0].order)
    result: dict[str, Any] = {"level": level, "methods": {}, "comparisons": [], "order_effects": {}, "routing": {},
                              "accuracy_by_position": {}}
    for m in methods:
        result["methods"][m] = method_intervals(runs[m], level)
        result["order_effects"][m] = {
            "final_accuracy_by_position": by_position(runs[m], tasks),
            "spread_across_orders": {k: _spread(v["values"], order_of) for k, v in result["methods"][m].items()}}
        result["accuracy_by_position"][m] = matrix_by_position(runs[m])
        conf = confusion_sum(runs[m])
        if conf is not None:
            result["routing"][m] = {"confusion_per_stage": conf}
    for a, b in itertools.combinations(methods, 2):
        for metric, d in compare(runs[a], runs[b], level).items():
            result["comparisons"].append({"a": a, "b": b, "metric": metric, **d})
    return result
