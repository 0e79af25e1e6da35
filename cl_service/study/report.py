"""A study's ``study.json``, ``report.md`` and plots (metrics with error bars, accuracy matrix mean and spread).

Rewritten from the cell folders whenever a launch ends (:func:`write_study`); every path in them is relative to
the study folder. All writes are atomic.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from cl_service._atomic import atomic_write_text
from cl_service._table import format_table
from cl_service.eval.confusion import confusion_table
from cl_service.study.analysis import analyse
from cl_service.study.items import METRICS
from cl_service.study.plan import Cell

_LABEL = {"MFT": "MFT", "MFN": "MFN", "MAA": "MAA", "BWT": "BWT", "router_acc": "router acc"}


def _ci(d: dict[str, Any] | None) -> str:
    if not d:
        return "–"
    if d.get("low") is None or (isinstance(d["low"], float) and math.isnan(d["low"])):
        return f"{d['mean']:.2f}"
    return f"{d['mean']:.2f} [{d['low']:.2f}, {d['high']:.2f}]"


def _p(p: float) -> str:
    """A Monte Carlo p-value; below 0.001 only the bound (10,000 flips resolve no further)."""
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _savefig(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def plot_metrics(out: Path, result: dict[str, Any]) -> Path:
    """Per metric, one bar per method at its mean, the interval as an error bar, the cells' values as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(result["methods"])
    metrics = [m for m in METRICS if any(m in result["methods"][x] for x in methods)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.2 + 1.0 * len(methods) * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for k, name in enumerate(methods):
            d = result["methods"][name].get(metric)
            if not d:
                continue
            lo, hi = d["low"], d["high"]
            err = None if lo is None or math.isnan(lo) else [[d["mean"] - lo], [hi - d["mean"]]]
            ax.bar(k, d["mean"], 0.7, color=f"C{k}", alpha=0.75, yerr=err, capsize=4)
            vals = list(d["values"].values())
            ax.scatter(k + np.linspace(-0.2, 0.2, len(vals)) if len(vals) > 1 else [k], vals, s=10, color="black",
                       zorder=3)
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
        ax.set_title(_LABEL[metric], fontsize=10)
        ax.axhline(0, color="black", lw=0.6)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("percent (points for BWT)")
    fig.suptitle("mean over cells with its 95% interval; dots: cells", fontsize=9)
    path = out / "metrics_ci.png"
    _savefig(fig, path)
    plt.close(fig)
    return path


def plot_matrices(out: Path, result: dict[str, Any]) -> list[Path]:
    """Per method the accuracy matrix by position (stage i, j-th learned task): mean and standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    for name, mats in result["accuracy_by_position"].items():
        mean = np.array([[np.nan if v is None else v for v in r] for r in mats["mean"]], dtype=float)
        sd = np.array([[np.nan if v is None else v for v in r] for r in mats["sd"]], dtype=float)
        t = mean.shape[0]
        fig, axes = plt.subplots(1, 2, figsize=(2.0 + 1.6 * t, 0.9 + 0.7 * t))
        sd_max = max(1.0, float(np.nanmax(sd))) if np.isfinite(sd).any() else 1.0
        for ax, a, title, vmax in ((axes[0], mean, "mean (%)", 100), (axes[1], sd, "sd over cells (points)", sd_max)):
            im = ax.imshow(a, vmin=0, vmax=vmax, cmap="viridis")
            ax.set_xticks(range(t), [f"task {j + 1}" for j in range(t)], fontsize=7)
            ax.set_yticks(range(t), [f"after {i + 1}" for i in range(t)], fontsize=7)
            for i in range(t):
                for j in range(t):
                    if np.isfinite(a[i, j]):
                        ax.text(j, i, f"{a[i, j]:.0f}" if vmax == 100 else f"{a[i, j]:.1f}", ha="center",
                                va="center", fontsize=7, color="white" if a[i, j] < 0.6 * vmax else "black")
            ax.set_title(f"{name}: {title}", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
        path = out / f"matrix_{name}.png"
        _savefig(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def _intervals_note(result: dict[str, Any]) -> str:
    kinds = sorted({d["method"] for m in result["methods"].values() for d in m.values()})
    return "Intervals: " + "; ".join(kinds) + "." if kinds else ""


def render(result: dict[str, Any], plots: Sequence[Path]) -> str:
    """``report.md`` from the ``study.json`` content."""
    cells = result["cells"]
    methods = list(result["methods"])
    jobs = result.get("jobs") or {}
    md = [f"# Study: {result['benchmark']} — {result['orders']} order(s) x {len(result['seeds'])} seed(s) = "
          f"{len(cells)} cells", ""]
    if result.get("command"):
        md += [f"Command: `{result['command']}`", ""]
    line = f"Cells finished: {len(cells)} of {result['cells_total']}"
    if result.get("wall_s"):
        line += f"; wall time of the (last) launch that ran cells {result['wall_s']:.0f} s ({result['wall_s'] / 60:.1f} min)"
    md += [line + ".", ""]
    if jobs:
        md += [f"Training jobs: {jobs['jobs']} in all cells, {jobs['trainings']} distinct trainings, {jobs['shared']} "
               f"shared ({jobs['from_cache']} repeats of a job another cell trains, from the study's cache; "
               f"{jobs['copies']} copies of an identical job in the same cell); adapters actually trained (logged in "
               f"`trainings.jsonl`): {result.get('trained', 0)}.", ""]
    rows = [[m, *[_ci(result["methods"][m].get(k)) for k in METRICS],
             next(iter(result["methods"][m].values()))["n"] if result["methods"][m] else 0] for m in methods]
    md += ["## Metrics: mean [95% interval] over cells", "",
           format_table(["method", *[_LABEL[k] for k in METRICS], "cells"], rows, markdown=True), "",
           _intervals_note(result) + " MFT: mean final accuracy; MFN: mean accuracy right after learning each "
           "task; MAA: mean over stages of the accuracy on the tasks seen; BWT: mean (final - just learned); router "
           "acc: mean over tasks of the final routing accuracy.", ""]
    comps = result["comparisons"]
    if comps:
        md += ["## Paired comparisons: A - B on the same cells and items", "",
               "The difference of the means with its 95% interval by the rule above (across cells: does it hold "
               "whatever the order and seed?), the percentile bootstrap interval over the test items (the items' "
               "share of the uncertainty in these cells), and the two-sided p-value of a sign-flip permutation test "
               "over cells x items (10,000 random flips of each item's difference between A and B: are A and B "
               "exchangeable on these cells' items?). A difference that varies with the order can be clear on the "
               "items (small p) while its interval across cells spans 0.", "",
               format_table(["A", "B", "metric", "A - B [95% interval]", "items [95%]", "p", "cells x items"],
                            [[c["a"], c["b"], _LABEL[c["metric"]], _ci(c), _ci({"mean": c["mean"], **c["items"]})
                              .split(" ", 1)[-1], _p(c["p_value"]), c["units"]] for c in comps], markdown=True), ""]
    md += ["## Order effects", "", "### Final accuracy by the position the task was learned at", "",
           "Mean over the cells that learned the task at that position (n cells); positions 1..T.", ""]
    for m in methods:
        pos = result["order_effects"][m]["final_accuracy_by_position"]
        t = len(next(iter(pos.values()))) if pos else 0
        md += [f"**{m}**", "", format_table(["task", *[f"pos {p + 1}" for p in range(t)]],
                                             [[task, *[f"{c['mean']:.1f} (n={c['n']})" if c["n"] else "–" for c in cs]]
                                              for task, cs in pos.items()], markdown=True), ""]
    srows = []
    for m in methods:
        for k, s in result["order_effects"][m]["spread_across_orders"].items():
            srows.append([m, _LABEL[k], *[s["per_order"].get(o) for o in result["order_ids"]], s["sd"], s["range"]])
    md += ["### Spread of each metric across orders", "", "Each order's mean over its seeds; sd and range across "
           "orders.", "", format_table(["method", "metric", *result["order_ids"], "sd", "range"], srows, markdown=True),
           ""]
    if result["routing"]:
        md += ["## Routing: confusion after the last stage, summed over cells", "",
               "Percent of each task's test items sent to each expert (all cells; per stage in `study.json`, per "
               "cell and stage in each cell's report.md).", ""]
        for m, r in result["routing"].items():
            final = r["confusion_per_stage"][-1]
            head, rows = confusion_table(final, list(final))
            md += [f"**{m}**", "", format_table(head, rows, markdown=True), ""]
    md += ["## Orders", "", format_table(["order", "tasks"], [[o, " -> ".join(t)] for o, t in
                                                             zip(result["order_ids"], result["order_list"])],
                                         markdown=True), ""]
    crow = [[c["id"], c["order_id"], c["seed"], *[c["metrics"].get(m, {}).get("MFT") for m in methods],
             c.get("wall_s"), f"`{c['run']}`"] for c in cells]
    md += ["## Cells", "", "MFT per method in each cell; each cell is a whole CL run (its own report.md).", "",
           format_table(["cell", "order", "seed", *[f"{m} MFT" for m in methods], "wall s", "run"], crow,
                        markdown=True), ""]
    if plots:
        md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    md += ["Files: `study.json` (every number here, with each cell's values), `cells/<id>/` (each cell's run), "
           "`trainings.jsonl` (each adapter trained), `cache/` (adapters shared between cells).", ""]
    return "\n".join(md)


def write_study(study_dir: str | Path, cells: Sequence[Cell], all_cells: Sequence[Cell], records: dict[str, dict],
                methods: Sequence[str], samples: dict[str, dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    """Analyse the finished ``cells`` (their done-``records`` by id) and write study.json, report.md and plots.
    ``info``: benchmark, seeds, orders (list), jobs, trained, wall_s, command."""
    out = Path(study_dir)
    result: dict[str, Any] = {"benchmark": info["benchmark"], "orders": len(info["orders"]),
                              "order_ids": [f"o{k}" for k in range(len(info["orders"]))],
                              "order_list": [list(o) for o in info["orders"]], "seeds": list(info["seeds"]),
                              "methods_run": list(methods), "cells_total": len(all_cells),
                              "jobs": info.get("jobs"), "trained": info.get("trained"), "wall_s": info.get("wall_s"),
                              "command": info.get("command")}
    result["cells"] = [{"id": c.id, "order_id": f"o{c.order_index}", "order": list(c.order), "seed": c.seed,
                        "run": records[c.id]["run"], "wall_s": records[c.id].get("wall_s"),
                        "metrics": records[c.id]["metrics"]} for c in cells]
    plots: list[Path] = []
    if cells:
        result.update(analyse(out, cells, methods, samples))
        plots = [plot_metrics(out, result), *plot_matrices(out, result)]
    else:
        result.update({"methods": {}, "comparisons": [], "order_effects": {}, "routing": {}})
    atomic_write_text(out / "study.json", json.dumps(result, indent=2))
    atomic_write_text(out / "report.md", render(result, plots))
    return result
