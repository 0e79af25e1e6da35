"""Ray Train backend: each training job runs in a ``TorchTrainer`` (DDP over gloo/NCCL, or DeepSpeed ZeRO-2).

All jobs of a stage run in one worker group, one after another (a group start costs ~15 s on a small machine);
with ``persistent`` (``ray.persistent_workers``, what ``clsvc run`` uses) one group serves every stage of the
run (:mod:`cl_service.on_ray._group`); with ``parallel_experts`` each job gets its own concurrent run. The
workers call the same :func:`cl_service.train.runner.run_train_job` as the in-process backend, on
``ray.train.torch.get_device()`` (their GPU with ``ray.use_gpu``), with their rank and world size, and with
checkpoint hooks: every ``checkpoint_every`` steps rank 0 saves the adapter and the optimizer/scheduler state
(under DeepSpeed every rank its optimizer partition) and reports it; a restarted worker group
(``FailureConfig(max_failures)``) resumes from ``ray.train.get_checkpoint()`` instead of step 0. Finished
adapters come back to the driver as checkpoints under ``ray.storage_path`` (:func:`collect_adapters`), and the
adapters jobs start from (``init_adapter``: ``lora_ft`` stages, a continued router, ``olora``, ``moelora``) go
out through the object store (:func:`ship_inits`): workers neither read nor write the driver's results folder,
so nodes need no shared filesystem for results (the base and the dataset they do read).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from cl_service.config import RayCfg
from cl_service.on_ray._mirror import force_mirror
from cl_service.train.job import TrainJob


def _train_fn(config: dict[str, Any]) -> None:
    """Train the jobs of one stage, in order, in this worker group (one group start per stage, not per job).

    Nothing is written to the driver's results folder: each finished adapter goes back as a Ray Train
    checkpoint (``final`` = 1, the adapter under ``adapter/``), which the driver copies into place. Every
    checkpoint also lists the jobs this group has finished (``done.json``), so a restarted group skips them
    without looking at the driver's files."""
    import torch

    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    ctx = ray.train.get_context()
    ckpt = ray.train.get_checkpoint()
    resume, resume_job, done = read_checkpoint(ckpt, ctx.get_world_rank())
    fail_at = int(os.environ.get("CLSVC_FAIL_AT_STEP", "0"))  # test hook: kill the worker once, mid-training
    run_jobs(config["jobs"], config["keys"],  # keys computed by the driver, which can read every init adapter
             config.get("inits") or Inits(), config, done, resume, resume_job,
             fail_at=fail_at if ckpt is None else 0)


def read_checkpoint(ckpt: Checkpoint | None, rank: int) -> tuple[dict[str, Any] | None, str | None, list[str]]:
    """What a (re)started worker group resumes from: ``(resume state of this rank, key of the job it belongs
    to, keys of the finished jobs)``; nothing when there is no checkpoint, or when it is gone (a persistent
    group's driver deletes a stage's checkpoints once it has collected its adapters)."""
    from cl_service.train.runner import load_resume

    if ckpt is None:
        return None, None, []
    try:
        import pyarrow.fs

        if ckpt.filesystem.get_file_info(ckpt.path).type == pyarrow.fs.FileType.NotFound:
            return None, None, []
    except OSError:
        return None, None, []
    with ckpt.as_directory() as d:
        resume = load_resume(d, rank)
        marker = Path(d) / "job.txt"
        resume_job = marker.read_text() if marker.is_file() else None
        done_file = Path(d) / _DONE
        done = json.loads(done_file.read_text()) if done_file.is_file() else []
    return resume, resume_job, done


def run_jobs(jobs: list[TrainJob], keys: list[str], inits: "Inits", config: dict[str, Any], done: list[str],
             resume: dict[str, Any] | None, resume_job: str | None, fail_at: int = 0,
             on_final: Callable[[str], None] | None = None) -> None:
    """In a Ray Train worker: train ``jobs`` (of driver-computed ``keys``) in order but those in ``done`` (which
    grows as jobs finish), the one of key ``resume_job`` from ``resume``; report an in-training checkpoint every
    ``config["checkpoint_every"]`` steps and each finished adapter as a final checkpoint, then call
    ``on_final(key)`` (rank 0, the adapter's checkpoint persisted)."""
    import ray.train.torch

    from cl_service.train.runner import run_train_job

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    for job, key in zip(jobs, keys):
        if key in done:
            continue

        # Keys as the driver computed them: a job knows its init adapter by the checksums of files that this
        # node may not have at that path.
        def report(metrics: dict[str, Any], fill=None, name: str | None = None, job=job, key=key) -> None:
            # Every rank reports (report() is a barrier) from its own folder; Ray Train merges them.
            with tempfile.TemporaryDirectory(prefix="clsvc-ckpt-") as d:
                if fill is not None:
                    fill(d)
                if rank == 0:
                    (Path(d) / "job.txt").write_text(key)
                    (Path(d) / _DONE).write_text(json.dumps(done))
                has_files = any(Path(d).iterdir())
                ray.train.report({"job": key, "name": job.name, **metrics, "keep": _keep_score(metrics)},
                                 checkpoint=Checkpoint.from_directory(d) if has_files else None,
                                 checkpoint_dir_name=name)

        def on_checkpoint(step: int, loss: float, save, report=report, job=job, key=key) -> None:
            # One name for every rank's part (under DeepSpeed each rank adds its optimizer partition).
            report({"step": step, "loss": loss, "final": 0}, fill=save,
                   name=f"resume-{job.name.replace('/', '_')}-{key}-step{step}")

        mine = resume if resume_job == key else None
        with tempfile.TemporaryDirectory(prefix="clsvc-adapter-") as staging:
            adapter = Path(staging) / _ADAPTER
            job = inits.localise(job, key, Path(staging) / "init", log=_say)
            run_train_job(job, rank=rank, world_size=world, resume=mine, on_checkpoint=on_checkpoint,
                          checkpoint_every=int(config["checkpoint_every"]), fail_at_step=fail_at,
                          log=_say if rank == 0 else None,
                          strategy=config.get("strategy", "ddp"), device=device, dest=adapter)
            done.append(key)
            report({"final": 1}, fill=(lambda d: shutil.move(str(adapter), Path(d) / _ADAPTER)) if rank == 0 else None,
                   name=final_name(job, key))
        if on_final is not None and rank == 0:
            on_final(key)
        resume = None


def final_name(job: TrainJob, key: str) -> str:
    """The checkpoint folder of a job's finished adapter (under the run's folder in ``ray.storage_path``)."""
    return f"final-{job.name.replace('/', '_')}-{key}"


#: Checkpoint layout: the finished adapter's folder, and the keys of the jobs a worker group has finished.
_ADAPTER = "adapter"
_DONE = "done.json"


@dataclass
class Inits:
    """The init adapters of a fit, shipped by the driver: ``refs`` maps each job's ``init_adapter`` path to an
    object ref of its files ({name: bytes}, :func:`cl_service.adapters.transfer.folder_files`), put once per
    folder. A worker on the driver's node reads the path itself (unless ``force``); any other worker writes
    the shipped files into a folder of its own and trains from there."""

    refs: dict[str, Any] = field(default_factory=dict)
    driver_node: str | None = None
    force: bool = False

    def localise(self, job: TrainJob, key: str, folder: Path, log: Callable[[str], None] | None = None) -> TrainJob:
        """``job`` with its init adapter on this node: the driver's path on the driver's node, else a verified
        copy in ``folder`` (the job's key, which knows the init adapter by its checksums, must not change)."""
        if job.init_adapter is None:
            return job
        if not self.force and ray.get_runtime_context().get_node_id() == self.driver_node:
            return job
        from cl_service.adapters.transfer import materialise

        ref = self.refs.get(job.init_adapter)
        if ref is None:
            raise RuntimeError(f"{job.name}: its init adapter {job.init_adapter} was not shipped to this node")
        files = ray.get(ref)
        size = sum(len(b) for b in files.values())
        local = job.replace(init_adapter=str(materialise(files, folder)))
        del files
        if log is not None:
            log(f"{job.name}: starts from a copy of {job.init_adapter} shipped by the driver "
                f"({size / 2 ** 20:.1f} MiB; this worker is not on the driver's node)")
        if local.key() != key:
            raise RuntimeError(f"{job.name}: the copy of {job.init_adapter} on this node gives another job key")
        return local


def ship_inits(jobs: list[TrainJob], force: bool | None = None) -> Inits:
    """Put each distinct init adapter of ``jobs`` into the object store once (read from the driver's results
    folder once per fit, however many workers use it). Always shipped: a worker group may be placed on, or
    an autoscaler may add, another node; workers on the driver's node never fetch the copy."""
    from cl_service.adapters.transfer import folder_files

    refs = {p: ray.put(folder_files(p)) for p in sorted({j.init_adapter for j in jobs if j.init_adapter})}
    return Inits(refs, ray.get_runtime_context().get_node_id(), force_mirror() if force is None else force)


def _keep_score(metrics: dict[str, Any]) -> float:
    """Retention score: every final adapter outranks every in-training checkpoint, and a later in-training
    checkpoint outranks an earlier one, so ``num_to_keep = jobs + 1`` keeps all adapters and the latest
    resume point."""
    return (1e12 if metrics.get("final") else 0.0) + time.time()


def _say(message: str) -> None:
    """One progress line in the job log. Not ``print``: Ray Train patches the workers' ``print`` to tee into
    its logger as well, which printed every line twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _scaling(cfg: RayCfg) -> ScalingConfig:
    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                         resources_per_worker={"CPU": cfg.cpus_per_worker}
                         | ({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {}))


def make_trainer(jobs: list[TrainJob], cfg: RayCfg, storage: str, env: dict[str, str] | None = None,
                 inits: Inits | None = None, keys: list[str] | None = None) -> TorchTrainer:
    """``keys``: the jobs' keys as the driver computed them (it reads every init adapter; this may run on a node
    that cannot)."""
    import hashlib

    keys = keys or [j.key() for j in jobs]
    key = hashlib.sha256("".join(k + j.out_dir for k, j in zip(keys, jobs)).encode()).hexdigest()[:12]
    name = (jobs[0].name.replace("/", "_") + (f"+{len(jobs) - 1}" if len(jobs) > 1 else "")) + "-" + key
    # Read by the TrainController, which Ray Train starts with the driver's value of this variable.
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(cfg.poll_interval_s)
    config = {"jobs": jobs, "keys": keys, "inits": inits or Inits(), "checkpoint_every": cfg.checkpoint_every,
              "threads": max(1, int(cfg.cpus_per_worker)), "strategy": cfg.strategy}
    return TorchTrainer(
        _train_fn,
        train_loop_config=config,
        scaling_config=_scaling(cfg),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             # every finished adapter (scored above any resume point) + the latest resume point
                             checkpoint_config=CheckpointConfig(num_to_keep=len(jobs) + 1,
                                                                checkpoint_score_attribute="keep",
                                                                checkpoint_score_order="max"),
                             worker_runtime_env={"env_vars": env or {}}),
    )


class RayTrainer:
    """Trainer backend of :func:`cl_service.run.run_stream` on a Ray cluster.

    ``mirror``: every worker trains from a shipped copy of its init adapter, as a worker on another node
    than the driver's does (default: the ``CLSVC_FORCE_MIRROR`` environment variable; for tests)."""

    def __init__(self, cfg: RayCfg, storage: str, env: dict[str, str] | None = None,
                 mirror: bool | None = None, persistent: bool = False) -> None:
        self.cfg = cfg
        self.storage = str(Path(storage).resolve()) if "://" not in storage else storage
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
        times: dict[str, float] = {}
        keys = {id(j): j.key() for j in jobs}  # here, where every init adapter is readable (workers may not)
        inits = ship_inits(jobs, self.mirror)  # held here until the fit ends: the refs stay alive
        if self.group is not None:
            seconds, finals = self.group.train(jobs, [keys[id(j)] for j in jobs], inits)
            try:
                collect_adapters(jobs, finals, [keys[id(j)] for j in jobs])
            finally:
                self.group.clear_checkpoints()
            return {"+".join(j.name for j in jobs): seconds}
        # Every training run is driven from a remote task, so ``ray.timeout_s`` bounds it: a run that cannot be
        # scheduled (Train V2 then waits for resources forever) or hangs is cancelled, with its worker group
        # (owned by the task), and reported. Independent jobs (``parallel_experts``) get one run each, at once.
        groups = [[job] for job in jobs] if self.cfg.parallel_experts and len(jobs) > 1 else [jobs]
        refs = [_fit_remote.remote(g, self.cfg, self.storage, self.env, inits, [keys[id(j)] for j in g]) for g in groups]
        ready, not_ready = ray.wait(refs, num_returns=len(refs), timeout=self.cfg.timeout_s)
        if not_ready:
            for r in not_ready:
                ray.cancel(r, force=True)
            names = [j.name for g, r in zip(groups, refs) if r in not_ready for j in g]
            raise TimeoutError(f"training of {names} did not finish within ray.timeout_s={self.cfg.timeout_s:.0f} s "
                               "(too few resources for the worker group, or a hang); finished adapters are kept")
        for g, r in zip(groups, refs):
            seconds, finals = ray.get(r)
            collect_adapters(g, finals, [keys[id(j)] for j in g])
            times["+".join(j.name for j in g)] = seconds
        return times


def _fit(jobs: list[TrainJob], cfg: RayCfg, storage: str, env: dict[str, str], inits: Inits | None = None,
         keys: list[str] | None = None) -> tuple[float, list[tuple[Checkpoint, dict[str, Any]]]]:
    """Train ``jobs`` in one worker group; seconds taken and the final-adapter checkpoints (with metrics)."""
    t0 = time.perf_counter()
    result = make_trainer(jobs, cfg, storage, env, inits, keys).fit()
    if result.error is not None:
        raise RuntimeError(f"training of {[j.name for j in jobs]} failed: {result.error}")
    finals = [(c, m) for c, m in (result.best_checkpoints or []) if m.get("final")]
    return time.perf_counter() - t0, finals


def collect_adapters(jobs: list[TrainJob], finals: list[tuple[Checkpoint, dict[str, Any]]],
                     keys: list[str] | None = None) -> None:
    """Bring each job's finished adapter from its checkpoint (under ``ray.storage_path``: a local folder, NFS
    or ``s3://``) into the job's ``out_dir`` on this machine, verified by its checksums, atomically; then
    delete that checkpoint (the adapter now lives in the results folder). On a local filesystem the files are
    moved, not copied (at 7B an r128 adapter is 1.4 GB). ``keys``: the jobs' keys, if already computed."""
    from cl_service.adapters.registry import AdapterError, commit_dir, publish_dir, read_adapter, restamp_version

    by_key = {m["job"]: c for c, m in finals}
    for job, key in zip(jobs, keys or [j.key() for j in jobs]):
        ckpt = by_key.get(key)
        if ckpt is None:
            raise RuntimeError(f"training job {job.name} finished but reported no adapter checkpoint")
        stage = publish_dir(job.out_dir)
        with ckpt.as_directory() as d:
            src = Path(d) / _ADAPTER
            if not src.is_dir():
                raise RuntimeError(f"the checkpoint of {job.name} ({ckpt.path}) holds no adapter folder")
            local = getattr(ckpt.filesystem, "type_name", "") == "local"
            for f in src.iterdir():
                (shutil.move if local else shutil.copy2)(str(f), stage / f.name)
        try:
            read_adapter(stage, key)
        except AdapterError as e:
            shutil.rmtree(stage, ignore_errors=True)
            raise RuntimeError(f"the adapter of {job.name} did not arrive intact: {e}") from None
        restamp_version(stage, job.out_dir)  # the worker versioned it against its own folder, not this one
        commit_dir(stage, job.out_dir)
        try:
            ckpt.filesystem.delete_dir(ckpt.path)
        except OSError:
            pass  # storage that refuses deletes keeps a copy; the results folder has the adapter


@ray.remote(num_cpus=0)
def _fit_remote(jobs: list[TrainJob], cfg: RayCfg, storage: str, env: dict[str, str], inits: Inits,
                keys: list[str] | None = None):
    return _fit(jobs, cfg, storage, env, inits, keys)
