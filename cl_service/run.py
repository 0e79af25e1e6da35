"""A continual-learning run over a task stream: train stage by stage, fill the accuracy matrices, report.

Plain library code; the trainer backend decides where training runs (in process or Ray Train), the evaluator
backend where the (method, stage) evaluation units run (in process, :class:`cl_service.eval.stage.LocalEvaluator`,
or Ray actors that keep the base loaded, :class:`cl_service.on_ray.evaluate.RayEvaluator`); the driver writes
the predictions and records. Resumable: adapters are complete only with checksummed ``adapter.json`` files whose
job key matches, and each (method, stage) evaluation is a checksummed record; a rerun with the same ``out``
skips both.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

from cl_service import __version__
from cl_service._cfgload import to_dict
from cl_service._table import format_table
from cl_service.adapters.registry import is_complete
from cl_service.config import RunCfg
from cl_service.data.shards import ShardDataset, ShardWriter, atomic_write_text, dataset_location
from cl_service.eval.confusion import stage_confusion
from cl_service.eval.metrics import compute_cl_metrics
from cl_service.eval.report import write_metrics, write_report
from cl_service.data.origin import check_origin
from cl_service.digest import base_digest, dataset_digest
from cl_service.resolved import portable_path
from cl_service.eval.stage import (EvalSetup, LocalEvaluator, StageResult, changed_inputs, load_stage_record,
                                   stage_record_path, unit_inputs, write_stage)
from cl_service.methods import METHODS
from cl_service.methods.base import StageContext
from cl_service.train.job import TrainJob
from cl_service._progress import bar as progress_bar
from cl_service.tracking import check_available as check_tracking
from cl_service.tracking.stream import RunTracking

Log = Callable[[str], None]


class Trainer(Protocol):
    def fit(self, jobs: list[TrainJob]) -> dict[str, float]:
        """Train every job (saving its adapter to ``job.out_dir``); returns seconds per job name."""
        ...


class LocalTrainer:
    """Runs jobs one after another in this process, on ``device`` (default the CPU)."""

    device: str | None = None

    def __init__(self, device: str | None = None) -> None:
        self.device = device

    def fit(self, jobs: list[TrainJob]) -> dict[str, float]:
        from cl_service.train.runner import run_train_job

        times = {}
        for job in jobs:
            t0 = time.perf_counter()
            run_train_job(job, device=self.device)
            times[job.name] = time.perf_counter() - t0
        return times


class Evaluator(Protocol):
    """Where a run's (method, stage) evaluation units are computed (:mod:`cl_service.eval.stage`)."""

    def start(self, setup: EvalSetup) -> None:
        """Called once, before the first stage."""
        ...

    def evaluate(self, stage: int, methods: Sequence[str], train_s: float) -> Iterator[tuple[str, StageResult]]:
        """Evaluate ``methods`` after stage ``stage`` (its training took ``train_s`` s); yields
        ``(method, result)`` as units finish, in any order. The driver writes each result."""
        ...

    def close(self) -> None:
        """Release what :meth:`evaluate` holds (the base, actors); called when the run ends or fails."""
        ...


def prepare_dataset(cfg: RunCfg, out: Path, log: Log) -> Path:
    """The run's dataset: ``data.path``, or the built-in benchmark generated once into ``out/data``. A results
    folder of other data is refused (:func:`cl_service.data.origin.check_origin`)."""
    from cl_service.data.shards import DatasetError

    if cfg.data.path:
        ShardDataset(cfg.data.path)  # fail early with a clear message
        check_origin(out, cfg, dataset_digest(cfg.data.path))
        return dataset_location(cfg.data.path)  # a URI (s3://...) stays one: workers read it from there
    from cl_service.data.synth import BENCHMARKS

    check_origin(out, cfg)
    path = out / "data"
    if path.exists():
        try:
            ShardDataset(path)
            return path
        except DatasetError as e:  # the same parameters (checked above), unreadable: generated again
            log(f"{path} is not readable ({e}); generating it again")
    spec = BENCHMARKS.get(cfg.data.benchmark)
    log(f"generating {spec.name} ({cfg.data.train_per_task} train / {cfg.data.test_per_task} test per task)")
    tasks = [{"name": t.name, "scorer": t.scorer, "description": t.description} for t in spec.tasks]
    with ShardWriter(path, tasks, info={"benchmark": spec.name, "stream": spec.task_names, "seed": cfg.seed},
                     overwrite=True) as w:
        for split, n in (("train", cfg.data.train_per_task), ("test", cfg.data.test_per_task)):
            w.add_all(progress_bar(n * len(spec.tasks), f"{spec.name} {split}", "sample",
                                   spec.generate(split, n, cfg.seed)))
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


def _train_stage(cfg: RunCfg, out: Path, i: int, tasks: list[str], descriptions: dict[str, str],
                 methods: dict[str, Any], extras: dict[str, Any], trainer: Trainer, log: Log,
                 base_dtype: str | None) -> float:
    """Train (or verify by checksum) what every method needs at stage ``i``; returns the training seconds."""
    task, T = tasks[i], len(tasks)
    jobs, to_train, clones, trained = _stage_jobs(cfg, out, i, tasks, descriptions, methods, extras, base_dtype)
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
    return train_s


def _stage_jobs(cfg: RunCfg, out: Path, i: int, tasks: list[str], descriptions: dict[str, str],
                methods: dict[str, Any], extras: dict[str, Any], base_dtype: str | None):
    """Stage ``i``'s jobs by output folder, the ones to train, the ``(weights_key, job)`` clones published from
    an identical job, and ``weights_key -> job`` of the jobs that train (or trained) each set of weights."""
    ctxs = {name: StageContext(i, tasks, descriptions, out, cfg, None, extras) for name in methods}
    jobs: dict[str, TrainJob] = {}
    for name, m in methods.items():
        for job in m.jobs(ctxs[name]):
            if base_dtype or cfg.base.prompt_style != "auto":
                job = job.replace(base_dtype=base_dtype, prompt_style=cfg.base.prompt_style)
            if extras.get("base_digest") and job.base_path == extras["base_path"]:
                job = job.replace(base_digest=extras["base_digest"])  # computed once, by the driver
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
    return jobs, to_train, clones, trained


def plan_stream(cfg: RunCfg) -> list[dict[str, Any]]:
    """What :func:`run_stream` would do with ``cfg`` in its results folder, without doing any of it (no data
    generated, no base built, nothing trained): per stage, the jobs to train, the ones published as copies of an
    identical job, the ones already trained (verified by checksum), and the (method, stage) evaluations to run."""
    from cl_service.models.placement import resolve_base_dtype, resolve_run_cfg
    from cl_service.models.store import base_path as store_base_path

    for m in cfg.methods:
        METHODS.get(m)
    cfg = resolve_run_cfg(cfg)
    out = Path(cfg.out).resolve()
    data_path = dataset_location(cfg.data.path) if cfg.data.path else out / "data"
    check_origin(out, cfg, dataset_digest(data_path) if cfg.data.path else None)
    try:
        ds = ShardDataset(data_path)
        stream, descriptions = ds.tasks, {t: ds.task_meta(t)["description"] for t in ds.tasks}
    except Exception:  # not generated yet: the built-in benchmark's own stream; nothing can be trained yet either
        from cl_service.data.synth import BENCHMARKS

        spec = BENCHMARKS.get(cfg.data.benchmark)
        stream, descriptions, ds = spec.task_names, {t.name: t.description for t in spec.tasks}, None
    tasks = cfg.data.stream(stream)
    base = str(Path(cfg.base.path).resolve() if cfg.base.path else store_base_path(cfg.base.profile))
    methods = {name: METHODS.get(name)() for name in cfg.methods}
    try:
        base_dig = base_digest(base)
    except OSError:  # not built yet: nothing trained on it can be complete
        base_dig = None
    extras = {"base_path": base, "dataset": str(data_path), "base_digest": base_dig}
    data_dig = dataset_digest(data_path) if ds else None
    inputs = {n: unit_inputs(cfg, m, base_dig, data_dig) for n, m in methods.items()} if ds else {}
    plan = []
    for i, task in enumerate(tasks):
        if ds is None:
            ctxs = {n: StageContext(i, tasks, descriptions, out, cfg, None, extras) for n in methods}
            names = sorted({j.name for n, m in methods.items() for j in m.jobs(ctxs[n])})
            stage = {"train": names, "copies": [], "trained": []}
        else:
            jobs, to_train, clones, _ = _stage_jobs(cfg, out, i, tasks, descriptions, methods, extras,
                                                    resolve_base_dtype(cfg))
            busy = {id(j) for j in to_train} | {id(j) for _, j in clones}
            stage = {"train": [j.name for j in to_train], "copies": [j.name for _, j in clones],
                     "trained": sorted(j.name for j in jobs.values() if id(j) not in busy)}
        stage["evaluate"] = [n for n in methods if ds is None or load_stage_record(
            stage_record_path(out, n, i, task), out, tasks, inputs[n]) is None]
        plan.append({"stage": i, "task": task, **stage})
    return plan


def run_stream(cfg: RunCfg, trainer: Trainer | None = None, log: Log = print, engine_factory=None,
               on_stage: Callable[[dict[str, Any]], None] | None = None,
               evaluator: Evaluator | None = None) -> dict[str, Any]:
    """Run ``cfg.methods`` over the stream; returns the metrics dict also written to ``metrics.json``.

    ``trainer``, ``evaluator`` and ``engine_factory``: as :func:`iter_stream`, which this drives to the end.
    ``on_stage`` (optional) is called with each stage's event — the hook a sweep uses to report per-stage metrics
    (and where a scheduler may stop the run: an exception raised there ends the run as any error does).
    """
    stages = iter_stream(cfg, trainer, log, engine_factory, evaluator)
    try:
        while True:
            try:
                event = next(stages)
            except StopIteration as done:
                return done.value
            if on_stage is not None:
                try:
                    on_stage(event)
                except BaseException as e:
                    stages.throw(e)  # the stream ends as this error does (its tracker run failed, or killed)
                    raise
    finally:
        stages.close()  # an on_stage that raised: the stream's own cleanup (tracking, evaluator) runs now


def iter_stream(cfg: RunCfg, trainer: Trainer | None = None, log: Log = print, engine_factory=None,
                evaluator: Evaluator | None = None) -> Iterator[dict[str, Any]]:
    """:func:`run_stream` one stage at a time: a generator that yields after each stage's evaluation and returns
    (``StopIteration.value``) the metrics dict also written to ``metrics.json``. Several streams advanced in
    turn run in lockstep in one process (a sweep trial's seeds); closing it early ends the run as an error does.

    ``trainer`` trains each stage's adapters (default :class:`LocalTrainer`); ``evaluator`` computes the
    (method, stage) evaluation units (default :class:`~cl_service.eval.stage.LocalEvaluator` over
    ``engine_factory(base_path, cfg)``, or the default engine). Each stage yields ``{"stage", "task", "tasks",
    "records": {method: stage record (row, router_accuracy, train_s, eval_s, ...)}}``.
    """
    from cl_service.models.store import ensure_base

    from cl_service.models.placement import resolve_base_dtype, resolve_run_cfg

    for m in cfg.methods:
        METHODS.get(m)  # unknown method: fail before any work, listing the known ones
    cfg = resolve_run_cfg(cfg)  # the device's defaults decided once: job keys say what ran
    base_dtype = resolve_base_dtype(cfg)
    # Absolute paths: training jobs run in Ray workers whose working directory is not ours.
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    check_tracking(cfg.tracking)  # a missing tracking package fails before any work
    trainer = trainer or LocalTrainer()
    evaluator = evaluator or LocalEvaluator(engine_factory)
    data_path = prepare_dataset(cfg, out, log)
    ds = ShardDataset(data_path)
    tasks = cfg.data.stream(ds.tasks)  # data.tasks and data.order checked against the dataset, before any work
    base_path = str(Path(cfg.base.path or ensure_base(cfg.base.profile, log=log)).resolve())
    # The base and the data by content, here in the driver: job keys and stage records carry them.
    base_dig, data_dig = base_digest(base_path), dataset_digest(data_path)
    # Paths as cl_service.resolved writes them (relative to `out`, to $CLSVC_HOME, or as the user gave them): the
    # folder is copied and committed, and names no path of this machine.
    resolved = {"config": to_dict(cfg), "versions": _versions(),
                "dataset": portable_path(data_path, out, cfg.data.path), "base": portable_path(base_path, out, cfg.base.path),
                "base_dtype": base_dtype, "base_digest": base_dig, "data_digest": data_dig,
                "tasks": tasks, "seed": cfg.seed}
    atomic_write_text(out / "config.resolved.json", json.dumps(resolved, indent=2))
    descriptions = {t: ds.task_meta(t)["description"] for t in tasks}
    methods = {name: METHODS.get(name)() for name in cfg.methods}
    extras = {"base_path": base_path, "dataset": str(data_path),  # what jobs() reads; predict() runs in the evaluator
              "base_digest": base_dig}
    inputs = {name: unit_inputs(cfg, m, base_dig, data_dig) for name, m in methods.items()}
    T = len(tasks)
    matrices = {name: [[math.nan] * T for _ in range(T)] for name in methods}
    routing: dict[str, dict[str, Any]] = {}
    stage_times: list[list[Any]] = []
    tracking = RunTracking.open(cfg, out, log)  # per step of each trained job, per evaluation, the final metrics
    trainer = tracking.trainer(trainer)
    evaluator.start(EvalSetup(cfg, str(out), base_path, str(data_path), tuple(tasks)))
    try:
        for i, task in enumerate(tasks):
            train_s = _train_stage(cfg, out, i, tasks, descriptions, methods, extras, trainer, log, base_dtype)
            recs = {name: load_stage_record(stage_record_path(out, name, i, task), out, tasks, inputs[name])
                    for name in methods}
            changed = {n: changed_inputs(stage_record_path(out, n, i, task), inputs[n])
                       for n, r in recs.items() if r is None}
            if any(changed.values()):
                log(f"[stage {i + 1}/{T} {task}] evaluated again: " + "; ".join(
                    f"{n} ({', '.join(c)})" for n, c in changed.items() if c))
            todo = [n for n, r in recs.items() if r is None]
            for name, result in progress_bar(len(todo), f"[stage {i + 1}/{T} {task}] evaluating", "unit",
                                             evaluator.evaluate(i, todo, train_s)):
                result.record["inputs"] = inputs[name]  # what its answers depend on besides its adapters
                write_stage(out, result)
                tracking.stage(result.record)
                recs[name] = result.record
            summary = []
            for name, m in methods.items():
                rec = recs[name]
                matrices[name][i] = [math.nan if v is None else v for v in rec["row"]]
                if m.routed:
                    routing[name] = rec
                stage_times.append([name, i + 1, task, rec["train_s"], rec["eval_s"]])
                if rec["row"][i] is not None:
                    summary.append(f"{name} {rec['row'][i]:.1f}")
            log(f"[stage {i + 1}/{T} {task}] accuracy on {task}: " + ", ".join(summary))
            yield {"stage": i, "task": task, "tasks": tasks, "records": recs}
    except BaseException as e:
        tracking.close(e)  # a failed or interrupted run still flushes its curves; its tracker run ends failed/killed
        raise
    finally:
        evaluator.close()

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
            entry["confusion"] = [stage_confusion(out, name, i, tasks) for i in range(T)]  # from the predictions
        metrics["methods"][name] = entry
    write_metrics(out, metrics)
    tracking.final(metrics)
    tracking.close()
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
