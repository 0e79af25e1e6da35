"""Ray Train backend: each training job runs in a ``TorchTrainer`` (DDP over gloo/NCCL, or DeepSpeed ZeRO-2).

All jobs of a stage run in one worker group, one after another (a group start costs ~20 s on a small
machine); with ``parallel_experts`` each job gets its own concurrent run. The workers call the same :func:`cl_service.train.runner.run_train_job` as the in-process backend, with
their rank and world size, and with checkpoint hooks: every ``checkpoint_every`` steps rank 0 saves
the adapter and the optimizer/scheduler state and reports it; a restarted worker group
(``FailureConfig(max_failures)``) resumes from ``ray.train.get_checkpoint()`` instead of step 0.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from cl_service.config import RayCfg
from cl_service.train.job import TrainJob


def _train_fn(config: dict[str, Any]) -> None:
    """Train the jobs of one stage, in order, in this worker group (one group start per stage, not per job)."""
    import torch

    from cl_service.adapters.registry import is_complete
    from cl_service.train.runner import load_resume, run_train_job

    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    jobs: list[TrainJob] = config["jobs"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    resume, resume_job = None, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = load_resume(d)
            marker = Path(d) / "job.txt"
            resume_job = marker.read_text() if marker.is_file() else None
    # Decided once, before any rank trains, so every rank skips the same jobs (a restarted group
    # skips the adapters already published).
    pending = [j for j in jobs if not is_complete(j.out_dir, j.key())]
    fail_at = int(os.environ.get("CLSVC_FAIL_AT_STEP", "0"))  # test hook: kill the worker once, mid-training
    for job in pending:
        def on_checkpoint(step: int, loss: float, save, job=job) -> None:
            # Every rank reports (report() is a barrier); only rank 0 attaches the files.
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    save(d)
                    (Path(d) / "job.txt").write_text(job.key())
                ray.train.report({"job": job.name, "step": step, "loss": loss},
                                 checkpoint=Checkpoint.from_directory(d) if rank == 0 else None)

        mine = resume if resume_job == job.key() else None
        run_train_job(job, rank=rank, world_size=world, resume=mine, on_checkpoint=on_checkpoint,
                      checkpoint_every=int(config["checkpoint_every"]),
                      fail_at_step=fail_at if ckpt is None else 0,
                      log=_say if rank == 0 else None,
                      strategy=config.get("strategy", "ddp"))


def _say(message: str) -> None:
    """One progress line in the job log. Not ``print``: Ray Train patches the workers' ``print`` to tee into
    its logger as well, which printed every line twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _scaling(cfg: RayCfg) -> ScalingConfig:
    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                         resources_per_worker={"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {}))


def make_trainer(jobs: list[TrainJob], cfg: RayCfg, storage: str, env: dict[str, str] | None = None) -> TorchTrainer:
    import hashlib

    key = hashlib.sha256("".join(j.key() + j.out_dir for j in jobs).encode()).hexdigest()[:12]
    name = (jobs[0].name.replace("/", "_") + (f"+{len(jobs) - 1}" if len(jobs) > 1 else "")) + "-" + key
    # Read by the TrainController, which Ray Train starts with the driver's value of this variable.
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(cfg.poll_interval_s)
    config = {"jobs": jobs, "checkpoint_every": cfg.checkpoint_every, "threads": max(1, int(cfg.cpus_per_worker)),
              "strategy": cfg.strategy}
    return TorchTrainer(
        _train_fn,
        train_loop_config=config,
        scaling_config=_scaling(cfg),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             worker_runtime_env={"env_vars": env or {}}),
    )


class RayTrainer:
    """Trainer backend of :func:`cl_service.run.run_stream` on a Ray cluster."""

    def __init__(self, cfg: RayCfg, storage: str, env: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        self.storage = str(Path(storage).resolve()) if "://" not in storage else storage
        self.env = env or {}

    def fit(self, jobs: list[TrainJob]) -> dict[str, float]:
        times: dict[str, float] = {}
        if self.cfg.parallel_experts and len(jobs) > 1:
            # Independent jobs at once: one Ray Train run each, driven from remote tasks.
            refs = {job.name: _fit_remote.remote([job], self.cfg, self.storage, self.env) for job in jobs}
            ready, not_ready = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.cfg.timeout_s)
            if not_ready:
                for r in not_ready:
                    ray.cancel(r, force=True)
                raise TimeoutError(f"{len(not_ready)} training job(s) did not finish in {self.cfg.timeout_s:.0f} s")
            for name, ref in refs.items():
                times[name] = ray.get(ref)
            return times
        total = _fit(jobs, self.cfg, self.storage, self.env)
        return {"+".join(j.name for j in jobs) if len(jobs) > 1 else jobs[0].name: total}


def _fit(jobs: list[TrainJob], cfg: RayCfg, storage: str, env: dict[str, str]) -> float:
    from cl_service.adapters.registry import is_complete

    t0 = time.perf_counter()
    result = make_trainer(jobs, cfg, storage, env).fit()
    if result.error is not None:
        raise RuntimeError(f"training of {[j.name for j in jobs]} failed: {result.error}")
    for job in jobs:
        if not is_complete(job.out_dir, job.key()):
            raise RuntimeError(f"training job {job.name} finished but its adapter {job.out_dir} is not complete")
    return time.perf_counter() - t0


@ray.remote(num_cpus=0)
def _fit_remote(jobs: list[TrainJob], cfg: RayCfg, storage: str, env: dict[str, str]) -> float:
    return _fit(jobs, cfg, storage, env)
