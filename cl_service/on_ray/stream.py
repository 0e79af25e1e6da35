"""Run a CL stream with its training on Ray Train: the body of ``workloads/run_stream.py`` and ``clsvc run``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from cl_service.config import RunCfg, load_run_cfg
from cl_service.on_ray.local import driver_node_ip, init_local


def parse_args(argv: Sequence[str] | None = None) -> tuple[RunCfg, argparse.Namespace]:
    p = argparse.ArgumentParser(description="Run a continual-learning stream (MR-LoRA and baselines).")
    p.add_argument("--config", default=None, help="RunCfg YAML (workloads/configs/*.yaml)")
    p.add_argument("--data", default=None, help="shard dataset (clsvc data ingest/synth); default: the config's")
    p.add_argument("--methods", default=None, help="comma-separated methods; default: the config's")
    p.add_argument("--out", default=None, help="results folder; rerun with the same folder to resume")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. expert.lora.rank=16")
    a = p.parse_args(argv)
    ov = list(a.overrides)
    if a.data:
        ov.append(f"data.path={a.data}")
    if a.methods:
        ov.append(f"methods=[{a.methods}]")
    if a.out:
        ov.append(f"out={a.out}")
    return load_run_cfg(a.config, ov), a


def run(cfg: RunCfg, log=print, wrap_trainer: Callable[[Any], Any] | None = None) -> dict:
    """Run ``cfg``; training on Ray Train unless ``ray.num_workers == 0`` (then in this process, and so is
    evaluation); evaluation on evaluator actors (:mod:`cl_service.on_ray.evaluate`) or in this driver.
    ``wrap_trainer`` (optional) wraps the trainer backend (a study's cells: the shared adapter cache)."""
    from cl_service.run import LocalTrainer, run_stream

    wrap = wrap_trainer or (lambda t: t)

    if cfg.ray.num_workers == 0:
        if cfg.ray.strategy != "ddp":
            raise ValueError(f"ray.strategy={cfg.ray.strategy} needs Ray Train workers (ray.num_workers >= 1)")
        from cl_service.models.placement import train_device

        return run_stream(cfg, wrap(LocalTrainer(train_device(cfg))), log=log)
    import ray

    from cl_service.on_ray.evaluate import make_evaluator
    from cl_service.on_ray.train import RayTrainer

    started = False
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            # A cluster on loopback: pin the driver there too (Ray would otherwise pick the external interface).
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True,
                     _node_ip_address=driver_node_ip(os.environ["RAY_ADDRESS"]))
        else:  # no cluster given: a local one, on loopback
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            init_local(log)  # with its dashboard on 127.0.0.1
        started = True
    try:
        storage = cfg.ray.storage_path or str(Path(cfg.out).resolve() / "ray")
        env = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(max(1, int(cfg.ray.cpus_per_worker)))}
        # Evaluation: evaluator actors holding the base (eval.num_workers), or this driver between training runs.
        evaluator = make_evaluator(cfg, log, env)
        trainer = RayTrainer(cfg.ray, storage, env, persistent=_persistent(cfg, evaluator, log))
        try:
            return run_stream(cfg, wrap(trainer), log=log, evaluator=evaluator)
        finally:
            trainer.close()  # the persistent worker group, also on an error or interrupt
    finally:
        if started:
            ray.shutdown()


def _persistent(cfg: RunCfg, evaluator, log) -> bool:
    """``ray.persistent_workers``, unless ``parallel_experts`` or evaluator actors that stop between stages so
    that training can be scheduled (an idle group holding its resources would starve them)."""
    if not cfg.ray.persistent_workers or cfg.ray.parallel_experts:
        return False
    if not getattr(evaluator, "resident", True):
        log("training: a worker group per stage (ray.persistent_workers): the evaluator actors need its "
            "resources between stages")
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_args(argv)
    run(cfg, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
