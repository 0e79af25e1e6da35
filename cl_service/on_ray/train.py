"""Ray Train backend: each training job runs in a ``TorchTrainer`` (DDP over gloo/NCCL, or DeepSpeed ZeRO-2).

All jobs of a stage run in one worker group, one after another (a group start costs ~15 s on a small machine);
with ``persistent`` (``ray.persistent_workers``, what ``clsvc run`` uses) one group serves every stage of the
run (:mod:`cl_service.on_ray._group`); with ``parallel_experts`` each job gets its own concurrent run. The
workers call the same :func:`cl_service.train.runner.run_train_job` as the in-process backend, on
``ray.train.torch.get_device()`` (their GPU with ``ray.use_gpu``), with their rank and world size.

A job's progress lives in its own folder of ``ray.storage_path``, named after the job and not after the worker
group (:class:`cl_service.train.jobstore.JobStore`): every ``checkpoint_every`` steps each rank stores its part of
a resume point (the adapter and optimizer state on rank 0, its RNG, under DeepSpeed its optimizer partition),
and rank 0 stores the finished adapter there. So a restarted worker group (``FailureConfig(max_failures)``), a
new group, and a rerun of ``clsvc run`` on the same results folder all resume an unfinished job from its last
resume point and take a finished adapter without training it again. The driver copies each finished adapter into
the results folder (:func:`collect_adapters`), verified by its checksums, and then deletes the job's folder; the
adapters jobs start from (``init_adapter``: ``lora_ft`` stages, a continued router, ``olora``, ``moelora``) go
out through the object store (:func:`ship_inits`): workers neither read nor write the driver's results folder,
so nodes need no shared filesystem for results (the base and the dataset they do read).

The driver waits as long as the work progresses: it gives up on a run whose workers reported no progress for
``ray.stall_timeout_s`` (:mod:`cl_service.on_ray._stall`), never because a job is long.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import ray
from ray.train import FailureConfig, RunConfig
from ray.train.torch import TorchConfig, TorchTrainer

from cl_service.config import RayCfg
from cl_service.on_ray._stall import Beat, Beats, Watch
from cl_service.on_ray._workers import Inits, drop_run_folder, run_jobs, scaling, ship_inits
from cl_service.train.job import TrainJob
from cl_service.train.jobstore import JobStore

#: The longest a driver waits for one answer before it looks at the work's progress again.
POLL_S = 2.0


def _train_fn(config: dict[str, Any]) -> None:
    """Train the jobs of one stage, in order, in this worker group (one group start per stage, not per job)."""
    import torch

    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    run_jobs(config["jobs"], config["keys"],  # keys computed by the driver, which can read every init adapter
             config.get("inits") or Inits(), config, config["store"], config.get("beat") or Beat(None, ""))


def run_name(jobs: list[TrainJob]) -> str:
    """A worker group's Ray Train run: named after its first job, unique (nothing resumes by this name)."""
    return (jobs[0].name.replace("/", "_") + (f"+{len(jobs) - 1}" if len(jobs) > 1 else "")
            + f"-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")


def make_trainer(jobs: list[TrainJob], cfg: RayCfg, storage: str, env: dict[str, str] | None = None,
                 inits: Inits | None = None, keys: list[str] | None = None, name: str | None = None,
                 beat: Beat | None = None) -> TorchTrainer:
    """``keys``: the jobs' keys as the driver computed them (it reads every init adapter; this may run on a node
    that cannot)."""
    keys = keys or [j.key() for j in jobs]
    # Read by the TrainController, which Ray Train starts with the driver's value of this variable.
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(cfg.poll_interval_s)
    config = {"jobs": jobs, "keys": keys, "inits": inits or Inits(), "checkpoint_every": cfg.checkpoint_every,
              "threads": max(1, int(cfg.cpus_per_worker)), "strategy": cfg.strategy, "store": JobStore(storage),
              "beat": beat}
    return TorchTrainer(
        _train_fn,
        train_loop_config=config,
        scaling_config=scaling(cfg),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(name=name or run_name(jobs), storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             worker_runtime_env={"env_vars": env or {}}),
    )


class RayTrainer:
    """Trainer backend of :func:`cl_service.run.run_stream` on a Ray cluster.

    ``mirror``: every worker trains from a shipped copy of its init adapter, as a worker on another node than the
    driver's does."""

    def __init__(self, cfg: RayCfg, storage: str, env: dict[str, str] | None = None,
                 mirror: bool = False, persistent: bool = False) -> None:
        self.cfg = cfg
        self.storage = str(Path(storage).resolve()) if "://" not in storage else storage
        self.store = JobStore(self.storage)
        self.env = env or {}
        self.mirror = mirror
        #: ``persistent``: one worker group for every :meth:`fit` until :meth:`close`
        #: (:mod:`cl_service.on_ray._group`; ``ray.persistent_workers``); not for ``parallel_experts``.
        self.group = None
        if persistent and not cfg.parallel_experts:
            from cl_service.on_ray._group import PersistentGroup

            self.group = PersistentGroup(cfg, self.storage, self.env)

    def close(self) -> None:
        """Stop the persistent worker group, if any (nothing is left running); the trainer may be used again."""
        if self.group is not None:
            self.group.close()

    def fit(self, jobs: list[TrainJob]) -> dict[str, float]:
        keys = {id(j): j.key() for j in jobs}  # here, where every init adapter is readable (workers may not)
        # Jobs whose adapter is stored already (trained before the driver stopped) are only collected.
        todo = [j for j in jobs if not self.store.has_adapter(self.store.slot(j.name, keys[id(j)], j.out_dir))]
        times: dict[str, float] = {}
        if todo:
            inits = ship_inits(todo, self.mirror)  # held here until the fit ends: the refs stay alive
            if self.group is not None:
                times["+".join(j.name for j in todo)] = self.group.train(todo, [keys[id(j)] for j in todo], inits)
            else:
                times = self._fit_runs(todo, keys, inits)
        collect_adapters(jobs, [keys[id(j)] for j in jobs], self.store)
        return times

    def _fit_runs(self, jobs: list[TrainJob], keys: dict[int, str], inits: Inits) -> dict[str, float]:
        # Every training run is driven from a remote task, so the driver can cancel it, with the worker group it
        # owns: a run that reports no progress for ray.stall_timeout_s (one that cannot be scheduled, as Train V2
        # then waits for resources forever, or that hangs). Independent jobs (``parallel_experts``) get one run
        # each, at once.
        groups = [[job] for job in jobs] if self.cfg.parallel_experts and len(jobs) > 1 else [jobs]
        beats = Beats.remote()
        names = [run_name(g) for g in groups]
        refs = [_fit_remote.remote(g, self.cfg, self.storage, self.env, inits, [keys[id(j)] for j in g], n,
                                   Beat(beats, n)) for g, n in zip(groups, names)]
        watch = Watch(beats, self.cfg.stall_timeout_s,
                      lambda tag, _: f"training of {[j.name for j in groups[names.index(tag)]]}")
        for n in names:
            watch.start(n)
        pending = list(refs)
        try:
            while pending:
                _, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
                for r, n in zip(refs, names):
                    if r not in pending:
                        watch.stop(n)
                if pending:
                    watch.check()
        except BaseException:
            for r in pending:
                ray.cancel(r, force=True)
            raise
        finally:
            ray.kill(beats)
        times = {}
        for g, r in zip(groups, refs):
            try:
                times["+".join(j.name for j in g)] = ray.get(r)
            except ray.exceptions.RayTaskError as e:
                raise RuntimeError(f"training of {[j.name for j in g]} failed: {e}") from None
        return times


def _fit(jobs: list[TrainJob], cfg: RayCfg, storage: str, env: dict[str, str], inits: Inits | None = None,
         keys: list[str] | None = None, name: str | None = None, beat: Beat | None = None) -> float:
    """Train ``jobs`` in one worker group (their adapters end in the job store); the seconds taken."""
    t0 = time.perf_counter()
    name = name or run_name(jobs)
    try:
        make_trainer(jobs, cfg, storage, env, inits, keys, name, beat).fit()
    finally:
        drop_run_folder(storage, name)
    return time.perf_counter() - t0


def collect_adapters(jobs: list[TrainJob], keys: list[str], store: JobStore) -> None:
    """Bring each job's finished adapter from the job store (a local folder, NFS or ``s3://``) into the job's
    ``out_dir`` on this machine, verified by its checksums, atomically; then delete the job's folder there (the
    adapter now lives in the results folder). Every job is collected that can be: one that fails (no adapter
    stored, or one that did not arrive intact, which is then deleted so that the job trains again) leaves the
    others' in place, and the errors are raised together at the end."""
    from cl_service.adapters.registry import AdapterError, commit_dir, publish_dir, read_adapter, restamp_version

    errors = []
    for job, key in zip(jobs, keys):
        slot = store.slot(job.name, key, job.out_dir)
        if not store.has_adapter(slot):
            errors.append(f"training job {job.name} finished but stored no adapter (in {slot})")
            continue
        stage = publish_dir(job.out_dir)
        try:
            store.take_adapter(slot, stage)
            read_adapter(stage, key)
        except (AdapterError, OSError) as e:
            import shutil

            shutil.rmtree(stage, ignore_errors=True)
            store.drop(slot)
            errors.append(f"the adapter of {job.name} did not arrive intact ({e}); it trains again on the next run")
            continue
        restamp_version(stage, job.out_dir)  # the worker versioned it against its own folder, not this one
        commit_dir(stage, job.out_dir)
        store.drop(slot)
    if errors:
        raise RuntimeError("; ".join(errors))


@ray.remote(num_cpus=0)
def _fit_remote(jobs: list[TrainJob], cfg: RayCfg, storage: str, env: dict[str, str], inits: Inits,
                keys: list[str] | None = None, name: str | None = None, beat: Beat | None = None) -> float:
    return _fit(jobs, cfg, storage, env, inits, keys, name, beat)
