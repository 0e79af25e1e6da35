"""Run reports: ``metrics.json``, ``report.md``, accuracy-matrix heatmaps and a forgetting plot (PNG)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from cl_service._table import format_table
from cl_service.data.shards import atomic_write_text
from cl_service.eval.confusion import confusion_table


def _nan_to_none(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, list):
        return [_nan_to_none(x) for x in v]
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    return v


def write_metrics(out: Path, metrics: dict[str, Any]) -> Path:
    """Write ``metrics.json`` atomically (NaN, i.e. "not evaluated", becomes null)."""
    path = Path(out) / "metrics.json"
    atomic_write_text(path, json.dumps(_nan_to_none(metrics), indent=2))
    return path


def _savefig(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def plot_heatmaps(out: Path, metrics: dict[str, Any]) -> list[Path]:
    """One accuracy-matrix heatmap per method (rows: after training task i; columns: task j)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = metrics["tasks"]
    paths = []
    for name, m in metrics["methods"].items():
        a = np.array([[np.nan if v is None else v for v in row] for row in m["matrix"]], dtype=float)
        fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(tasks), 0.8 + 0.75 * len(tasks)))
        im = ax.imshow(a, vmin=0, vmax=100, cmap="viridis")
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks])
        ax.set_xlabel("evaluated on")
        for i in range(a.shape[0]):
            for j in range(a.shape[1]):
                if not np.isnan(a[i, j]):
                    ax.text(j, i, f"{a[i, j]:.0f}", ha="center", va="center",
                            color="white" if a[i, j] < 60 else "black", fontsize=8)
        ax.set_title(f"{name}: accuracy (%)")
        fig.colorbar(im, ax=ax, fraction=0.046)
        path = Path(out) / f"heatmap_{name}.png"
        _savefig(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_forgetting(out: Path, metrics: dict[str, Any]) -> Path:
    """Accuracy on each task right after learning it vs. at the end, per method (grouped bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = metrics["tasks"]
    methods = [n for n, m in metrics["methods"].items() if m.get("forgetting")]
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(tasks), 3.2))
    width = 0.8 / max(1, len(methods))
    for k, name in enumerate(methods):
        f = metrics["methods"][name]["forgetting"]
        vals = [f.get(t, np.nan) for t in tasks[:-1]]
        ax.bar(np.arange(len(tasks) - 1) + k * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(tasks) - 1) + width * (len(methods) - 1) / 2, tasks[:-1])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("forgetting (points)")
    ax.set_title("forgetting per task: max earlier accuracy - final accuracy")
    if methods:
        ax.legend(fontsize=8)
    path = Path(out) / "forgetting.png"
    _savefig(fig, path)
    plt.close(fig)
    return path


def _stage_index(name: str) -> int | None:
    head, _, rest = name.partition("-")
    idx = rest.partition("-")[0]
    return int(idx) if head == "stage" and idx.isdigit() else None


def plot_loss_curves(out: Path) -> list[Path]:
    """One figure per adapter family (``adapters/<family>/``: experts, router, lora_ft, ...): the training loss of
    every published adapter of the family at each optimizer step, from its ``train_log.json``. Jobs of a family
    whose folders are stages (``stage-<i>-<task>``) are laid end to end in stage order (x = steps through the
    stream: a sequential method's loss jumps where a new task starts); the others each start at step 1. A thin
    line per step, and its running mean over ~5% of the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    root = Path(out) / "adapters"
    families: dict[str, list[tuple[str, list[float]]]] = {}
    for log in sorted(root.rglob("train_log.json")) if root.is_dir() else []:
        if not (log.parent / "adapter.json").is_file():  # not published (an unfinished job)
            continue
        rel = log.parent.relative_to(root)
        try:
            losses = [float(x) for x in json.loads(log.read_text()).get("losses") or []]
        except (OSError, ValueError):
            continue
        if losses:
            families.setdefault(rel.parts[0], []).append(("/".join(rel.parts[1:]) or rel.parts[0], losses))
    paths = []
    for family, jobs in sorted(families.items()):
        staged = all(_stage_index(n) is not None for n, _ in jobs)
        if staged:
            jobs.sort(key=lambda j: _stage_index(j[0]))
        fig, ax = plt.subplots(figsize=(6.4, 3.4))
        start = 0
        for name, losses in jobs:
            x = np.arange(1, len(losses) + 1) + (start if staged else 0)
            y = np.array(losses)
            w = max(1, len(y) // 20)
            mean = np.convolve(y, np.ones(w) / w, mode="valid") if len(y) >= w else y
            line, = ax.plot(x[w - 1:] if len(y) >= w else x, mean, lw=1.4, label=name)
            ax.plot(x, y, lw=0.6, alpha=0.35, color=line.get_color())
            start += len(losses)
        ax.set_xlabel("optimizer step" + (" (stages end to end)" if staged and len(jobs) > 1 else ""))
        ax.set_ylabel("training loss")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(f"{family}: training loss per step")
        if len(jobs) <= 12:
            ax.legend(fontsize=7, ncol=2 if len(jobs) > 6 else 1)
        path = Path(out) / f"loss_{family}.png"
        _savefig(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def _fmt(v: Any) -> Any:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else v


def write_report(out: Path, metrics: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """``report.md``: comparison table, router table, per-stage times, and the plots."""
    out = Path(out)
    extra = extra or {}
    tasks = metrics["tasks"]
    heatmaps = plot_heatmaps(out, metrics)
    forgetting = plot_forgetting(out, metrics)
    curves = plot_loss_curves(out)
    rows = []
    for name, m in metrics["methods"].items():
        final = m["matrix"][-1] if m["matrix"] else []
        rows.append([name, *[_fmt(v) for v in final], _fmt(m.get("MFT")), _fmt(m.get("MFN")), _fmt(m.get("MAA")),
                     _fmt(m.get("BWT"))])
    lines = [f"# {metrics['benchmark']}: continual-learning report", ""]
    if extra.get("summary"):
        lines += [extra["summary"], ""]
    lines += ["## Final accuracy per task (%) and CL metrics", "",
              format_table(["method", *tasks, "MFT", "MFN", "MAA", "BWT"], rows, markdown=True), "",
              "MFT = mean final accuracy; MFN = mean accuracy right after learning each task; MAA = mean average "
              "accuracy over stages; BWT = mean (final - just-learned) over all but the last task.", ""]
    routed = {n: m for n, m in metrics["methods"].items() if m.get("router_accuracy")}
    if routed:
        rrows = []
        for name, m in routed.items():
            rrows.append([name, m.get("router", ""), *[_fmt(m["router_accuracy"].get(t)) for t in tasks],
                          _fmt(m.get("router_ms_per_request")), m.get("router_fallbacks", 0)])
        lines += ["## Routing accuracy (%) at the end of the stream", "",
                  format_table(["method", "router", *tasks, "ms/request", "fallbacks"], rrows, markdown=True), ""]
    confusions = [(n, m) for n, m in routed.items() if m.get("confusion")]
    if confusions:
        lines += ["## Routing confusion per stage", "",
                  "Which task's test items each routed method sent to which expert after each stage (percent of the "
                  "task's items; rows: every task of the stream, also those not learned yet; from the prediction "
                  "files).", ""]
        for name, m in confusions:
            for i, conf in enumerate(m["confusion"]):
                head, rows = confusion_table(conf, tasks[: i + 1])
                lines += [f"### {name} after stage {i + 1} ({tasks[i]})", "",
                          format_table(head, [[_fmt(v) for v in r] for r in rows], markdown=True), ""]
    if extra.get("stage_times"):
        lines += ["## Wall time per stage (s)", "", format_table(
            ["method", "stage", "task", "train s", "eval s"], extra["stage_times"], markdown=True), ""]
    lines += ["## Plots", ""]
    lines += [f"![{p.stem}]({p.name})" for p in heatmaps] + [f"![forgetting]({forgetting.name})", ""]
    if curves:
        lines += ["## Training loss per step", "", "One figure per adapter family, from each adapter's "
                  "`train_log.json`; the same curves, with lr and tokens/s, are in the run's tracker "
                  "(`tracking.backend`, default TensorBoard: `tensorboard --logdir <out>/tracking`).", ""]
        lines += [f"![{p.stem}]({p.name})" for p in curves] + [""]
    if extra.get("config_note"):
        lines += ["## Configuration", "", extra["config_note"], ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
