"""The sweep's results: ``sweep.json`` / ``sweep.csv`` (one row per trial), ``report.md`` and plots.

Built from the trial folders only (spec, progress, done-record), so it is the same whether the sweep ran in
one go or was restarted, and it can be rewritten any time (``write_sweep_report``). All writes are atomic.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any

from cl_service._atomic import atomic_write_text
from cl_service._table import format_table
from cl_service.sweep.space import Space, TrialSpec
from cl_service.sweep.trial import DONE, PROGRESS, read_json, trial_dir

RANK_KEY = "expert.lora.rank"
SAMPLES_KEY = "router.samples_per_task"


def trial_rows(out: Path, trials: list[TrialSpec], stages: int) -> list[dict[str, Any]]:
    """One row per trial: its values, seeds, state, final metrics (mean over seeds, with the 95% interval's ends
    as ``<metric>_low`` / ``<metric>_high``) and the metric (mean over seeds) after each stage."""
    rows = []
    for t in trials:
        tdir = trial_dir(out, t.id)
        rec = read_json(tdir / DONE) or {}
        progress = read_json(tdir / PROGRESS) or []
        state = rec.get("state") or ("running/failed" if progress else "pending")
        if state == "stopped":
            state = "stopped (ASHA)"
        row: dict[str, Any] = {"trial": t.index + 1, "id": t.id, **t.params, "seeds": list(t.seeds),
                               "state": state, "stages": len(progress)}
        ivs = rec.get("intervals") or {}
        for k in ("MFT", "MFN", "BWT", "router_acc"):
            row[k] = rec.get(k, progress[-1].get(k) if progress and k == "router_acc" else None)
            row[f"{k}_low"], row[f"{k}_high"] = (ivs.get(k) or {}).get("low"), (ivs.get(k) or {}).get("high")
        row["interval"] = (ivs.get("MFT") or {}).get("method")
        row["time_s"] = sum(p.get("stage_s", 0.0) for p in progress) or None
        for k in range(1, stages + 1):
            p = progress[k - 1] if k <= len(progress) else {}
            row[f"acc_seen@{k}"] = p.get("acc_seen")
            row[f"acc_task@{k}"] = p.get("acc_task")
            row[f"router_acc@{k}"] = p.get("router_acc")
            row[f"_time@{k}"] = p.get("time")
        rows.append(row)
    return rows


def _cell(v: Any) -> Any:
    if isinstance(v, list):
        return ",".join(map(str, v))
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols = [c for c in rows[0] if not c.startswith("_")] if rows else []
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if _cell(r[c]) is None else _cell(r[c]) for c in cols])
    atomic_write_text(path, buf.getvalue())


def _ci(r: dict[str, Any], k: str) -> str | None:
    """``mean [low, high]`` of a row's metric ``k`` (the mean alone when it has no interval)."""
    m, lo, hi = r.get(k), r.get(f"{k}_low"), r.get(f"{k}_high")
    if m is None:
        return None
    if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)):
        return f"{m:.2f}"
    return f"{m:.2f} [{lo:.2f}, {hi:.2f}]"


def _plot_vs(path: Path, rows: list[dict[str, Any]], x_key: str, fields: list[tuple[str, str]], ylabel: str,
             title: str) -> Path | None:
    """Each trial's ``field`` (the mean over its seeds) at its x, with the trial's 95% interval as an error bar
    where the row has one (``<field>_low`` / ``_high``); a line through the mean over the trials at each x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    drawn = False
    for idx, (field, label) in enumerate(fields):
        by_x: dict[Any, list[float]] = {}
        for r in rows:
            v = r.get(field)
            if v is None:
                continue
            x = r[x_key]
            by_x.setdefault(x, []).append(float(v))
            lo, hi = r.get(f"{field}_low"), r.get(f"{field}_high")
            err = None if lo is None or hi is None else [[v - lo], [hi - v]]
            ax.errorbar([x], [v], yerr=err, fmt="o", ms=3, alpha=0.5, capsize=3, color=f"C{idx}")
        if by_x:
            xs = sorted(by_x)
            ax.plot(xs, [statistics.fmean(by_x[x]) for x in xs], marker="s", label=label, color=f"C{idx}")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel(x_key)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def asha_decisions(rows: list[dict[str, Any]], space: Space, stages: int) -> list[dict[str, Any]]:
    """Per ASHA rung: the trials that reported there, in arrival order, and whether each went on."""
    a = space.settings.asha
    if a is None or stages <= a.grace_period:
        return []
    rungs, r = [], a.grace_period
    while r < stages:
        rungs.append(int(r))
        r = math.ceil(r * a.reduction_factor) if r * a.reduction_factor > r else r + 1
    metric = space.settings.metric
    out = []
    for k in rungs:
        reached = [row for row in rows if row["stages"] >= k]
        reached.sort(key=lambda row: row.get(f"_time@{k}") or 0)
        for order, row in enumerate(reached, 1):
            stopped_here = row["state"].startswith("stopped") and row["stages"] == k
            value = row.get(f"{metric}@{k}")
            out.append({"rung_stage": k, "arrival": order, "trial": row["trial"], "id": row["id"],
                        "value": value, "decision": "stopped" if stopped_here else "continued"})
    return out


def write_sweep_report(out: str | Path, space: Space, trials: list[TrialSpec], stages: int,
                       wall_s: float | None = None, command: str | None = None) -> dict[str, Any]:
    """Write sweep.json, sweep.csv, report.md and the plots; returns the sweep.json content."""
    out = Path(out)
    if wall_s is None or command is None:  # a relaunch that ran nothing keeps the last real launch's figures
        prev = read_json(out / "sweep.json") or {}
        wall_s = prev.get("wall_s") if wall_s is None else wall_s
        command = prev.get("command") if command is None else command
    rows = trial_rows(out, trials, stages)
    keys = list(trials[0].params) if trials else []
    swept = [k for k in space.swept_keys() if k in keys]
    s = space.settings
    done = [r for r in rows if r["state"] == "done"]
    final_metric = f"{s.metric}@{stages}"
    best = None
    if done:
        pick = max if s.mode == "max" else min
        best = pick((r for r in done if r.get(final_metric) is not None), key=lambda r: r[final_metric], default=None)
    decisions = asha_decisions(rows, space, stages)
    states: dict[str, int] = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    result = {"stages": stages, "metric": s.metric, "mode": s.mode, "swept": swept, "states": states,
              "wall_s": wall_s, "command": command, "best": best and {k: v for k, v in best.items() if not k.startswith("_")},
              "asha": s.asha and {"grace_period": s.asha.grace_period, "reduction_factor": s.asha.reduction_factor},
              "asha_decisions": decisions,
              "trials": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]}
    atomic_write_text(out / "sweep.json", json.dumps(result, indent=2))
    _write_csv(out / "sweep.csv", rows)

    plots = []
    if RANK_KEY in keys:
        # Trials stopped early have no MFT: also plot the metric after the deepest stage every trial reached.
        common = min((r["stages"] for r in rows), default=0)
        fields = [("MFT", "MFT (completed trials)")]
        if 0 < common < stages:
            fields.append((f"acc_seen@{common}", f"mean acc. over seen tasks after stage {common} (all trials)"))
        p = _plot_vs(out / "mft_vs_rank.png", rows, RANK_KEY, fields, "accuracy (%)",
                     "Final mean accuracy (MFT) vs expert LoRA rank")
        plots += [p] if p else []
    if SAMPLES_KEY in keys:
        fields = [(f"router_acc@{k}", f"after stage {k} ({k} experts)") for k in range(2, stages + 1)
                  if any(r.get(f"router_acc@{k}") is not None for r in rows)]
        p = _plot_vs(out / "router_acc_vs_samples.png", rows, SAMPLES_KEY, fields, "router accuracy (%)",
                     "Router accuracy over seen tasks vs router samples per task")
        plots += [p] if p else []

    md = [f"# Sweep report ({len(rows)} trials, {stages} stages each)", ""]
    if command:
        md += [f"Command: `{command}`", ""]
    md += [f"Swept: {', '.join(f'`{k}`' for k in swept) or '(nothing)'}; every trial at seeds {list(s.seeds)} "
           f"(the scheduler decides on the mean over seeds); metric "
           f"`{s.metric}` ({s.mode}) reported after every stage; scheduler "
           + (f"ASHA (grace {s.asha.grace_period} stages, reduction factor {s.asha.reduction_factor:g})"
              if s.asha else "FIFO (no early stopping)") + ".",
           "States: " + ", ".join(f"{k} {v}" for k, v in states.items())
           + (f"; wall time of the (last) launch that ran trials {wall_s:.0f} s ({wall_s / 60:.1f} min)." if wall_s else "."), ""]
    if best:
        md += ["## Best configuration", "",
               f"Trial {best['trial']} (`{best['id']}`): " + ", ".join(f"`{k}={_cell(best[k])}`" for k in keys)
               + f", seeds {_cell(best['seeds'])} — {final_metric} {best[final_metric]:.2f}, MFT "
               f"{_ci(best, 'MFT')}, router accuracy {_ci(best, 'router_acc')}.", ""]
    md += ["## Trials", "",
           "MFT/MFN/BWT and router accuracy (mean over tasks) are final for completed trials: the mean over the "
           "trial's seeds [95% interval]; for trials stopped early the router accuracy is the one after their last "
           "stage." + (f" Intervals: {done[0]['interval']}." if done and done[0].get("interval") else ""), "",
           format_table(["#", *[k.split(".")[-1] if k.count(".") else k for k in keys], "seeds", "state", "stages",
                         "MFT", "MFN", "BWT", "router acc", "time s"],
                        [[r["trial"], *[_cell(r[k]) for k in keys], _cell(r["seeds"]), r["state"], r["stages"],
                          _ci(r, "MFT"), _ci(r, "MFN"), _ci(r, "BWT"), _ci(r, "router_acc"), r["time_s"]]
                         for r in rows], markdown=True), "",
           f"### `{s.metric}` after each stage", "",
           format_table(["#", *[k.split(".")[-1] for k in swept], *[f"stage {k}" for k in range(1, stages + 1)]],
                        [[r["trial"], *[_cell(r[k]) for k in swept],
                          *[r.get(f"{s.metric}@{k}")
                            for k in range(1, stages + 1)]] for r in rows], markdown=True), ""]
    if SAMPLES_KEY in keys:
        tab = []
        for x in sorted({r[SAMPLES_KEY] for r in rows}):
            cells = []
            for k in range(2, stages + 1):
                vals = [r[f"router_acc@{k}"] for r in rows if r[SAMPLES_KEY] == x and r.get(f"router_acc@{k}") is not None]
                cells.append(f"{statistics.fmean(vals):.2f} (n={len(vals)})" if vals else None)
            tab.append([x, *cells])
        md += ["### Router accuracy (mean over seen tasks) by samples per task, after each stage", "",
               "Mean over the trials that reached the stage; the router never sees the experts, so trials that "
               "differ only in the expert config share the same router (trained once, from the cache).", "",
               format_table(["samples/task", *[f"stage {k} ({k} experts)" for k in range(2, stages + 1)]], tab,
                            markdown=True), ""]
    if decisions:
        md += ["## ASHA decisions", "",
               f"At each rung (stage) a trial continues only if its `{s.metric}` is in the top "
               f"1/{s.asha.reduction_factor:g} of the values recorded at that rung so far (arrival order matters: "
               "the first trial at a rung always continues).", "",
               format_table(["rung (stage)", "arrival", "trial", "id", s.metric, "decision"],
                            [[d["rung_stage"], d["arrival"], d["trial"], d["id"], d["value"], d["decision"]]
                             for d in decisions], markdown=True), ""]
    if plots:
        md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    md += ["Files: `sweep.csv` / `sweep.json` (one row per trial), `trials/<id>/run/` (each trial's CL run: "
           "metrics.json, report.md, adapters), `cache/` (adapters shared between trials).", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    return result


def sweep_exit_code(result: dict[str, Any]) -> int:
    """The sweep command's exit status from :func:`write_sweep_report`'s result (plus ``interrupted``, the
    signal's name): 128 + that signal; else 1 while any trial is not finished (interrupted, failed, out of
    time, pending); else 0 (every trial done or stopped by the scheduler)."""
    import signal

    if result.get("interrupted"):
        return 128 + int(signal.Signals[result["interrupted"]])
    return 0 if set(result.get("states", {})) <= {"done", "stopped (ASHA)"} else 1
