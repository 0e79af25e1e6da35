"""A continual-learning run over a task stream: train stage by stage, fill the accuracy matrices, report.

Plain library code; the trainer backend decides where training runs (in process or Ray Train).
Resumable: adapters are complete only with checksummed ``adapter.json`` files whose job key matches,
and each (method, stage) evaluation is a checksummed record; a rerun with the same ``out`` skips both.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from cl_service import __version__
from cl_service._cfgload import to_dict
from cl_service._table import format_table
from cl_service.adapters.registry import ADAPTER_META, is_complete
from cl_service.config import RunCfg
from cl_service.data.shards import ShardDataset, ShardWriter, atomic_write_text
from cl_service.eval.metrics import compute_cl_metrics
from cl_service.eval.predictions import prediction_record, write_predictions
from cl_service.eval.report import write_metrics, write_report
from cl_service.eval.scorers import SCORERS
from cl_service.methods import METHODS
from cl_service.methods.base import StageContext
from cl_service.train.job import TrainJob, choose, choose_with_copies

Log = Callable[[str], None]


class Trainer(Protocol):
    def fit(self, jobs: list[TrainJob]) -> dict[str, float]:
        """Train every job (saving its adapter to ``job.out_dir``); returns seconds per job name."""
        ...


class LocalTrainer:
    """Runs jobs one after another in this process."""

    def fit(self, jobs: list[TrainJob]) -> dict[str, float]:
        from cl_service.train.runner import run_train_job

        times = {}
        for job in jobs:
            t0 = time.perf_counter()
            run_train_job(job)
            times[job.name] = time.perf_counter() - t0
        return times


def prepare_dataset(cfg: RunCfg, out: Path, log: Log) -> Path:
    """The run's dataset: ``data.path``, or the built-in benchmark generated once into ``out/data``."""
    if cfg.data.path:
        ShardDataset(cfg.data.path)  # fail early with a clear message
        return Path(cfg.data.path).resolve()
    from cl_service.data.synth import BENCHMARKS

    path = out / "data"
    try:
        ShardDataset(path)
        return path
    except Exception:
        pass
    spec = BENCHMARKS.get(cfg.data.benchmark)
    log(f"generating {spec.name} ({cfg.data.train_per_task} train / {cfg.data.test_per_task} test per task)")
    tasks = [{"name": t.name, "scorer": t.scorer, "description": t.description} for t in spec.tasks]
    with ShardWriter(path, tasks, info={"benchmark": spec.name, "stream": spec.task_names, "seed": cfg.seed},
                     overwrite=True) as w:
        w.add_all(spec.generate("train", cfg.data.train_per_task, cfg.seed))
        w.add_all(spec.generate("test", cfg.data.test_per_task, cfg.seed))
    return path


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"cl_service": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "ray", "pyarrow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _adapter_digest(folder: Path) -> str | None:
    p = folder / ADAPTER_META
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else None


def _stage_record_path(out: Path, method: str, stage: int, task: str) -> Path:
    return out / "stages" / method / f"stage-{stage}-{task}.json"


def _rel(p: Path, out: Path) -> str:
    """Adapter folders are recorded relative to the run folder, so a copied run folder stays valid."""
    try:
        return str(p.resolve().relative_to(out))
    except ValueError:
        return str(p)


def _load_stage_record(path: Path, out: Path, tasks: list[str]) -> dict[str, Any] | None:
    """A finished evaluation record, if it evaluated the same task list (a stream extended with more tasks
    re-evaluates its finished stages on the new ones; their adapters are reused) and its adapters are
    unchanged since it was written."""
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    if rec.get("tasks", tasks) != tasks or len(rec.get("row", [])) != len(tasks):
        return None
    for folder, digest in rec.get("adapters", {}).items():
        if _adapter_digest(out / folder) != digest:
            return None
    return rec


def _score(samples, answers) -> float:
    total = 0.0
    for s, a in zip(samples, answers):
        total += SCORERS.get(s.scorer)(a.text, s.answers, s.question, s.metadata)
    return 100.0 * total / max(1, len(samples))


def run_stream(cfg: RunCfg, trainer: Trainer | None = None, log: Log = print, engine_factory=None,
               on_stage: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``cfg.methods`` over the stream; returns the metrics dict also written to ``metrics.json``.

    ``on_stage`` (optional) is called after each stage's evaluation with ``{"stage", "task", "tasks",
    "records": {method: stage record (row, router_accuracy, train_s, eval_s, ...)}}`` — the hook a sweep
    uses to report per-stage metrics (and where a scheduler may stop the run).
    """
    from cl_service.engine import Engine
    from cl_service.models.store import ensure_base

    for m in cfg.methods:
        METHODS.get(m)  # unknown method: fail before any work, listing the known ones
    # Absolute paths: training jobs run in Ray workers whose working directory is not ours.
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    trainer = trainer or LocalTrainer()
    data_path = prepare_dataset(cfg, out, log)
    ds = ShardDataset(data_path)
    tasks = [t for t in ds.tasks if not cfg.data.tasks or t in cfg.data.tasks]
    if cfg.data.tasks and len(tasks) != len(cfg.data.tasks):
        raise ValueError(f"data.tasks {list(cfg.data.tasks)} not all in the dataset's stream {ds.tasks}")
    base_path = str(Path(cfg.base.path or ensure_base(cfg.base.profile, log=log)).resolve())
    resolved = {"config": to_dict(cfg), "versions": _versions(), "dataset": str(data_path), "base": base_path,
                "tasks": tasks, "seed": cfg.seed}
    atomic_write_text(out / "config.resolved.json", json.dumps(resolved, indent=2))
    descriptions = {t: ds.task_meta(t)["description"] for t in tasks}
    engine = (engine_factory or Engine)(base_path, cfg)
    engine.enable_memo()  # the same expert answers the same test item at every stage: compute it once
    tests = {t: choose(ds.samples(t, "test"), cfg.data.test_limit, cfg.seed) for t in tasks}
    train_cache: dict[tuple, list] = {}

    def train_samples(task: str, limit: int, seed: int, augment: int = 0):
        """A seeded choice of a task's training samples, with ``augment`` look-jittered copies of each;
        computed once per run (every feature router of every stage asks for the same ones)."""
        key = (task, limit, seed, augment)
        if key not in train_cache:
            train_cache[key] = choose_with_copies(ds, task, "train", limit, seed, augment)
        return train_cache[key]

    methods = {name: METHODS.get(name)() for name in cfg.methods}
    extras = {name: {"base_path": base_path, "dataset": str(data_path), "train_samples": train_samples}
              for name in methods}
    T = len(tasks)
    matrices = {name: [[math.nan] * T for _ in range(T)] for name in methods}
    routing: dict[str, dict[str, Any]] = {}
    stage_times: list[list[Any]] = []
    for i, task in enumerate(tasks):
        ctxs = {name: StageContext(i, tasks, descriptions, out, cfg, engine, extras[name]) for name in methods}
        jobs: dict[str, TrainJob] = {}
        for name, m in methods.items():
            for job in m.jobs(ctxs[name]):
                jobs.setdefault(job.out_dir, job)
        pending = [j for j in jobs.values() if not is_complete(j.out_dir, j.key())]
        # Jobs that train identical weights (lora_ft stage 0 = the first expert) are trained once and
        # published under each name.
        pending_ids = {id(j) for j in pending}
        trained: dict[str, TrainJob] = {}  # weights_key -> the job that trains (or trained) those weights
        clones: list[tuple[str, TrainJob]] = []
        for j in sorted(jobs.values(), key=lambda j: (id(j) in pending_ids, j.kind != "expert")):  # complete, experts first
            w = j.weights_key()
            if w not in trained:
                trained[w] = j
            elif id(j) in pending_ids:
                clones.append((w, j))
        to_train = [j for j in pending if all(j is not c for _, c in clones)]
        t0 = time.perf_counter()
        job_times = trainer.fit(to_train) if to_train else {}
        if clones:
            from cl_service.train.runner import clone_adapter

            for w, j in clones:
                clone_adapter(trained[w], j)
                log(f"[stage {i + 1}/{T} {task}] {j.name}: same weights as {trained[w].name}, published without training")
        train_s = time.perf_counter() - t0
        if to_train:
            log(f"[stage {i + 1}/{T} {task}] trained {len(to_train)} adapter(s) in {train_s:.1f} s: "
                + ", ".join(f"{k} {v:.0f}s" for k, v in job_times.items()))
        elif jobs:
            log(f"[stage {i + 1}/{T} {task}] {len(jobs)} adapter(s) already trained (verified by checksum)")
        engine.forget_missing()
        summary = []
        stage_recs: dict[str, dict[str, Any]] = {}
        for name, m in methods.items():
            ctx = ctxs[name]
            rec_path = _stage_record_path(out, name, i, task)
            rec = _load_stage_record(rec_path, out, tasks)
            if rec is None:
                t1 = time.perf_counter()
                ctx.extra["router_stats"] = {"seconds": 0.0, "requests": 0}
                row: list[float | None] = [None] * T
                routed: dict[str, float] = {}
                fallbacks = 0
                if m.evaluates(ctx):
                    for j, t in enumerate(tasks):
                        answers = m.predict(ctx, tests[t])
                        row[j] = _score(tests[t], answers)
                        if m.routed:
                            routed[t] = 100.0 * sum(a.expert == t for a in answers) / max(1, len(answers))
                            fallbacks += sum(a.fallback for a in answers)
                        write_predictions(out / "predictions" / name / f"stage-{i}-{task}" / f"{t}.jsonl", [
                            prediction_record(s.id, s.question, a.text, f"{name}@{task}",
                                              {"expert": a.expert, "router_raw": a.router_raw,
                                               "fallback": a.fallback})
                            for s, a in zip(tests[t], answers)])
                rs = ctx.extra["router_stats"]
                rec = {"method": name, "stage": i, "task": task, "tasks": tasks, "row": row, "router_accuracy": routed,
                       "router_seconds": rs["seconds"], "router_requests": rs["requests"], "fallbacks": fallbacks,
                       "train_s": round(train_s, 3), "eval_s": round(time.perf_counter() - t1, 3),
                       "adapters": {_rel(p, out): _adapter_digest(p) for p in engine.used_adapters()}}
                engine.reset_used()
                atomic_write_text(rec_path, json.dumps(rec, indent=2))
            matrices[name][i] = [math.nan if v is None else v for v in rec["row"]]
            stage_recs[name] = rec
            if m.routed:
                routing[name] = rec
            stage_times.append([name, i + 1, task, rec["train_s"], rec["eval_s"]])
            if rec["row"][i] is not None:
                summary.append(f"{name} {rec['row'][i]:.1f}")
        log(f"[stage {i + 1}/{T} {task}] accuracy on {task}: " + ", ".join(summary))
        if on_stage is not None:
            on_stage({"stage": i, "task": task, "tasks": tasks, "records": stage_recs})

    metrics: dict[str, Any] = {"benchmark": ds.manifest.get("benchmark") or cfg.name, "tasks": tasks, "methods": {}}
    for name, m in methods.items():
        entry: dict[str, Any] = {"matrix": matrices[name]}
        if m.evaluates(StageContext(0, tasks, descriptions, out, cfg)):
            entry.update(compute_cl_metrics(matrices[name]).to_dict(tasks))
        else:  # joint: only the final row exists
            final = matrices[name][-1]
            entry.update({"MFT": sum(final) / T, "MFN": None, "MAA": None, "BWT": None})
        if m.routed:
            rec = routing[name]
            entry["router"] = m.router_kind
            entry["router_accuracy"] = rec["router_accuracy"]
            entry["router_ms_per_request"] = 1000 * rec["router_seconds"] / max(1, rec["router_requests"])
            entry["router_fallbacks"] = rec["fallbacks"]
        metrics["methods"][name] = entry
    write_metrics(out, metrics)
    report = write_report(out, metrics, {"stage_times": stage_times,
                                         "config_note": f"Resolved config, versions and seed: `config.resolved.json`."})
    log(summary_table(metrics))
    log(f"report: {report}")
    return metrics


def summary_table(metrics: dict[str, Any]) -> str:
    rows = []
    for name, m in metrics["methods"].items():
        ra = m.get("router_accuracy")
        rows.append([name, m.get("MFT"), m.get("MFN"), m.get("MAA"), m.get("BWT"),
                     min(ra.values()) if ra else None])
    return format_table(["method", "MFT", "MFN", "MAA", "BWT", "min router acc"], rows)
