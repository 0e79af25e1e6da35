"""Ray Tune driver of a sweep: one Tune trial per configuration, Ray Train workers inside each trial.

Train V2 pattern: the trial function (:func:`_trial_fn`) is a light driver that runs the CL stream
(:func:`cl_service.sweep.trial.run_trial`); each stage's adapters train in a ``TorchTrainer``
(:class:`cl_service.on_ray.train.RayTrainer`) whose workers get their own resources. After each stage
the trial reports its metrics with ``tune.report``; an ``ASHAScheduler`` (``time_attr=training_iteration``
= stages) stops trials below the rung's quantile. ``max_concurrent_trials`` comes from the cluster's
resources divided by one trial's workers. The space is expanded by the library (stable trial ids), so a
restarted sweep launches only the trials without a done-record.

Only the scheduler's own decisions are recorded as early stops (:class:`_ASHA` remembers them): a trial cut
short by SIGINT/SIGTERM (handled like Tune's Ctrl-C: running trials stopped, then the driver exits 128 + the
signal), by ``time_budget_s`` or by an error is recorded as interrupted/failed, which the next launch finishes.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import ray
from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from cl_service.config import RunCfg
from cl_service.on_ray.local import ensure_ray
from cl_service.sweep.space import Space, TrialSpec, expand, load_base, load_space, trial_cfg, with_seeds
from cl_service.sweep.report import sweep_exit_code  # noqa: F401  (the CLI's exit status)
from cl_service.tracking import check_available as check_tracking
from cl_service.sweep.trial import (PROGRESS, done_record, mark_stopped, mark_unfinished, pending_trials, read_json,
                                    run_trial, trial_dir)

Log = Callable[[str], None]
_DRIVER_MEMORY = 256 * 1024**2


def _trial_fn(config: dict[str, Any], shared: dict[str, Any]) -> None:
    """One Tune trial: the CL stream of ``config["trial"]``, stage metrics forwarded to Tune."""
    import torch

    from cl_service.on_ray.train import RayTrainer
    from cl_service.run import LocalTrainer

    spec = TrialSpec.from_dict(config["trial"])
    cfg: RunCfg = trial_cfg(shared["base"], spec, "/", shared["data_path"], shared["base_path"])
    torch.set_num_threads(max(1, int(shared["eval_threads"])))
    if cfg.ray.num_workers == 0:
        trainer: Any = LocalTrainer()
    else:
        storage = cfg.ray.storage_path or str(Path(shared["sweep_dir"]) / "trials" / spec.id / "ray")
        env = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(max(1, int(cfg.ray.cpus_per_worker)))}
        trainer = RayTrainer(cfg.ray, storage, env)
    run_trial(spec, shared["base"], shared["sweep_dir"], trainer, report=tune.report,
              data_path=shared["data_path"], base_path=shared["base_path"],
              log=lambda m: print(m, flush=True), lock_timeout_s=cfg.ray.stall_timeout_s)


def concurrency(cfg: RunCfg, space: Space, resources: dict[str, float]) -> tuple[int, dict[str, float]]:
    """(max concurrent trials, resources of one trial's driver) from the cluster's resources."""
    s = space.settings
    if cfg.ray.num_workers == 0:  # training runs in the trial process itself
        per = {"cpu": max(1.0, s.trial_cpus)}
        n = int(resources.get("CPU", 1) // per["cpu"])
    else:
        # A trial's driver reserves no CPU by default (it trains nothing; it routes/evaluates while its own
        # workers are idle). Ray refuses an empty bundle, so it reserves a little memory instead.
        per = {"cpu": s.trial_cpus, "memory": _DRIVER_MEMORY}
        need = cfg.ray.num_workers * cfg.ray.cpus_per_worker + s.trial_cpus
        n = int(resources.get("CPU", 1) // need) if need > 0 else 1
        if cfg.ray.use_gpu:
            n = min(n, int(resources.get("GPU", 0) // cfg.ray.num_workers))
    n = max(1, n)
    if s.max_concurrent_trials is not None:
        n = min(n, s.max_concurrent_trials)
    return n, per


class _ASHA(ASHAScheduler):
    """ASHA that remembers its own early stops (trial id -> stages reached). Once ``fit()`` returns, a trial
    that reported some stages but not all may have been stopped by it, interrupted, or out of time: only
    this record tells them apart."""

    def __init__(self, log: Log, max_t: int, **kw: Any) -> None:
        super().__init__(max_t=max_t, **kw)
        self.log, self.last_stage, self.stopped = log, max_t, {}

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        reached = int(result.get("training_iteration", 0))
        if action == self.STOP and reached < self.last_stage:  # (at the last stage STOP just ends a finished trial)
            tid = trial.config["trial"]["id"]
            self.stopped[tid] = reached
            self.log(f"[sweep] ASHA stops trial {tid} after stage {reached}")
        return action


@contextlib.contextmanager
def _stop_on_signals(log: Log) -> Iterator[list[int]]:
    """While the Tune run lasts, SIGINT and SIGTERM end it as Tune's own Ctrl-C does (running trials stopped,
    experiment state saved) and are remembered in the yielded list; a second signal aborts at once. Without
    this, SIGTERM killed the driver outright and a Ctrl-C'd run looked like a finished one."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield caught
        return

    def handler(signum: int, frame: Any) -> None:
        caught.append(signum)
        tune_stop = signal.getsignal(signal.SIGUSR1)  # Tune's graceful stop, installed while fit() runs
        if len(caught) > 1 or not callable(tune_stop):
            raise KeyboardInterrupt
        log(f"[sweep] {signal.Signals(signum).name}: stopping the running trials (again to abort); "
            "rerun the sweep with the same --out to finish them")
        tune_stop(signum, frame)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours replaces Tune's, which would not tell us it fired
    try:
        yield caught
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = env


class _Progress(Callback):
    """Driver-side progress lines per trial result, and the scheduler's stop decisions."""

    def __init__(self, log: Log, stages: int, metric: str, total: int, stops: dict[str, int] | None = None) -> None:
        self.log, self.stages, self.metric, self.total = log, stages, metric, total
        self.stops = {} if stops is None else stops  # the scheduler's early stops (:class:`_ASHA`)
        self.last: dict[str, dict[str, Any]] = {}
        self.finished = 0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        tid = trial.config["trial"]["id"]
        self.last[tid] = result
        v = result.get(self.metric)
        self.log(f"[sweep] trial {tid} stage {result.get('stage')}/{self.stages} {result.get('task')}: "
                 f"{self.metric} {'-' if v is None else f'{v:.1f}'}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        tid = trial.config["trial"]["id"]
        self.finished += 1
        st = self.last.get(tid, {}).get("stage", 0)
        what = ("finished all stages" if st >= self.stages else f"stopped by the scheduler after stage {st}"
                if tid in self.stops else f"ended after stage {st}, not finished")
        self.log(f"[sweep] trial {tid} {what} ({self.finished}/{self.total} trials)")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.finished += 1
        self.log(f"[sweep] trial {trial.config['trial']['id']} FAILED ({self.finished}/{self.total}); "
                 f"rerun the sweep with the same --out to retry it")


def run_sweep(config: str | Path | None, space_path: str | Path, out: str | Path | None = None,
              overrides: Sequence[str] = (), log: Log = print, command: str | None = None,
              seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep on the connected/local Ray cluster; writes sweep.csv/json and report.md. ``seeds``
    (``--seeds``) replaces the space file's ``sweep.seeds``: every trial runs at each."""
    from cl_service.models.store import ensure_base
    from cl_service.run import prepare_dataset
    from cl_service.sweep.report import write_sweep_report

    t0 = time.time()
    base = load_base(config, overrides)
    space = with_seeds(load_space(space_path), seeds)
    trials = expand(space, base)
    out = Path(out or (str(base["out"]).rstrip("/") + "-sweep")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base_cfg = trial_cfg(base, trials[0], out / "prep")
    check_tracking(base_cfg.tracking)  # every trial logs to it: a missing package fails here, not in each trial
    data_path = str(prepare_dataset(base_cfg, out, log))
    base_path = str(Path(base_cfg.base.path or ensure_base(base_cfg.base.profile, log=log)).resolve())
    from cl_service.data.shards import ShardDataset

    stages = len([t for t in ShardDataset(data_path).tasks if not base_cfg.data.tasks or t in base_cfg.data.tasks])
    todo = pending_trials(out, trials)
    caught: list[int] = []
    log(f"[sweep] {len(trials)} trial(s) over {', '.join(space.swept_keys())}; {len(trials) - len(todo)} already "
        f"done, {len(todo)} to run; {stages} stages each; out {out}")
    if todo:
        started = ensure_ray(log, "sweep")
        try:
            n, per = concurrency(base_cfg, space, ray.cluster_resources())
            caught = _tune(todo, space, base, out, data_path, base_path, stages, n, per, log)
        finally:
            if started:
                ray.shutdown()
    wall = time.time() - t0
    result = write_sweep_report(out, space, trials, stages, wall_s=wall if todo else None,
                                command=command if todo else None)
    result["interrupted"] = signal.Signals(caught[0]).name if caught else None
    log(f"[sweep] wall time {wall:.0f} s; report {out / 'report.md'}")
    return result


def _tune(todo: list[TrialSpec], space: Space, base: dict[str, Any], out: Path, data_path: str, base_path: str,
          stages: int, n: int, per: dict[str, float], log: Log) -> list[int]:
    """Run the pending trials with Tune; returns the signals that interrupted it (empty: none)."""
    s = space.settings
    if s.asha is not None and stages > s.asha.grace_period:
        scheduler: Any = _ASHA(log, time_attr="training_iteration", max_t=stages,
                               grace_period=s.asha.grace_period, reduction_factor=s.asha.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    cpus = ray.cluster_resources().get("CPU", 1)
    shared = {"base": base, "sweep_dir": str(out), "data_path": data_path, "base_path": base_path,
              "eval_threads": max(1, int(cpus // n))}
    log(f"[sweep] {n} concurrent trial(s) (driver resources {per}), scheduler "
        f"{type(scheduler).__name__} on {s.metric} ({s.mode})")
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial_fn, shared=shared), per),
        param_space={"trial": tune.grid_search([t.to_dict() for t in todo])},
        tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, scheduler=scheduler, max_concurrent_trials=n,
                                    reuse_actors=False, time_budget_s=s.time_budget_s,
                                    trial_name_creator=lambda t: f"trial-{t.config['trial']['id']}",
                                    trial_dirname_creator=lambda t: f"trial-{t.config['trial']['id']}"),
        run_config=tune.RunConfig(name=f"tune-{int(time.time())}", storage_path=str(out / "ray"), verbose=0,
                                  callbacks=[_Progress(log, stages, s.metric, len(todo),
                                                       getattr(scheduler, "stopped", None))]),
    )
    with _stop_on_signals(log) as caught:
        grid = tuner.fit()
    by_id = {t.id: t for t in todo}
    stops = getattr(scheduler, "stopped", {})
    for res in grid:
        tid = (res.config or {}).get("trial", {}).get("id")
        if tid not in by_id or done_record(out, tid) is not None:
            continue
        if tid in stops:
            mark_stopped(out, by_id[tid], f"ASHA stopped it after stage {stops[tid]}", stages=stops[tid])
        elif res.error is not None:
            why = str(res.error).splitlines()[0][:300]
            mark_unfinished(out, by_id[tid], "failed", why)
            log(f"[sweep] trial {tid} failed: {why}")
        elif read_json(trial_dir(out, tid) / PROGRESS):  # started, cut short: the next launch resumes it
            why = (f"interrupted by {signal.Signals(caught[0]).name}" if caught
                   else "the sweep ended first (time_budget_s)")
            rec = mark_unfinished(out, by_id[tid], "interrupted", why)
            log(f"[sweep] trial {tid} {why} after stage {rec['stages']}: not finished, rerun the sweep to finish it")
    return caught


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Ray Tune sweep of a CL run (LoRA rank, router data, lr, ...).")
    p.add_argument("--config", required=True, help="RunCfg YAML (the base of every trial)")
    p.add_argument("--space", required=True, help="SPACE.yaml: dotted keys -> grid/distribution, sweep settings")
    p.add_argument("--out", default=None, help="sweep folder; rerun with the same folder to finish missing trials")
    p.add_argument("--seeds", default=None, help="N (seeds 0..N-1) or a comma-separated list: every trial runs at "
                                                 "each seed, ASHA decides on the mean (default: the space file's)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the base config, e.g. data.test_limit=20")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from cl_service.study.orders import parse_seeds

    a = parse_args(argv)
    return sweep_exit_code(run_sweep(a.config, a.space, a.out, a.overrides, log=lambda m: print(m, flush=True),
                                     command=" ".join(["python", *sys.argv]),
                                     seeds=parse_seeds(a.seeds) if a.seeds else None))


if __name__ == "__main__":
    sys.exit(main())
