"""Experiment tracking: scalars a person can watch while a run goes (TensorBoard, MLflow, W&B).

A :class:`Tracker` takes ``log_scalars(step, {name: value}, prefix)``, ``log_params`` and ``close``; backends are
registered by name in :data:`TRACKERS` and picked by ``tracking.backend`` (:class:`TrackingCfg`). What a run sends
(each training step, each (method, stage) evaluation, the final CL metrics) is in
:mod:`cl_service.tracking.stream`. Nothing here imports a backend's package until a tracker is opened.
"""

from __future__ import annotations

from cl_service.tracking.base import (STATUSES, TRACKERS, Tracker, TrackingCfg, TrackingUnavailable,
                                      check_available, open_tracker, tracking_dir)
from cl_service.tracking import backends as _backends  # noqa: E402,F401  (registers the backends)

__all__ = ["STATUSES", "TRACKERS", "Tracker", "TrackingCfg", "TrackingUnavailable", "check_available", "open_tracker",
           "tracking_dir"]
