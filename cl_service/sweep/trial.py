"""One sweep trial as plain library code: a CL run of the stream with per-stage metrics and a done-record.

Folder of a sweep (``--out``)::

    data/                    the dataset, prepared once for every trial
    cache/<job key>/         adapters shared by trials (see :mod:`cl_service.sweep.cache`)
    trials/<id>/spec.json    the trial's values and seed
    trials/<id>/progress.json   one entry per finished stage (the metrics reported to the scheduler)
    trials/<id>/trial.json   the done-record: state done | stopped (by the scheduler), final metrics; or
                             state interrupted | failed (not done: the next launch runs the trial again)
    trials/<id>/run/         the CL run (metrics.json, report.md, adapters, stage records)

A restarted sweep launches only trials without ``trial.json``; inside a half-finished trial the run itself
resumes (finished stages verified by checksum and replayed without training).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from cl_service._atomic import atomic_write_text
from cl_service.sweep.cache import CachingTrainer
from cl_service.sweep.space import TrialSpec, trial_cfg
from cl_service.tracking.stream import for_trial

DONE = "trial.json"
PROGRESS = "progress.json"
SPEC = "spec.json"


def trial_dir(sweep_dir: str | Path, trial_id: str) -> Path:
    return Path(sweep_dir) / "trials" / trial_id


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def done_record(sweep_dir: str | Path, trial_id: str) -> dict[str, Any] | None:
    """The trial's done-record (state done or stopped), or None if it still has to run."""
    rec = read_json(trial_dir(sweep_dir, trial_id) / DONE)
    return rec if rec and rec.get("state") in ("done", "stopped") else None


def pending_trials(sweep_dir: str | Path, trials: list[TrialSpec]) -> list[TrialSpec]:
    return [t for t in trials if done_record(sweep_dir, t.id) is None]


def stage_metrics(event: dict[str, Any], method: str) -> dict[str, Any]:
    """Per-stage metrics of ``method`` from a :func:`cl_service.run.run_stream` ``on_stage`` event (percent)."""
    i, tasks = event["stage"], event["tasks"]
    rec = event["records"][method]
    row = rec["row"][: i + 1]
    vals = [v for v in row if v is not None]
    routed = rec.get("router_accuracy") or {}
    out = {"stage": i + 1, "task": event["task"], "acc_seen": sum(vals) / len(vals) if vals else None,
           "acc_task": row[i], "router_acc": (sum(routed[t] for t in tasks[: i + 1] if t in routed) / (i + 1))
           if routed else None, "stage_s": float(rec.get("train_s", 0.0)) + float(rec.get("eval_s", 0.0))}
    return out


def run_trial(spec: TrialSpec, base: dict[str, Any], sweep_dir: str | Path, trainer: Any,
              report: Callable[[dict[str, Any]], None], *, data_path: str | None = None,
              base_path: str | None = None, log: Callable[[str], None] = print,
              lock_timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run one trial's stream with ``trainer`` (adapters shared through the sweep's cache); after each stage
    record and ``report`` its metrics (a scheduler may stop the trial there). Returns the done-record."""
    from cl_service.run import run_stream

    sweep_dir = Path(sweep_dir).resolve()
    tdir = trial_dir(sweep_dir, spec.id)
    cfg = for_trial(trial_cfg(base, spec, tdir / "run", data_path, base_path), sweep_dir, spec.id)
    method = cfg.methods[0]
    atomic_write_text(tdir / SPEC, json.dumps(spec.to_dict(), indent=2))
    tag = f"[trial {spec.index + 1} {spec.id} {spec.label()}]"
    caching = CachingTrainer(trainer, sweep_dir / "cache", lock_timeout_s, log=lambda m: log(f"{tag} {m}"))
    progress: list[dict[str, Any]] = []
    t0 = time.time()

    def on_stage(event: dict[str, Any]) -> None:
        m = stage_metrics(event, method)
        m["time"] = time.time()
        progress.append(m)
        atomic_write_text(tdir / PROGRESS, json.dumps(progress, indent=2))
        log(f"{tag} stage {m['stage']}/{len(event['tasks'])} {m['task']}: acc_seen {_f(m['acc_seen'])} "
            f"router_acc {_f(m['router_acc'])} ({m['stage_s']:.0f} s)")
        if m["stage"] < len(event["tasks"]):
            report(m)  # the last stage is reported after the done-record (a scheduler may end the trial at max_t)

    metrics = run_stream(cfg, caching, log=lambda m: log(f"{tag} {m}"), on_stage=on_stage)
    entry = metrics["methods"][method]
    ra = entry.get("router_accuracy") or {}
    rec = {"id": spec.id, "state": "done", "method": method, "stages": len(progress),
           "MFT": entry.get("MFT"), "MFN": entry.get("MFN"), "BWT": entry.get("BWT"), "MAA": entry.get("MAA"),
           "router_acc": sum(ra.values()) / len(ra) if ra else None, "router_acc_per_task": ra,
           "time_s": sum(p["stage_s"] for p in progress), "launch_wall_s": time.time() - t0,
           "reused_adapters": len(caching.reused)}
    atomic_write_text(tdir / DONE, json.dumps(rec, indent=2))
    log(f"{tag} done: MFT {_f(rec['MFT'])} MFN {_f(rec['MFN'])} BWT {_f(rec['BWT'])} "
        f"router_acc {_f(rec['router_acc'])}")
    if progress:
        report(progress[-1])
    return rec


def mark_stopped(sweep_dir: str | Path, spec: TrialSpec, reason: str, stages: int | None = None) -> dict[str, Any]:
    """Record a trial the scheduler stopped early after ``stages`` reported stages (its progress is kept)."""
    tdir = trial_dir(sweep_dir, spec.id)
    progress = read_json(tdir / PROGRESS) or []
    if stages is not None and len(progress) > stages:  # only what the scheduler saw
        progress = progress[:stages]
        atomic_write_text(tdir / PROGRESS, json.dumps(progress, indent=2))
    last = progress[-1] if progress else {}
    rec = {"id": spec.id, "state": "stopped", "stages": len(progress), "stop_reason": reason,
           "MFT": None, "MFN": None, "BWT": None, "MAA": None, "router_acc": last.get("router_acc"),
           "time_s": sum(p["stage_s"] for p in progress)}
    atomic_write_text(tdir / DONE, json.dumps(rec, indent=2))
    return rec


def mark_unfinished(sweep_dir: str | Path, spec: TrialSpec, state: str, reason: str) -> dict[str, Any]:
    """Record why a trial ended before its last stage without the scheduler stopping it (``state``
    ``interrupted`` or ``failed``). Not a done-record: the next launch runs the trial again (its run resumes)."""
    tdir = trial_dir(sweep_dir, spec.id)
    progress = read_json(tdir / PROGRESS) or []
    rec = {"id": spec.id, "state": state, "stages": len(progress), "reason": reason}
    atomic_write_text(tdir / DONE, json.dumps(rec, indent=2))
    return rec


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}"
