"""The tracker protocol, the backends' registry and the tracking config (:mod:`cl_service.tracking` re-exports
them and registers the backends of :mod:`cl_service.tracking.backends`, which import this module)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from cl_service.registry import Registry


class Tracker(Protocol):
    def log_scalars(self, step: int, values: Mapping[str, float | None], prefix: str = "") -> None:
        """Record ``values`` at ``step`` under ``prefix/name`` (None and non-finite values are skipped)."""
        ...

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record the run's settings (flat ``dotted.key -> value``)."""
        ...

    def flush(self) -> None:
        """Make what was logged so far visible (written to disk / sent)."""
        ...

    def close(self, status: str = "finished") -> None:
        """End the run as ``status`` (:data:`STATUSES`): ``finished``, ``failed`` (an error ended it) or ``killed``
        (an interrupt did), which MLflow and W&B show."""
        ...


#: How a run ends, as :meth:`Tracker.close` takes it.
STATUSES = ("finished", "failed", "killed")


class TrackingUnavailable(ImportError):
    """The backend's package is not installed; the message names the extra that installs it."""


#: ``name -> factory(cfg, dir, project, run_name) -> Tracker``; ``dir`` is the resolved ``tracking.dir``.
TRACKERS: Registry[Callable[["TrackingCfg", Path, str, str], Tracker]] = Registry("tracking backend")


@dataclass(frozen=True)
class TrackingCfg:
    """Where a run's scalars go while it runs: loss, lr and tokens/s of every training step, accuracy row, router
    accuracy and times of every (method, stage) evaluation, the final CL metrics."""

    backend: str = "tensorboard"
    """``tensorboard`` (event files under ``dir``: ``tensorboard --logdir <dir>``), ``mlflow`` (extra
    ``tracking-mlflow``), ``wandb`` (extra ``tracking-wandb``; online or offline as W&B's own settings say,
    e.g. ``WANDB_MODE``), or ``none``."""
    dir: str | None = None
    """Folder of the backend's files (TensorBoard event files, MLflow's ``mlflow.db``, W&B's run folder); a relative
    path is taken from the results folder (a sweep: the sweep's folder). Default: ``tracking`` there."""
    run_name: str | None = None
    """The run's name in the backend: TensorBoard's sub-folder of ``dir``, the MLflow or W&B run. Default: the
    results folder's name (a sweep trial: ``trial-<id>``, or ``<run_name>-<id>`` when set)."""
    project: str | None = None
    """The MLflow experiment or W&B project (``mlflow`` / ``wandb`` only). Default: the run's ``name``."""
    uri: str | None = None
    """MLflow tracking URI (``mlflow`` only), e.g. ``http://127.0.0.1:5000``. Default: ``sqlite:///<dir>/mlflow.db``
    (``mlflow ui --backend-store-uri`` that URI shows it)."""

    def __post_init__(self) -> None:
        if self.backend not in TRACKERS:
            raise ValueError(f"backend={self.backend!r} is not a tracking backend; known: {', '.join(TRACKERS.names())}")
        if self.project is not None and self.backend not in ("mlflow", "wandb"):
            raise ValueError(f"project={self.project!r} names an MLflow experiment or W&B project; backend "
                             f"{self.backend!r} has none (tracking.run_name names the run)")
        if self.uri is not None and self.backend != "mlflow":
            raise ValueError(f"uri={self.uri!r} is MLflow's tracking server; backend is {self.backend!r}")


def tracking_dir(cfg: TrackingCfg, out: str | Path) -> Path:
    """The resolved ``tracking.dir`` of a run whose results folder is ``out``."""
    return (Path(out).resolve() / (cfg.dir or "tracking")).resolve()  # an absolute dir stays as it is


def open_tracker(cfg: TrackingCfg, out: str | Path, run_name: str, project: str) -> Tracker:
    """The tracker of ``cfg`` for a run with results folder ``out``; ``run_name`` / ``project`` are the defaults of
    ``tracking.run_name`` / ``tracking.project``. Raises :class:`TrackingUnavailable` when the backend's package is
    missing (before any work: :func:`check_available`)."""
    check_available(cfg)
    return TRACKERS.get(cfg.backend)(cfg, tracking_dir(cfg, out), cfg.project or project, cfg.run_name or run_name)


_PACKAGES = {"tensorboard": ("tensorboardX", "tensorboardX"), "mlflow": ("mlflow", "tracking-mlflow"),
             "wandb": ("wandb", "tracking-wandb")}


def check_available(cfg: TrackingCfg) -> None:
    """Raise :class:`TrackingUnavailable` naming the extra to install when ``cfg.backend``'s package is missing."""
    import importlib.util

    if cfg.backend not in _PACKAGES:
        return
    module, extra = _PACKAGES[cfg.backend]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        what = "pip install tensorboardX" if extra == module else f"pip install 'cl-service[{extra}]' (or {module})"
        raise TrackingUnavailable(f"tracking.backend={cfg.backend} needs the {module} package, which is not "
                                  f"installed: {what}; or set tracking.backend=none")
