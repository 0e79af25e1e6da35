"""Ray driver of a study: its (order, seed) cells as Ray tasks, as many at once as the cluster's resources allow.

Each cell is a light Ray task (no CPU of its own, as a sweep trial's driver) that runs the cell's CL stream
exactly as ``clsvc run`` does (:func:`cl_service.on_ray.stream.run`: Ray Train workers, the evaluator) with its
trainer wrapped by the study's adapter cache (:func:`cl_service.study.cell.run_cell`). Cells at once = the
cluster's CPUs (and GPUs) divided by one cell's training workers (``ray.num_workers x ray.cpus_per_worker``; a
cell training in its own process, ``ray.num_workers=0``, reserves ``ray.cpus_per_worker``), at most
``--max-concurrent``. Finished cells have a done-record and are skipped by the next launch; an unfinished cell
resumes as ``clsvc run`` does. SIGINT/SIGTERM cancel the running cells and exit 128 + the signal.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from cl_service._cfgload import from_dict
from cl_service.config import RunCfg
from cl_service.study.orders import parse_seeds, study_orders
from cl_service.study.plan import (Cell, cell_cfg, check_spec, done_cell, job_plan, make_cells, read_trainings,
                                   stream_jobs)

Log = Callable[[str], None]


@dataclass
class Setup:
    """A study resolved: its config, dataset, base, orders, seeds and cells."""

    out: Path
    base: dict[str, Any]
    cfg: RunCfg
    data_path: str
    base_path: str
    tasks: list[str]
    descriptions: dict[str, str]
    orders: list[tuple[str, ...]]
    seeds: tuple[int, ...]
    cells: list[Cell]
    data_ready: bool

    def cell_cfg(self, cell: Cell, overrides: dict[str, Any] | None = None) -> RunCfg:
        return cell_cfg(self.base, cell, self.out, self.data_path, self.base_path, overrides)


def setup(config: str | None, data: str | None, methods: str | None, orders: str, seeds: str, out: str | None,
          overrides: Sequence[str] = (), log: Log = print, dry_run: bool = False) -> Setup:
    """Resolve the study. Unless ``dry_run``: generate its dataset once (``out/data``, unless ``data``), build the
    base if missing, and record (or check) the study in ``out/study_spec.json``."""
    from cl_service.data.shards import ShardDataset
    from cl_service.sweep.space import load_base

    ov = list(overrides) + ([f"data.path={data}"] if data else []) + ([f"methods=[{methods}]"] if methods else [])
    base = load_base(config, ov)
    out_dir = Path(out or (str(base["out"]).rstrip("/") + "-study")).resolve()
    cfg = from_dict(RunCfg, {**base, "out": str(out_dir)})
    seed_list = parse_seeds(seeds)
    if dry_run:
        data_path = str(cfg.data.path or out_dir / "data")
        try:
            ds = ShardDataset(data_path)
            stream, desc, ready = ds.tasks, {t: ds.task_meta(t)["description"] for t in ds.tasks}, True
        except Exception:  # noqa: BLE001  (not generated yet: the built-in benchmark's own stream)
            from cl_service.data.synth import BENCHMARKS

            spec = BENCHMARKS.get(cfg.data.benchmark)
            stream, desc, ready = spec.task_names, {t.name: t.description for t in spec.tasks}, False
        from cl_service.models.store import base_path as store_base_path

        base_path = str(Path(cfg.base.path).resolve() if cfg.base.path else store_base_path(cfg.base.profile))
    else:
        from cl_service.models.store import ensure_base
        from cl_service.run import prepare_dataset

        out_dir.mkdir(parents=True, exist_ok=True)
        data_path = str(prepare_dataset(cfg, out_dir, log))
        base_path = str(Path(cfg.base.path or ensure_base(cfg.base.profile, log=log)).resolve())
        ds = ShardDataset(data_path)
        stream, desc, ready = ds.tasks, {t: ds.task_meta(t)["description"] for t in ds.tasks}, True
    tasks = cfg.data.stream(stream)  # the benchmark's own order (or the config's data.order)
    order_list = study_orders(orders, tasks, cfg.seed)
    base["data"] = {**base.get("data", {}), "order": list(tasks)}  # each cell sets its own
    check_spec(out_dir, base, order_list, seed_list, write=not dry_run)
    return Setup(out_dir, base, cfg, data_path, base_path, tasks, desc, order_list, seed_list,
                 make_cells(order_list, seed_list), ready)


def plan(s: Setup) -> dict[str, Any]:
    """:func:`cl_service.study.plan.job_plan` of every cell of ``s``."""
    stages = {c.id: stream_jobs(s.cell_cfg(c), c.order, s.descriptions, s.base_path, s.data_path) for c in s.cells}
    return job_plan(s.cells, stages, s.out / "cache" if s.data_ready else None)


def describe(s: Setup, p: dict[str, Any]) -> list[str]:
    """The dry run's lines: cells and their state, jobs to train and jobs shared."""
    lines = [f"study: {len(s.orders)} order(s) x {len(s.seeds)} seed(s) = {len(s.cells)} cells; methods "
             f"{', '.join(s.cfg.methods)}; out {s.out}"]
    for c in s.cells:
        state = "done" if done_cell(s.out, c) else ("started" if (s.out / "cells" / c.id).exists() else "to run")
        pc = p["per_cell"][c.id]
        lines.append(f"  {c.id:8s} {' -> '.join(c.order)}  seed {c.seed}  [{state}]  jobs {pc['jobs']}: trains "
                     f"{pc['trains']}, shares {pc['shares']}")
    lines.append(f"jobs: {p['jobs']} in all cells; {p['trainings']} distinct trainings ({p['already_trained']} "
                 f"done, {p['to_train']} to train), {p['shared']} shared ({p['from_cache']} repeats of a job another "
                 f"cell trains, {p['copies']} copies of an identical job in the same cell)")
    for sj in p["shared_jobs"]:
        lines.append(f"  shared: {sj['job']} (seed {sj['seed']}) in cells {', '.join(sj['cells'])}")
    return lines


def cell_need(cfg: RunCfg) -> dict[str, float]:
    """What one cell's training holds while it runs: ``{"CPU", "GPU"}``."""
    if cfg.ray.num_workers == 0:
        return {"CPU": max(1.0, cfg.ray.cpus_per_worker), "GPU": 1.0 if cfg.ray.use_gpu else 0.0}
    return {"CPU": cfg.ray.num_workers * cfg.ray.cpus_per_worker,
            "GPU": cfg.ray.num_workers * cfg.ray.gpus_per_worker if cfg.ray.use_gpu else 0.0}


def concurrency(cfg: RunCfg, resources: dict[str, float], cap: int | None = None) -> int:
    """Cells at once: the cluster's resources divided by :func:`cell_need` (at least 1, at most ``cap``)."""
    need = cell_need(cfg)
    n = min(int(resources.get(k, 0.0) // v) for k, v in need.items() if v > 0) if any(need.values()) else 1
    n = max(1, n)
    return min(n, cap) if cap else n


def _cell_main(cell: dict[str, Any], cfg: dict[str, Any], study_dir: str) -> dict[str, Any]:
    """Body of a cell's Ray task."""
    from cl_service.on_ray.stream import run
    from cl_service.study.cell import run_cell

    c = Cell(int(cell["order_index"]), tuple(cell["order"]), int(cell["seed"]))
    rc = from_dict(RunCfg, cfg)

    def log(m: str) -> None:
        print(m if m.startswith("[cell ") else f"[cell {c.id}] {m}", flush=True)

    return run_cell(c, rc, study_dir, lambda cf, wrap: run(cf, log, wrap_trainer=wrap), log,
                    lock_timeout_s=rc.ray.stall_timeout_s)


class _Signals:
    """SIGINT/SIGTERM while cells run: remembered (the driver cancels its cells and exits); a second one aborts."""

    def __init__(self, log: Log) -> None:
        self.log, self.caught, self.old = log, [], {}

    def __enter__(self) -> "_Signals":
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.caught.append(signum)
        if len(self.caught) > 1:
            raise KeyboardInterrupt
        self.log(f"[study] {signal.Signals(signum).name}: stopping the running cells (again to abort); rerun the "
                 "study with the same --out to finish them")

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def _run_cells(s: Setup, todo: list[Cell], n: int, log: Log) -> tuple[list[int], dict[str, str]]:
    """Run ``todo`` as Ray tasks, ``n`` at once; returns the signals that stopped it and the failed cells."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0)
    ov = {"eval": {"threads": max(1, int(cpus // n))}} if n > 1 and s.cfg.eval.threads == 0 else None
    need = cell_need(s.cfg)
    opts: dict[str, Any] = ({"num_cpus": need["CPU"], "num_gpus": need["GPU"]} if s.cfg.ray.num_workers == 0
                            else {"num_cpus": 0})
    task = ray.remote(_cell_main).options(**opts, max_retries=0)
    pending, running, failed = list(todo), {}, {}
    with _Signals(log) as sig:
        while (pending or running) and not sig.caught:
            while pending and len(running) < n:
                c = pending.pop(0)
                running[task.remote(c.to_dict(), _plain(s.cell_cfg(c, ov)), str(s.out))] = c
                log(f"[study] cell {c.id} started ({len(running)} running, {len(pending)} waiting)")
            ready, _ = ray.wait(list(running), num_returns=1, timeout=2.0)
            for ref in ready:
                c = running.pop(ref)
                try:
                    rec = ray.get(ref)
                    mft = ", ".join(f"{m} {v['MFT']:.1f}" for m, v in rec["metrics"].items() if v["MFT"] is not None)
                    log(f"[study] cell {c.id} done in {rec['wall_s']:.0f} s: MFT {mft}")
                except Exception as e:  # noqa: BLE001  (a failed cell: the others go on; a rerun retries it)
                    failed[c.id] = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
                    log(f"[study] cell {c.id} FAILED: {failed[c.id]}")
        if sig.caught:
            for ref, c in running.items():
                ray.cancel(ref, force=True)
                log(f"[study] cell {c.id} cancelled")
    return sig.caught, failed


def _plain(cfg: RunCfg) -> dict[str, Any]:
    from cl_service._cfgload import to_dict

    return to_dict(cfg)


def run_study(config: str | None, data: str | None, methods: str | None, orders: str, seeds: str,
              out: str | None, overrides: Sequence[str] = (), log: Log = print, command: str | None = None,
              max_concurrent: int | None = None) -> dict[str, Any]:
    """Run (or resume) a study on the connected/local Ray cluster; writes study.json, report.md and plots.
    Returns the study.json content plus ``exit``: 0 when every cell is done, 1 when some failed, 128 + the signal
    when interrupted."""
    import ray

    from cl_service.data.shards import ShardDataset
    from cl_service.on_ray.local import ensure_ray
    from cl_service.study.items import load_test_items
    from cl_service.study.report import write_study

    t0 = time.time()
    s = setup(config, data, methods, orders, seeds, out, overrides, log)
    p = plan(s)
    for line in describe(s, p):
        log(line)
    todo = [c for c in s.cells if done_cell(s.out, c) is None]
    caught: list[int] = []
    failed: dict[str, str] = {}
    if todo:
        started = ensure_ray(log, "study")
        try:
            n = concurrency(s.cfg, ray.cluster_resources(), max_concurrent)
            log(f"[study] {len(todo)} cell(s) to run, {n} at once (each holds {cell_need(s.cfg)})")
            caught, failed = _run_cells(s, todo, n, log)
        finally:
            if started:
                ray.shutdown()
    records = {c.id: r for c in s.cells if (r := done_cell(s.out, c)) is not None}
    finished = [c for c in s.cells if c.id in records]
    samples = load_test_items(ShardDataset(s.data_path), s.tasks)
    wall = time.time() - t0
    info = {"benchmark": ShardDataset(s.data_path).manifest.get("benchmark") or s.cfg.name, "orders": s.orders,
            "seeds": s.seeds, "jobs": p, "trained": len(read_trainings(s.out)),
            "wall_s": wall if todo else None, "command": command if todo else None}
    if not todo:  # a launch that ran nothing keeps the last real launch's figures
        prev = _read(s.out / "study.json")
        info["wall_s"], info["command"] = prev.get("wall_s"), prev.get("command")
    result = write_study(s.out, finished, s.cells, records, list(s.cfg.methods), samples, info)
    result["exit"] = 128 + caught[0] if caught else (1 if failed or len(finished) < len(s.cells) else 0)
    log(f"[study] {len(finished)}/{len(s.cells)} cells done; jobs trained {result['trained']}, shared "
        f"{p['shared']}; wall time {wall:.0f} s; report {s.out / 'report.md'}")
    return result


def _read(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def main(argv: Sequence[str] | None = None) -> int:
    from cl_service.study.args import add_arguments

    p = argparse.ArgumentParser(description="A study: a CL config over several task orders and seeds, on Ray.")
    add_arguments(p)
    a = p.parse_args(argv)
    result = run_study(a.config, a.data, a.methods, a.orders, a.seeds, a.out, a.overrides,
                       log=lambda m: print(m, flush=True), command=" ".join(["python", *sys.argv]),
                       max_concurrent=a.max_concurrent)
    return int(result["exit"])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
