"""One sweep trial as plain library code: a CL run of the stream with per-stage metrics and a done-record.

Folder of a sweep (``--out``)::

    data/                    the dataset, prepared once for every trial
    cache/<job key>/         adapters shared by trials (see :mod:`cl_service.sweep.cache`)
    trials/<id>/spec.json    the trial's values and seeds
    trials/<id>/progress.json   one entry per finished stage (the mean over seeds reported to the scheduler, and
                             each seed's values)
    trials/<id>/trial.json   the done-record: state done | stopped (by the scheduler), final metrics (mean over
                             seeds, 95% interval, each seed's); or state interrupted | failed (not done: the next
                             launch runs the trial again)
    trials/<id>/seed-<s>/    the CL run at seed s (metrics.json, report.md, adapters, stage records)

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


def mean_over_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One stage's metrics of a trial: the mean over its seeds of each metric (None where no seed has it), the
    seconds summed, and each seed's own values under ``seeds``."""
    first = next(iter(per_seed.values()))
    out: dict[str, Any] = {"stage": first["stage"], "task": first["task"]}
    for k in ("acc_seen", "acc_task", "router_acc"):
        vals = [m[k] for m in per_seed.values() if m[k] is not None]
        out[k] = sum(vals) / len(vals) if vals else None
    out["stage_s"] = sum(m["stage_s"] for m in per_seed.values())
    out["seeds"] = {str(s): {k: m[k] for k in ("acc_seen", "acc_task", "router_acc")} for s, m in per_seed.items()}
    return out


def seed_dir(sweep_dir: str | Path, trial_id: str, seed: int) -> Path:
    """The run folder of the trial's run at ``seed``."""
    return trial_dir(sweep_dir, trial_id) / f"seed-{seed}"


def _shared_engine() -> Callable[[str, Any], Any]:
    """An ``engine_factory`` building one evaluation engine for every seed of a trial (same base, same settings;
    its memo is keyed by adapter content, so the seeds' answers never mix)."""
    held: dict[str, Any] = {}

    def factory(base_path: str, cfg: Any) -> Any:
        if "engine" not in held:
            from cl_service.eval.stage import default_engine
            from cl_service.models.placement import eval_device

            held["engine"] = default_engine(base_path, cfg, eval_device(cfg))
        return held["engine"]

    return factory


def intervals_over_seeds(runs: dict[int, Path], method: str, data_path: str) -> dict[str, Any]:
    """Per metric the mean over the trial's seeds with its 95% interval (the study's rule,
    :func:`cl_service.study.analysis.method_intervals`: a t interval from 3 seeds, else the bootstrap over the test
    items of the runs)."""
    from cl_service.data.shards import ShardDataset
    from cl_service.study.analysis import method_intervals
    from cl_service.study.items import load_run_items, load_test_items

    ds = ShardDataset(data_path)
    samples = load_test_items(ds, ds.tasks)
    return method_intervals({f"seed-{s}": load_run_items(d, method, samples) for s, d in runs.items()})


def run_trial(spec: TrialSpec, base: dict[str, Any], sweep_dir: str | Path, trainer: Any,
              report: Callable[[dict[str, Any]], None], *, data_path: str | None = None,
              base_path: str | None = None, log: Callable[[str], None] = print,
              lock_timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run one trial's stream at each of its seeds with ``trainer`` (adapters shared through the sweep's cache),
    the seeds in lockstep: after each stage of every seed, record and ``report`` the mean over seeds of its metrics
    (a scheduler may stop the trial there). Returns the done-record."""
    from cl_service.run import iter_stream

    sweep_dir = Path(sweep_dir).resolve()
    tdir = trial_dir(sweep_dir, spec.id)
    cfgs = {s: for_trial(trial_cfg(base, spec, seed_dir(sweep_dir, spec.id, s), data_path, base_path, seed=s),
                         sweep_dir, spec.id if len(spec.seeds) == 1 else f"{spec.id}-seed{s}") for s in spec.seeds}
    method = cfgs[spec.seeds[0]].methods[0]
    atomic_write_text(tdir / SPEC, json.dumps(spec.to_dict(), indent=2))
    tag = f"[trial {spec.index + 1} {spec.id} {spec.label()}]"
    caching = CachingTrainer(trainer, sweep_dir / "cache", lock_timeout_s, log=lambda m: log(f"{tag} {m}"))
    engine = _shared_engine()
    progress: list[dict[str, Any]] = []
    t0 = time.time()
    streams = {s: iter_stream(cfg, caching, log=lambda m, s=s: log(f"{tag} seed {s}: {m}"), engine_factory=engine)
               for s, cfg in cfgs.items()}
    metrics: dict[int, dict[str, Any]] = {}
    try:
        while len(metrics) < len(streams):
            events = {}
            for s, g in streams.items():
                if s in metrics:
                    continue
                try:
                    events[s] = next(g)
                except StopIteration as done:
                    metrics[s] = done.value
            if not events:
                continue
            if len(events) != len(streams):
                raise RuntimeError(f"{tag}: the seeds' streams have different lengths")
            m = mean_over_seeds({s: stage_metrics(e, method) for s, e in events.items()})
            m["time"] = time.time()
            progress.append(m)
            atomic_write_text(tdir / PROGRESS, json.dumps(progress, indent=2))
            n_stages = len(next(iter(events.values()))["tasks"])
            log(f"{tag} stage {m['stage']}/{n_stages} {m['task']}: acc_seen {_f(m['acc_seen'])} "
                f"router_acc {_f(m['router_acc'])} (mean of {len(events)} seed(s); {m['stage_s']:.0f} s)")
            if m["stage"] < n_stages:
                report({k: v for k, v in m.items() if k != "seeds"})  # the last one after the done-record
    finally:
        for g in streams.values():
            g.close()  # a scheduler's stop (raised by report): every seed's run ends as an interrupted run does
    per_seed = {}
    for s, mt in metrics.items():
        entry = mt["methods"][method]
        ra = entry.get("router_accuracy") or {}
        per_seed[str(s)] = {"MFT": entry.get("MFT"), "MFN": entry.get("MFN"), "BWT": entry.get("BWT"),
                            "MAA": entry.get("MAA"), "router_acc": sum(ra.values()) / len(ra) if ra else None}
    first = cfgs[spec.seeds[0]]
    ivs = intervals_over_seeds({s: seed_dir(sweep_dir, spec.id, s) for s in spec.seeds}, method,
                               str(first.data.path or Path(first.out) / "data"))
    rec = {"id": spec.id, "state": "done", "method": method, "stages": len(progress), "seeds": list(spec.seeds)}
    for k in ("MFT", "MFN", "BWT", "MAA", "router_acc"):
        vals = [p[k] for p in per_seed.values() if p[k] is not None]
        rec[k] = sum(vals) / len(vals) if vals else None
    rec.update({"intervals": ivs, "per_seed": per_seed,
                "router_acc_per_task": {s: mt["methods"][method].get("router_accuracy") for s, mt in metrics.items()},
                "time_s": sum(p["stage_s"] for p in progress), "launch_wall_s": time.time() - t0,
                "reused_adapters": len(caching.reused)})
    atomic_write_text(tdir / DONE, json.dumps(rec, indent=2))
    log(f"{tag} done: MFT {_f(rec['MFT'])} MFN {_f(rec['MFN'])} BWT {_f(rec['BWT'])} "
        f"router_acc {_f(rec['router_acc'])}")
    if progress:
        report({k: v for k, v in progress[-1].items() if k != "seeds"})
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
