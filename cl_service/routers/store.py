"""Save and load the feature routers (prototype, ridge, knn): ``router.safetensors`` + ``router.json``.

A run keeps one folder per (router kind, stage) under ``<out>/routers/<kind>/stage-<i>-<task>/`` so that
serving and later analysis use exactly the router the evaluation used. Writes are atomic (the folder
appears complete or not at all); ``router.json`` holds the kind, the expert pool in order and the
sha256 of the weights, checked on load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from cl_service._atomic import write_folder
from cl_service.routers import nearest as _nearest, prototype as _prototype, ridge as _ridge  # noqa: F401  (register the kinds)
from cl_service.routers.base import ROUTERS

ROUTER_META = "router.json"
ROUTER_WEIGHTS = "router.safetensors"


class RouterFileError(ValueError):
    """A router folder is missing, incomplete or does not match its checksum."""


def router_files(router, extra: dict | None = None) -> dict[str, bytes]:
    """A router's saved form as bytes (``router.safetensors``, ``router.json``): what an evaluator sends to
    the run's driver, which writes the folder (:func:`cl_service._atomic.write_folder`)."""
    from safetensors.numpy import save

    weights = save({k: np.ascontiguousarray(v) for k, v in router.state().items()})
    meta = {"kind": router.kind, "experts": list(router.experts),
            "sha256": hashlib.sha256(weights).hexdigest(), **(extra or {})}
    return {ROUTER_WEIGHTS: weights, ROUTER_META: json.dumps(meta, indent=2).encode()}


def save_router(router, folder: str | Path, extra: dict | None = None) -> Path:
    """Write ``router`` to ``folder`` atomically (see :func:`router_files`)."""
    return write_folder(folder, router_files(router, extra))


def load_router(folder: str | Path, engine=None):
    """The router saved in ``folder``, bound to ``engine`` (which computes its features)."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    meta_path, weights = folder / ROUTER_META, folder / ROUTER_WEIGHTS
    if not meta_path.is_file() or not weights.is_file():
        raise RouterFileError(f"{folder}: not a saved router (needs {ROUTER_META} and {ROUTER_WEIGHTS})")
    meta = json.loads(meta_path.read_text())
    if hashlib.sha256(weights.read_bytes()).hexdigest() != meta.get("sha256"):
        raise RouterFileError(f"{folder}: {ROUTER_WEIGHTS} does not match the checksum in {ROUTER_META}")
    cls = ROUTERS.get(meta["kind"])
    return cls.from_state(tuple(meta["experts"]), load_file(str(weights)), engine)
