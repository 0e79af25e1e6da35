"""One cell of a study as plain library code: its CL run with adapters shared through the study's cache.

The cell's trainer is the caller's (in process, or Ray Train) wrapped twice: :class:`Recording` writes one line
to ``trainings.jsonl`` per adapter it actually trains, and the sweep's :class:`~cl_service.sweep.cache.CachingTrainer`
trains each job key once for the whole study. A cell holds an exclusive lock on ``cells/.<id>.lock`` while it
runs, so two launches on one study folder (a rerun while a killed launch's cell still winds down) never run the
same cell at once; its done-record is written last.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from cl_service._atomic import atomic_write_text
from cl_service.config import RunCfg
from cl_service.study.plan import CELL_DONE, Cell, cell_dir, record_training
from cl_service.sweep.cache import CachingTrainer, file_lock
from cl_service.train.job import TrainJob

Log = Callable[[str], None]
#: ``run(cfg, wrap) -> metrics``: runs the CL stream with ``wrap(trainer)`` as its trainer.
RunFn = Callable[[RunCfg, Callable[[Any], Any]], dict[str, Any]]


class Recording:
    """A trainer backend that logs every job it trains to the study's ``trainings.jsonl``."""

    def __init__(self, inner: Any, study_dir: str | Path, cell: str) -> None:
        self.inner, self.study_dir, self.cell = inner, Path(study_dir), cell

    def fit(self, jobs: list[TrainJob]) -> dict[str, float]:
        keys = [j.key() for j in jobs]
        for job, key in zip(jobs, keys):  # a launch killed after a job finished still counts it (read_trainings)
            record_training(self.study_dir, self.cell, job, key, None, state="started")
        times = self.inner.fit(jobs)
        for job, key in zip(jobs, keys):
            record_training(self.study_dir, self.cell, job, key, times.get(job.name))
        return times


def local_run(log: Log) -> RunFn:
    """A :data:`RunFn` training in this process (:class:`cl_service.run.LocalTrainer` on the run's device)."""

    def run(cfg: RunCfg, wrap: Callable[[Any], Any]) -> dict[str, Any]:
        from cl_service.models.placement import train_device
        from cl_service.run import LocalTrainer, run_stream

        return run_stream(cfg, wrap(LocalTrainer(train_device(cfg))), log=log)

    return run


def summary(metrics: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per method the cell's MFT, MFN, MAA, BWT and mean final router accuracy (what the done-record keeps)."""
    out = {}
    for name, m in metrics["methods"].items():
        ra = m.get("router_accuracy") or {}
        out[name] = {"MFT": m.get("MFT"), "MFN": m.get("MFN"), "MAA": m.get("MAA"), "BWT": m.get("BWT"),
                     "router_acc": sum(ra.values()) / len(ra) if ra else None}
    return out


def run_cell(cell: Cell, cfg: RunCfg, study_dir: str | Path, run: RunFn, log: Log = print,
             lock_timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run (or resume) ``cell`` with ``cfg`` (:func:`cl_service.study.plan.cell_cfg`); returns its done-record."""
    study_dir = Path(study_dir).resolve()
    out = cell_dir(study_dir, cell)
    tag = f"[cell {cell.id}]"
    with file_lock(out.parent / f".{cell.id}.lock", timeout_s=lock_timeout_s):
        t0 = time.time()
        caching: list[CachingTrainer] = []

        def wrap(trainer: Any) -> CachingTrainer:
            caching.append(CachingTrainer(Recording(trainer, study_dir, cell.id), study_dir / "cache",
                                          lock_timeout_s, log=lambda m: log(f"{tag} {m}")))
            return caching[-1]

        log(f"{tag} order {' -> '.join(cell.order)}, seed {cell.seed}")
        metrics = run(cfg, wrap)
        rec = {"id": cell.id, "state": "done", "order": list(cell.order), "seed": cell.seed,
               "run": str(out.relative_to(study_dir)), "metrics": summary(metrics),
               "reused_adapters": sorted({n for c in caching for n in c.reused}), "wall_s": round(time.time() - t0, 1)}
        atomic_write_text(out / CELL_DONE, json.dumps(rec, indent=2))
    return rec
