"""What a continual-learning run sends to its tracker, all from the driver.

- ``train/<job>/{loss,lr,tokens_per_s}`` at every optimizer step of every job the run trains. The driver reads
  them from the job's ``train_log.json`` once the trainer has returned the job's folder (in process, Ray Train
  workers on any node, the sweep's cache alike), so no worker needs a writer or a path on the driver's disk;
  ``lr`` is the job's schedule (:func:`cl_service.train.loop.learning_rates`).
- ``eval/<method>/...`` at step ``stage + 1`` for every (method, stage) evaluation: ``acc/<task>``, ``acc_seen``
  (mean over the tasks seen so far), ``acc_task`` (the newest task), ``router_acc/<task>``,
  ``router_ms_per_request``, ``train_s``, ``eval_s``.
- ``final/<method>/{MFT,MFN,MAA,BWT,router_acc_min}`` at step ``len(tasks)``.

Each invocation sends what it computed: a resumed run does not send again the jobs and evaluations it verified.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from cl_service.tracking import Tracker, open_tracker


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def job_scalars(job: Any, log: dict[str, Any]) -> list[tuple[int, dict[str, float]]]:
    """``[(step, {"loss", "lr", "tokens_per_s"})]`` of a trained job from its ``train_log.json`` (``log``).

    Steps before a resume have a loss but no timing in the log (the timing is the finishing process's own)."""
    from cl_service.train.loop import learning_rates

    losses = log.get("losses") or []
    lrs = learning_rates(job.train, max(int(log.get("steps") or 0), len(losses)))
    secs, toks = log.get("step_seconds") or [], log.get("step_tokens") or []
    first, world = len(losses) - len(secs), int(log.get("world_size") or 1)
    rows = []
    for k, loss in enumerate(losses):
        vals = {"loss": loss, "lr": lrs[k]}
        j = k - first
        if 0 <= j < min(len(secs), len(toks)) and secs[j] > 0:
            vals["tokens_per_s"] = toks[j] * world / secs[j]
        rows.append((k + 1, vals))
    return rows


def stage_scalars(rec: dict[str, Any]) -> dict[str, float | None]:
    """The scalars of one stage record (:func:`cl_service.eval.stage.evaluate_stage`), in percent and seconds."""
    i, tasks, row = rec["stage"], rec["tasks"], rec["row"]
    vals: dict[str, float | None] = {f"acc/{t}": v for t, v in zip(tasks, row)}
    seen = [v for v in row[: i + 1] if v is not None]
    vals["acc_seen"] = sum(seen) / len(seen) if seen else None
    vals["acc_task"] = row[i]
    for t, v in (rec.get("router_accuracy") or {}).items():
        vals[f"router_acc/{t}"] = v
    if rec.get("router_requests"):
        vals["router_ms_per_request"] = 1000 * rec["router_seconds"] / rec["router_requests"]
    vals["train_s"], vals["eval_s"] = rec.get("train_s"), rec.get("eval_s")
    return vals


class RunTracking:
    """The tracker of one run and what the run sends to it (module docstring)."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    @classmethod
    def open(cls, cfg: Any, out: Path, log: Callable[[str], None] | None = None) -> "RunTracking":
        """The tracker of ``cfg.tracking`` (a :class:`~cl_service.config.RunCfg`) for results folder ``out``;
        records the config as the run's parameters and ``log``s where to look."""
        from cl_service._cfgload import to_dict

        tracker = open_tracker(cfg.tracking, out, run_name=Path(out).name, project=cfg.name)
        if log is not None and getattr(tracker, "location", None):
            log(f"tracking: {tracker.location}")
        tracker.log_params(_flat(to_dict(cfg)))
        tracker.flush()
        return cls(tracker)

    def trainer(self, inner: Any) -> "_TrackedTrainer":
        """``inner`` (a :class:`cl_service.run.Trainer`) that sends every job's steps once it has trained."""
        return _TrackedTrainer(inner, self)

    def jobs(self, jobs: list[Any]) -> None:
        for job in jobs:
            path = Path(job.out_dir) / "train_log.json"
            if not path.is_file():
                continue
            for step, vals in job_scalars(job, json.loads(path.read_text())):
                self.tracker.log_scalars(step, vals, prefix=f"train/{job.name}")
        self.tracker.flush()

    def stage(self, rec: dict[str, Any]) -> None:
        """One (method, stage) evaluation, as it is written."""
        self.tracker.log_scalars(rec["stage"] + 1, stage_scalars(rec), prefix=f"eval/{rec['method']}")
        self.tracker.flush()

    def final(self, metrics: dict[str, Any]) -> None:
        for name, m in metrics["methods"].items():
            ra = m.get("router_accuracy")
            vals = {k: m.get(k) for k in ("MFT", "MFN", "MAA", "BWT")}
            vals["router_acc_min"] = min(ra.values()) if ra else None
            self.tracker.log_scalars(len(metrics["tasks"]), vals, prefix=f"final/{name}")
        self.tracker.flush()

    def flush(self) -> None:
        self.tracker.flush()

    def close(self, error: BaseException | None = None) -> None:
        """End the tracker's run: finished, or ended by ``error`` (``failed``; ``killed`` for an interrupt, or for a
        stream closed from outside before its end, as a sweep's scheduler stops a trial)."""
        status = "finished" if error is None else (
            "killed" if isinstance(error, (KeyboardInterrupt, SystemExit, GeneratorExit)) else "failed")
        self.tracker.close(status)


class _TrackedTrainer:
    def __init__(self, inner: Any, tracking: RunTracking) -> None:
        self.inner, self.tracking = inner, tracking

    def fit(self, jobs: list[Any]) -> dict[str, float]:
        times = self.inner.fit(jobs)
        self.tracking.jobs(jobs)
        return times

    def __getattr__(self, name: str) -> Any:  # the wrapped trainer's other attributes (device, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def for_trial(cfg: Any, sweep_dir: Path, trial_id: str) -> Any:
    """``cfg`` of a sweep trial with its tracking defaults: every trial under ``<sweep>/tracking``, named
    ``trial-<id>`` (or ``<tracking.run_name>-<id>``), so one ``tensorboard --logdir`` shows them side by side."""
    t = cfg.tracking
    name = f"{t.run_name}-{trial_id}" if t.run_name else f"trial-{trial_id}"
    where = (Path(sweep_dir) / (t.dir or "tracking")).resolve()  # relative: from the sweep's folder, not the trial's
    return dataclasses.replace(cfg, tracking=dataclasses.replace(t, dir=str(where), run_name=name))
