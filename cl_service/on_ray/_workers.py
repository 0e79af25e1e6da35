"""What a Ray Train worker group runs and what it needs from the driver, shared by the per-stage groups
(:mod:`cl_service.on_ray.train`) and the persistent one (:mod:`cl_service.on_ray._group`), which both import it:
training a stage's jobs from their resume points in the job store (:func:`run_jobs`), the init adapters the driver
ships (:class:`Inits`, :func:`ship_inits`), a group's scaling, and dropping Ray Train's own run folder."""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray
import ray.train
from ray.train import ScalingConfig

from cl_service.config import RayCfg
from cl_service.train.job import TrainJob
from cl_service.train.jobstore import JobStore


def _barrier(world: int) -> None:
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        dist.barrier()


def _agree(world: int, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (each rank reads the store itself; they must decide alike)."""
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def run_jobs(jobs: list[TrainJob], keys: list[str], inits: "Inits", config: dict[str, Any], store: JobStore,
             beat: Callable[..., None]) -> None:
    """In a Ray Train worker: train ``jobs`` (of driver-computed ``keys``) in order, each from its last resume point
    in ``store`` if it has one and skipped if its finished adapter is there already; store a resume point every
    ``config["checkpoint_every"]`` steps and (rank 0) the finished adapter. ``beat`` (rank 0) reports progress."""
    import ray.train.torch

    from cl_service.train.runner import load_resume, run_train_job

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    strategy = config.get("strategy", "ddp")
    tick = beat if rank == 0 else (lambda *_: None)
    for job, key in zip(jobs, keys):
        tick()
        slot = store.slot(job.name, key, job.out_dir)
        finished, point = _agree(world, (store.has_adapter(slot), store.latest(slot, world, strategy))
                                 if rank == 0 else None)
        if finished:
            if rank == 0:
                say(f"{job.name}: already trained (its adapter waits in {slot})")
            continue
        resume = None
        if point is not None:
            with store.open_point(point, rank) as d:
                resume = load_resume(d, rank)
        elif rank == 0:
            store.clear_steps(slot)  # a resume point of another world size or strategy, or one never completed
        _barrier(world)

        def on_checkpoint(step: int, loss: float, save, slot=slot) -> None:
            with tempfile.TemporaryDirectory(prefix="clsvc-ckpt-") as d:
                save(d)
                store.put_part(slot, step, d)
            _barrier(world)  # every rank's part is stored: the point is complete
            if rank == 0:
                store.commit(slot, step, world, strategy)
            tick()

        with tempfile.TemporaryDirectory(prefix="clsvc-adapter-") as staging:
            adapter = Path(staging) / "adapter"
            job = inits.localise(job, key, Path(staging) / "init", log=say)
            run_train_job(job, rank=rank, world_size=world, resume=resume, on_checkpoint=on_checkpoint,
                          checkpoint_every=int(config["checkpoint_every"]), on_progress=tick,
                          log=say if rank == 0 else None, strategy=strategy, device=device, dest=adapter)
            if rank == 0:
                store.put_adapter(slot, adapter)
        tick()


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


def ship_inits(jobs: list[TrainJob], force: bool = False) -> Inits:
    """Put each distinct init adapter of ``jobs`` into the object store once (read from the driver's results
    folder once per fit, however many workers use it). Always shipped: a worker group may be placed on, or
    an autoscaler may add, another node; workers on the driver's node never fetch the copy (unless ``force``:
    every worker then trains from a shipped copy, as one on another node does)."""
    from cl_service.adapters.transfer import folder_files

    refs = {p: ray.put(folder_files(p)) for p in sorted({j.init_adapter for j in jobs if j.init_adapter})}
    return Inits(refs, ray.get_runtime_context().get_node_id(), force)


def say(message: str) -> None:
    """One progress line in the job log. Not ``print``: Ray Train patches the workers' ``print`` to tee into
    its logger as well, which printed every line twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def scaling(cfg: RayCfg) -> ScalingConfig:
    """A worker group's size and resources per worker, as ``ray.*`` configures them."""
    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                         resources_per_worker={"CPU": cfg.cpus_per_worker}
                         | ({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {}))


def drop_run_folder(storage: str, name: str) -> None:
    """Delete Ray Train's own folder of a run once it ended: nothing resumes from it (jobs resume from theirs)."""
    import pyarrow.fs

    try:
        fs, root = (pyarrow.fs.FileSystem.from_uri(storage) if "://" in storage
                    else (pyarrow.fs.LocalFileSystem(), storage))
        fs.delete_dir(f"{root.rstrip('/')}/{name}")
    except OSError:
        pass
