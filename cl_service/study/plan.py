"""A study's cells and folder, and which training jobs its cells share.

Folder of a study (``--out``)::

    study_spec.json          the base config, methods, orders and seeds (a rerun must not change them)
    data/                    the dataset, generated once for every cell (unless ``--data``)
    cache/<job key>/         adapters shared by the cells (:mod:`cl_service.sweep.cache`)
    trainings.jsonl          one line per adapter actually trained: cell, job, key, seconds
    cells/<id>/              each cell's CL run (metrics.json, report.md, adapters, predictions, stage records)
    cells/<id>/cell.json     the cell's done-record, written last: a rerun skips the cell
    study.json, report.md    the analysis (:mod:`cl_service.study.analysis`, :mod:`cl_service.study.report`)

A cell (order k, seed s), id ``o<k>-s<s>``, is the config with ``data.order`` and ``seed`` set. Which jobs repeat
is decided before anything runs, from the methods' own job declarations: each job gets a *logical* key (its
:meth:`~cl_service.train.job.TrainJob.key` fields with the adapter it starts from named by the logical weights
key of the job that trains it, as the real key names it by content), so a router continued from a router of
another order never looks like a repeat. Within a cell, jobs of one stage that train the same weights are trained
once (:func:`cl_service.run.run_stream` publishes copies); across cells, a key trained by an earlier cell comes
from the cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cl_service._atomic import atomic_write_text
from cl_service._cfgload import ConfigError, from_dict, to_dict
from cl_service.adapters.registry import is_complete
from cl_service.config import RunCfg
from cl_service.methods import METHODS
from cl_service.methods.base import StageContext
from cl_service.train.job import TrainJob

SPEC = "study_spec.json"
TRAININGS = "trainings.jsonl"
CELL_DONE = "cell.json"
#: Keys a rerun may change without making it another study: where and how fast cells run, not what they compute.
_FREE = ("out", "seed", "eval.threads", "eval.num_workers", "ray.storage_path", "ray.stall_timeout_s",
         "ray.poll_interval_s", "tracking")


class StudyMismatch(ValueError):
    """The study folder holds another study (other config, methods or orders)."""


@dataclass(frozen=True)
class Cell:
    """One (order, seed) cell of the grid."""

    order_index: int
    order: tuple[str, ...]
    seed: int

    @property
    def id(self) -> str:
        return f"o{self.order_index}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "order_index": self.order_index, "order": list(self.order), "seed": self.seed}


def make_cells(orders: Sequence[Sequence[str]], seeds: Sequence[int]) -> list[Cell]:
    """The grid, order by order (the benchmark's own order first), each at every seed."""
    return [Cell(k, tuple(o), int(s)) for k, o in enumerate(orders) for s in seeds]


def cell_dir(study_dir: str | Path, cell: Cell) -> Path:
    return Path(study_dir) / "cells" / cell.id


def cell_cfg(base: dict[str, Any], cell: Cell, study_dir: str | Path, data_path: str | None = None,
             base_path: str | None = None, overrides: dict[str, Any] | None = None) -> RunCfg:
    """The cell's ``RunCfg``: the study's config with the cell's order, seed and folder (and the study's dataset
    and base, once prepared; ``overrides``: more top-level sections to merge, e.g. ``{"eval": {"threads": 1}}``)."""
    data = json.loads(json.dumps(base))
    data["seed"], data["out"] = cell.seed, str(cell_dir(study_dir, cell))
    data.setdefault("data", {})["order"] = list(cell.order)
    if data_path:
        data["data"]["path"] = str(data_path)
    if base_path:
        data.setdefault("base", {})["path"] = str(base_path)
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    try:
        return from_dict(RunCfg, data)
    except ConfigError as e:
        raise ConfigError(f"cell {cell.id}: {e}") from None


def done_cell(study_dir: str | Path, cell: Cell) -> dict[str, Any] | None:
    """The cell's done-record when it finished with this order and seed (its run's metrics.json present)."""
    d = cell_dir(study_dir, cell)
    try:
        rec = json.loads((d / CELL_DONE).read_text())
    except (OSError, ValueError):
        return None
    ok = (rec.get("state") == "done" and rec.get("order") == list(cell.order) and rec.get("seed") == cell.seed
          and (d / "metrics.json").is_file())
    return rec if ok else None


def _comparable(base: dict[str, Any]) -> dict[str, Any]:
    d = json.loads(json.dumps(base))
    for key in _FREE:
        node, parts = d, key.split(".")
        for p in parts[:-1]:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    d.get("data", {}).pop("path", None)  # the dataset is checked by content (each cell's run checks its origin)
    d.get("base", {}).pop("path", None)
    return d


def check_spec(study_dir: str | Path, base: dict[str, Any], orders: Sequence[Sequence[str]],
               seeds: Sequence[int], write: bool = True) -> dict[str, Any]:
    """Refuse (:class:`StudyMismatch`) a folder whose recorded study has another config or other orders at the
    same indices (cells ``o<k>-s<s>`` would then name other runs); otherwise record this one (``write``; orders and
    seeds may grow: a rerun with more seeds adds cells). Returns the spec."""
    path = Path(study_dir) / SPEC
    spec = {"config": base, "orders": [list(o) for o in orders], "seeds": list(seeds)}
    try:
        old = json.loads(path.read_text())
    except FileNotFoundError:
        old = None
    except ValueError:
        raise StudyMismatch(f"{path} is not readable JSON; use another --out or remove it") from None
    if old is not None:
        a, b = _comparable(old.get("config", {})), _comparable(base)
        if a != b:
            diff = sorted(_diff_keys(a, b))
            raise StudyMismatch(f"{study_dir} holds a study of another config (differs in {diff[:8]}); use another "
                                f"--out, or delete {study_dir} to start over")
        for k, (o1, o2) in enumerate(zip(old.get("orders", []), spec["orders"])):
            if o1 != o2:
                raise StudyMismatch(f"{study_dir}: order {k} was {o1}, now {o2} (cells o{k}-s* would change meaning); "
                                    "use another --out")
    if write:
        atomic_write_text(path, json.dumps(spec, indent=2))
    return spec


def _diff_keys(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return {k2 for k in set(a) | set(b) for k2 in _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")}
    return set() if a == b else {prefix.rstrip(".")}


# ----------------------------------------------------------------------------------------------- jobs
def _digest(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def logical_keys(job: TrainJob, produced: dict[str, str]) -> tuple[str, str]:
    """``(key, weights key)`` of ``job`` with its init adapter named by ``produced[init path]`` (the logical weights
    key of the job publishing that folder), the base and dataset by path: equal across the cells of one study
    exactly where the real keys will be."""
    d = to_dict(job)
    for k in ("out_dir", "name", "base_digest"):
        d.pop(k)
    d["init_adapter"] = produced.get(job.init_adapter, job.init_adapter) if job.init_adapter else None
    key = _digest(d)
    d.pop("kind"), d.pop("description")
    return key, _digest(d)


def stream_jobs(cfg: RunCfg, tasks: Sequence[str], descriptions: dict[str, str], base_path: str,
                data_path: str) -> list[list[TrainJob]]:
    """Per stage, the jobs ``cfg``'s methods declare (one per output folder), as :func:`cl_service.run.run_stream`
    would train them (the base's dtype and prompt style set)."""
    from cl_service.models.placement import resolve_base_dtype, resolve_run_cfg

    cfg = resolve_run_cfg(cfg)
    base_dtype = resolve_base_dtype(cfg)
    methods = [METHODS.get(m)() for m in cfg.methods]
    extras = {"base_path": base_path, "dataset": data_path, "base_digest": None}
    out = Path(cfg.out).resolve()
    stages = []
    for i in range(len(tasks)):
        jobs: dict[str, TrainJob] = {}
        for m in methods:
            for job in m.jobs(StageContext(i, list(tasks), descriptions, out, cfg, None, extras)):
                if base_dtype or cfg.base.prompt_style != "auto":
                    job = job.replace(base_dtype=base_dtype, prompt_style=cfg.base.prompt_style)
                jobs.setdefault(job.out_dir, job)
        stages.append(list(jobs.values()))
    return stages


def _already_trained(job: TrainJob, cache: Path) -> bool:
    try:
        key = job.key()
    except Exception:  # noqa: BLE001  (no dataset or base yet: nothing of it can be trained)
        return False
    return is_complete(job.out_dir, key) or is_complete(cache / key, key)


def job_plan(cells: Sequence[Cell], stages_of: dict[str, list[list[TrainJob]]], cache: str | Path | None = None,
             ) -> dict[str, Any]:
    """Which jobs the cells train and share. ``stages_of``: cell id -> :func:`stream_jobs`. With ``cache`` (the
    study's folder exists) jobs already complete in their cell or in the cache are counted as trained.

    Returns ``{"jobs": instances over all cells, "trainings": distinct trainings, "shared": jobs - trainings,
    "copies": same weights as another job of the same cell and stage, "from_cache": repeats of a job another cell
    trains, "already_trained": trainings already done, "to_train": the rest, "per_cell": {id: {"jobs", "trains",
    "shares"}}, "shared_jobs": [{"job", "seed", "cells"}] (a job trained once for several cells)}``."""
    owner: dict[str, str] = {}          # logical key -> the cell that trains it
    users: dict[str, list[str]] = {}    # logical key -> cells using it
    names: dict[str, tuple[str, int]] = {}
    done: set[str] = set()
    per_cell: dict[str, dict[str, int]] = {}
    copies = from_cache = total = 0
    for cell in cells:
        produced: dict[str, str] = {}
        pc = {"jobs": 0, "trains": 0, "shares": 0}
        for jobs in stages_of[cell.id]:
            keyed = [(j, *logical_keys(j, produced)) for j in jobs]
            for j, _, wk in keyed:
                produced[j.out_dir] = wk
            reps: dict[str, str] = {}
            for j, k, wk in sorted(keyed, key=lambda x: x[0].kind != "expert"):  # experts first, as run_stream
                total += 1
                pc["jobs"] += 1
                if wk in reps and reps[wk] != k:
                    copies += 1
                    pc["shares"] += 1
                    continue
                reps[wk] = k
                users.setdefault(k, []).append(cell.id)
                names.setdefault(k, (j.name, cell.seed))
                if k in owner:
                    from_cache += 1
                    pc["shares"] += 1
                    continue
                owner[k] = cell.id
                pc["trains"] += 1
                if cache is not None and _already_trained(j, Path(cache)):
                    done.add(k)
        per_cell[cell.id] = pc
    shared = [{"job": names[k][0], "seed": names[k][1], "cells": cs} for k, cs in users.items() if len(cs) > 1]
    return {"jobs": total, "trainings": len(owner), "shared": total - len(owner), "copies": copies,
            "from_cache": from_cache, "already_trained": len(done), "to_train": len(owner) - len(done),
            "per_cell": per_cell, "shared_jobs": sorted(shared, key=lambda s: (s["seed"], s["job"]))}


def record_training(study_dir: str | Path, cell: str, job: TrainJob, key: str, seconds: float | None,
                    state: str = "done") -> None:
    """Append one line to ``trainings.jsonl`` (a single ``write`` in append mode: lines of cells running at
    once never interleave). ``state``: ``started`` before the job trains, ``done`` after."""
    path = Path(study_dir) / TRAININGS
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"cell": cell, "job": job.name, "key": key, "seed": job.seed, "state": state,
                       "seconds": None if seconds is None else round(seconds, 3)}) + "\n"
    with open(path, "a") as f:
        f.write(line)


def read_trainings(study_dir: str | Path) -> list[dict[str, Any]]:
    """One entry per adapter trained, from ``trainings.jsonl`` (a torn last line, from a killed writer, is
    ignored): a job's ``done`` line; or, for a job whose launch was killed after it finished but before it was
    recorded done (its adapter is complete in the study's cache), its ``started`` line. A job started and never
    finished is no training (its rerun records it)."""
    from cl_service.adapters.registry import is_complete

    try:
        lines = (Path(study_dir) / TRAININGS).read_text().splitlines()
    except FileNotFoundError:
        return []
    done: dict[str, dict[str, Any]] = {}
    started: dict[str, dict[str, Any]] = {}
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        into = started if rec.get("state") == "started" else done  # lines without a state were written when done
        into.setdefault(rec["key"], rec)
    finished = [r for k, r in started.items() if k not in done and is_complete(Path(study_dir) / "cache" / k, k)]
    return list(done.values()) + finished
