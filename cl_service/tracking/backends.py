"""The tracking backends: ``tensorboard`` (tensorboardX event files), ``mlflow``, ``wandb``, ``none``.

Each factory imports its package only when a tracker is opened; :func:`cl_service.tracking.check_available` has
already said which extra installs a missing one. TensorBoard event files are append-only streams that
TensorBoard reads while they grow, so they are flushed rather than written atomically.
"""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path
from typing import Any, Mapping

from cl_service.tracking.base import STATUSES, TRACKERS, TrackingCfg


def _finite(values: Mapping[str, float | None], prefix: str) -> dict[str, float]:
    """``{prefix/name: float}`` of the values that are numbers and finite."""
    out = {}
    for k, v in values.items():
        if v is None or isinstance(v, bool):
            continue
        v = float(v)
        if math.isfinite(v):
            out[f"{prefix}/{k}" if prefix else k] = v
    return out


class NullTracker:
    """``tracking.backend=none``: records nothing, writes nothing."""

    def log_scalars(self, step: int, values: Mapping[str, float | None], prefix: str = "") -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self, status: str = "finished") -> None:
        pass


def _status(status: str) -> str:
    if status not in STATUSES:
        raise ValueError(f"status {status!r}; known: {', '.join(STATUSES)}")
    return status


class TensorBoardTracker:
    """Event files in ``dir/run_name`` (tensorboardX): ``tensorboard --logdir dir`` shows each run by name."""

    def __init__(self, logdir: Path) -> None:
        from tensorboardX import SummaryWriter

        self.logdir = logdir
        self.writer = SummaryWriter(logdir=str(logdir), flush_secs=10, max_queue=1000)
        self.location = f"TensorBoard event files in {logdir} (tensorboard --logdir {logdir.parent})"

    def log_scalars(self, step: int, values: Mapping[str, float | None], prefix: str = "") -> None:
        for tag, v in _finite(values, prefix).items():
            self.writer.add_scalar(tag, v, global_step=int(step))

    def log_params(self, params: Mapping[str, Any]) -> None:
        text = "\n".join(f"    {k}: {json.dumps(v, default=str)}" for k, v in sorted(params.items()))
        self.writer.add_text("config", text, global_step=0)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, status: str = "finished") -> None:
        # TensorBoard has no run status: a run that did not finish says so in its text, beside the config.
        if _status(status) != "finished":
            self.writer.add_text("status", status, global_step=0)
        self.writer.close()


def _sqlite_uri(dir: Path) -> str:
    """MLflow's default store for a run: a SQLite database in ``dir`` (MLflow 3 refuses new file stores)."""
    dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{dir / 'mlflow.db'}"


class MLflowTracker:
    """One MLflow run (``run_name``) in experiment ``project``, through :class:`mlflow.MlflowClient` (no global
    active run): a tracking server at ``tracking.uri``, or ``dir/mlflow.db`` (``mlflow ui --backend-store-uri
    sqlite:///<dir>/mlflow.db``)."""

    def __init__(self, uri: str, project: str, run_name: str) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(project)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(project)
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        self.location = f"MLflow run {run_name} ({self.run_id}) of experiment {project} at {uri}"

    def log_scalars(self, step: int, values: Mapping[str, float | None], prefix: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, int(step)) for k, v in _finite(values, prefix).items()]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, json.dumps(v, default=str)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow's batch limit for params
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def flush(self) -> None:
        pass

    def close(self, status: str = "finished") -> None:
        self.client.set_terminated(self.run_id, status=_status(status).upper())


class WandbTracker:
    """One W&B run. Every prefix gets its own step axis (``<prefix>/step``): each training job's curve starts at
    step 1, and W&B's own step must only grow."""

    def __init__(self, dir: Path, project: str, run_name: str) -> None:
        import wandb

        dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=run_name, dir=str(dir))
        self.location = f"W&B run {run_name} of project {project} ({getattr(self.run, 'url', None) or dir})"
        self._axes: set[str] = set()

    def log_scalars(self, step: int, values: Mapping[str, float | None], prefix: str = "") -> None:
        data: dict[str, float] = dict(_finite(values, prefix))
        if not data:
            return
        axis = f"{prefix}/step" if prefix else "step"
        if axis not in self._axes:
            self.run.define_metric(axis)
            self.run.define_metric(f"{prefix}/*" if prefix else "*", step_metric=axis)
            self._axes.add(axis)
        data[axis] = int(step)
        self.run.log(data)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.run.config.update(dict(params), allow_val_change=True)

    def flush(self) -> None:
        pass

    def close(self, status: str = "finished") -> None:
        # W&B marks a run that exits non-zero as failed; 130 is an interrupted process's exit code (128 + SIGINT).
        self.run.finish(exit_code={"finished": 0, "failed": 1, "killed": 130}[_status(status)])


TRACKERS.register("none", lambda cfg, dir, project, run_name: NullTracker())
TRACKERS.register("tensorboard", lambda cfg, dir, project, run_name: TensorBoardTracker(dir / run_name))
TRACKERS.register("mlflow", lambda cfg, dir, project, run_name: MLflowTracker(cfg.uri or _sqlite_uri(dir), project,
                                                                             run_name))
TRACKERS.register("wandb", lambda cfg, dir, project, run_name: WandbTracker(dir, project, run_name))


def read_tensorboard_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files under ``logdir``: ``{tag: [(step, value), ...]}`` in file order.

    Reads the TFRecord framing (length, its CRC, the ``Event`` proto, its CRC) directly, so it needs neither
    TensorFlow nor the tensorboard package; CRCs are not checked."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        data = f.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack_from("<Q", data, pos)
            if pos + 12 + n + 4 > len(data):
                break  # a record still being written
            ev = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((int(ev.step), float(v.simple_value)))
    return out


__all__ = ["MLflowTracker", "NullTracker", "TensorBoardTracker", "TrackingCfg", "WandbTracker",
           "read_tensorboard_scalars"]
