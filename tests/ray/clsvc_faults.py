"""Faults the Ray tests inject into their own workers: nothing in cl_service knows of them.

:func:`install` is the ``worker_process_setup_hook`` of every Ray job the tests start (the session's, see
``conftest.ray_local``; a ``clsvc run`` subprocess's through Ray's ``RAY_RUNTIME_ENV_HOOK``, :func:`runtime_env`).
It does nothing unless the worker's environment has :data:`ENV` (a test sets it in the worker group's env vars
only), whose JSON says what to break:

- ``{"step": 3, "action": "exit"}``: the training worker dies (``os._exit``) after optimizer step 3, as a killed
  worker does; ``"hang"`` instead: it stops making progress (sleeps) there.
- ``{"group_start": true}``: a persistent worker group's ranks fail (raise) as their train function starts. (A
  rank that dies there instead makes Ray Train 2.60 end the run without removing the group's placement group.)
- ``"once": "<folder>"``: each rank fires once (a marker per rank in that folder), not again after a restart.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

ENV = "CLSVC_TEST_FAULT"
HERE = str(Path(__file__).resolve().parent)


def fault_env(**spec) -> dict[str, str]:
    """The env var that injects ``spec`` into the workers that get it."""
    return {ENV: json.dumps(spec)}


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _fire(spec: dict) -> None:
    once = spec.get("once")
    if once:
        try:
            os.close(os.open(str(Path(once) / f"rank{_rank()}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    if spec.get("action", "exit") == "hang":
        time.sleep(3600)
    os._exit(17)


def _after_step(real, spec: dict):
    def train_steps(*args, **kw):
        args = list(args)
        inner = args[5]  # (model, batches, params, cfg, state, on_step, ...) in both loops

        def on_step(st):
            inner(st)
            if st.step == spec["step"]:
                _fire(spec)

        args[5] = on_step
        return real(*args, **kw)

    return train_steps


def install() -> None:
    raw = os.environ.get(ENV)
    if not raw:
        return
    spec = json.loads(raw)
    if "step" in spec:
        from cl_service.train import runner, zero

        runner.train_steps = _after_step(runner.train_steps, spec)
        zero.train_steps_zero = _after_step(zero.train_steps_zero, spec)
    if spec.get("group_start"):
        from cl_service.on_ray import _group

        def group_fn(config):
            raise RuntimeError("injected: the worker group fails before it takes a stage")

        _group._group_fn = group_fn


def runtime_env(env: dict | None) -> dict:
    """``RAY_RUNTIME_ENV_HOOK`` of a driver the tests start: its job's workers import this module and run
    :func:`install`, with the driver's :data:`ENV`."""
    env = dict(env or {})
    env_vars = dict(env.get("env_vars") or {})
    path = os.environ.get("PYTHONPATH", "")
    env_vars["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, path) if p)
    if os.environ.get(ENV):
        env_vars[ENV] = os.environ[ENV]
    env["env_vars"] = env_vars
    env["worker_process_setup_hook"] = "clsvc_faults.install"
    return env
