"""One Ray Train worker group for a whole run (``ray.persistent_workers``): stages are handed to it, not started.

Starting a worker group costs ~13-18 s per stage on a 2-core machine (controller, workers, each importing
torch/transformers/peft) and ~40 s on an H200. Here the driver starts one ``TorchTrainer`` run (from a remote
task, as :class:`cl_service.on_ray.train.RayTrainer` does for every stage, so that it can be cancelled) whose
train function (:func:`_group_fn`) takes each stage's jobs from a small actor (:class:`_StageQueue`), trains
them exactly as a per-stage group does (:func:`cl_service.on_ray.train.run_jobs`: the same checkpoints,
``done.json`` and shipped init adapters), tells the queue of each finished adapter, and waits for the next
stage. The driver collects a stage's adapters from their checkpoints as before, then deletes the stage's
checkpoints (nothing in them is needed once the adapters are in the results folder).

Faults: a failed worker restarts the group (Ray Train); the restarted train function asks the queue for the
stage in progress, skips the jobs already finished and resumes the one its checkpoint names.
``ray.max_failures`` still counts per stage: the queue counts the group's restarts in each stage and gives the
stage up past the limit (Ray Train itself is told to retry without limit). Every wait is bounded: the driver
waits ``ray.timeout_s`` per stage (then cancels the run, its workers with it); an idle group gives up after
``ray.timeout_s`` without a stage, and the driver starts a new one for the next stage.
"""

from __future__ import annotations

import asyncio
import os
import time
import traceback
import uuid
from typing import Any

import ray
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig
from ray.train.torch import TorchConfig, TorchTrainer

from cl_service.config import RayCfg
from cl_service.train.job import TrainJob

#: What :meth:`_StageQueue.take` answers when the group should end.
_STOP = "stop"
#: Longest single wait on the queue (the caller loops until its own bound).
_POLL_S = 10.0


@ray.remote(num_cpus=0)
class _StageQueue:
    """The stages handed to a persistent worker group, and what it reports back (an asyncio actor: ``take`` and
    ``wait`` block without blocking ``put`` and ``final``)."""

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures
        self.stages: dict[int, tuple] = {}  # id -> (jobs, keys, inits), until done
        self.finals: dict[int, list[str]] = {}  # id -> keys of the finished adapters (checkpoints persisted)
        self.complete: set[int] = set()
        self.next_id = 0
        self.stopped = False
        self.failed: dict[int, str] = {}
        self.starts = 0
        self.restarts: dict[int, int] = {}
        self.errors: list[str] = []
        self.changed = asyncio.Condition()

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def _until(self, pred, wait_s: float) -> bool:
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(pred), timeout=wait_s)
            except asyncio.TimeoutError:
                return pred()
        return True

    def _current(self) -> int:
        pending = [i for i in self.stages if i not in self.complete]
        return min(pending) if pending else self.next_id

    async def put(self, jobs: list[TrainJob], keys: list[str], inits: Any) -> int:
        sid = self.next_id
        self.next_id += 1
        self.stages[sid] = (jobs, keys, inits)
        self.finals[sid] = []
        await self._notify()
        return sid

    async def begin(self) -> None:
        """Rank 0's train function (re)started: counts the group's restarts per stage (a restart between stages
        counts for the next one) and gives the stage up past ``max_failures``."""
        self.starts += 1
        if self.starts > 1:
            sid = self._current()
            self.restarts[sid] = self.restarts.get(sid, 0) + 1
            if 0 <= self.max_failures < self.restarts[sid]:
                last = self.errors[-1] if self.errors else "a worker died (see the worker logs)"
                self.failed[sid] = (f"the worker group failed {self.restarts[sid]} time(s) in this stage "
                                    f"(ray.max_failures={self.max_failures}); last error: {last}")
                await self._notify()

    async def take(self, after: int, wait_s: float):
        """The first stage after ``after`` that is not done: ``(id, jobs, keys, inits, finished keys)``; ``"stop"``
        when the group should end; None if none came within ``wait_s``."""
        def ready():
            return self.stopped or self.failed or any(i > after and i not in self.complete for i in self.stages)

        if not await self._until(ready, wait_s):
            return None
        if self.stopped or self.failed:
            return _STOP
        sid = min(i for i in self.stages if i > after and i not in self.complete)
        return (sid, *self.stages[sid], list(self.finals[sid]))

    async def final(self, sid: int, key: str) -> None:
        self.finals[sid].append(key)

    async def error(self, text: str) -> None:
        self.errors.append(text)

    async def done(self, sid: int) -> None:
        self.complete.add(sid)
        self.stages.pop(sid, None)  # drops the shipped init adapters' refs
        await self._notify()

    async def wait(self, sid: int, wait_s: float):
        """``("done", finished keys)``, ``("failed", why)``, or None if neither within ``wait_s``."""
        if not await self._until(lambda: sid in self.complete or sid in self.failed, wait_s):
            return None
        return ("failed", self.failed[sid]) if sid in self.failed else ("done", self.finals[sid])

    async def stop(self) -> None:
        self.stopped = True
        await self._notify()


def _group_fn(config: dict[str, Any]) -> None:
    """The persistent group's train function: stage after stage from the queue until told to stop (or idle for
    ``idle_s``)."""
    import gc

    import torch

    from cl_service.on_ray.train import read_checkpoint, run_jobs

    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    queue = config["queue"]
    rank = ray.train.get_context().get_world_rank()
    if rank == 0:
        ray.get(queue.begin.remote(), timeout=_POLL_S * 6)
    ckpt = ray.train.get_checkpoint()
    resume, resume_job, done = read_checkpoint(ckpt, rank)
    # test hook, as in _train_fn: the same on every rank; a restarted group has a checkpoint (perhaps deleted)
    fail_at = int(os.environ.get("CLSVC_FAIL_AT_STEP", "0")) if ckpt is None else 0
    after, idle_since = -1, time.monotonic()
    while True:
        task = ray.get(queue.take.remote(after, _POLL_S), timeout=_POLL_S * 6)
        if task == _STOP:
            return
        if task is None:
            if time.monotonic() - idle_since > float(config["idle_s"]):
                return  # the driver starts a new group for its next stage
            continue
        sid, jobs, keys, inits, finished = task
        try:
            # A restart resumes the stage in progress: skip what finished (the queue's list: the checkpoint that
            # lists it may already be deleted), resume the job the checkpoint names.
            run_jobs(jobs, keys, inits, config, sorted(set(done) | set(finished)), resume, resume_job,
                     fail_at=fail_at, on_final=lambda key, sid=sid: ray.get(queue.final.remote(sid, key),
                                                                            timeout=_POLL_S * 6))
        except BaseException:
            try:
                queue.error.remote(f"rank {rank}: {traceback.format_exc(limit=4)[-2000:]}")
            except Exception:  # noqa: BLE001  (the queue is gone: so is the driver)
                pass
            raise
        resume, resume_job, done, after = None, None, [], sid
        # Idle until the next stage: give cached GPU memory back (an evaluator may share the GPU). The base
        # itself stays loaded for the next stage's jobs (cl_service.train.runner._BASE_CACHE).
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if rank == 0:
            ray.get(queue.done.remote(sid), timeout=_POLL_S * 6)
        idle_since = time.monotonic()


@ray.remote(num_cpus=0)
def _run_group(cfg: RayCfg, storage: str, name: str, env: dict[str, str], queue: Any) -> str | None:
    """The persistent group's ``TorchTrainer`` run; its error, or None when it ended by being stopped."""
    from cl_service.on_ray.train import _scaling

    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(cfg.poll_interval_s)
    config = {"queue": queue, "checkpoint_every": cfg.checkpoint_every, "strategy": cfg.strategy,
              "threads": max(1, int(cfg.cpus_per_worker)), "idle_s": cfg.timeout_s}
    trainer = TorchTrainer(
        _group_fn, train_loop_config=config, scaling_config=_scaling(cfg),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage,
                             # per stage, counted by the queue (Ray Train's count would span the run)
                             failure_config=FailureConfig(max_failures=-1),
                             # kept until the driver deletes them, stage by stage (Ray Train never deletes one
                             # that the driver already removed)
                             checkpoint_config=CheckpointConfig(num_to_keep=None),
                             worker_runtime_env={"env_vars": env}))
    result = trainer.fit()
    return None if result.error is None else str(result.error)


class PersistentGroup:
    """The driver's side: starts the group on first use, hands it stages, collects, stops it (:meth:`close`)."""

    def __init__(self, cfg: RayCfg, storage: str, env: dict[str, str]) -> None:
        self.cfg, self.storage, self.env = cfg, storage, env
        self.queue: Any = None
        self.run_ref: Any = None
        self.name = ""
        self.groups_started = 0  # for tests and logs

    def _start(self) -> None:
        if self.run_ref is not None and not ray.wait([self.run_ref], timeout=0)[0]:
            return  # running (possibly still starting)
        if self.run_ref is not None:  # ended idle: a new group (and queue) for this stage
            self.close()
        self.queue = _StageQueue.remote(self.cfg.max_failures)
        self.name = f"group-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.run_ref = _run_group.remote(self.cfg, self.storage, self.name, self.env, self.queue)
        self.groups_started += 1

    def train(self, jobs: list[TrainJob], keys: list[str], inits: Any) -> tuple[float, list[tuple[Checkpoint, dict]]]:
        """Train ``jobs`` in the group; seconds taken and their final-adapter checkpoints (with metrics), as
        :func:`cl_service.on_ray.train._fit` returns them. Raises ``TimeoutError`` past ``ray.timeout_s`` and
        ``RuntimeError`` when the stage failed; the group is stopped then."""
        from cl_service.on_ray.train import final_name

        t0 = time.perf_counter()
        names = [j.name for j in jobs]
        try:
            self._start()
            sid = ray.get(self.queue.put.remote(jobs, keys, inits), timeout=_POLL_S * 6)
            while True:
                left = self.cfg.timeout_s - (time.perf_counter() - t0)
                if left <= 0:
                    raise TimeoutError(f"training of {names} did not finish within ray.timeout_s="
                                       f"{self.cfg.timeout_s:.0f} s (too few resources for the worker group, or a "
                                       "hang); finished adapters are kept")
                status = ray.get(self.queue.wait.remote(sid, min(left, _POLL_S)), timeout=min(left, _POLL_S) + 60)
                if status is not None:
                    break
                ended = ray.wait([self.run_ref], timeout=0)[0]
                if ended:
                    error = ray.get(self.run_ref, timeout=60)
                    if error is not None:
                        raise RuntimeError(f"training of {names} failed: {error}")
                    self._start()  # it ended idle just as this stage came: a new group takes it
                    sid = ray.get(self.queue.put.remote(jobs, keys, inits), timeout=_POLL_S * 6)
        except BaseException:
            self.close(force=True)
            raise
        kind, detail = status
        if kind == "failed":
            self.close()  # the restarted group's workers are returning already
            raise RuntimeError(f"training of {names} failed: {detail}")
        finals = [(Checkpoint(path=self._path(final_name(j, k))), {"job": k, "name": j.name, "final": 1})
                  for j, k in zip(jobs, keys) if k in detail]
        return time.perf_counter() - t0, finals

    def _path(self, dirname: str) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}/{dirname}"

    def clear_checkpoints(self) -> None:
        """Delete the run's checkpoint folders (called between stages, when the group is idle)."""
        import pyarrow.fs

        fs, root = pyarrow.fs.FileSystem.from_uri(self._path(""))
        try:
            entries = fs.get_file_info(pyarrow.fs.FileSelector(root.rstrip("/"), allow_not_found=True))
        except OSError:
            return
        for e in entries:
            if e.type == pyarrow.fs.FileType.Directory and e.base_name.startswith(("resume-", "final-")):
                try:
                    fs.delete_dir(e.path)
                except OSError:
                    pass

    def close(self, force: bool = False) -> None:
        """Stop the group: it finishes (bounded: ``force`` or past 60 s it is cancelled with its workers), then
        the queue goes. Idempotent."""
        if self.run_ref is not None:
            if not force and self.queue is not None:
                try:
                    ray.get(self.queue.stop.remote(), timeout=30)
                    ray.wait([self.run_ref], timeout=60)
                except Exception:  # noqa: BLE001  (cancelled below)
                    pass
            if not ray.wait([self.run_ref], timeout=0)[0]:
                ray.cancel(self.run_ref, force=True)
                ray.wait([self.run_ref], timeout=30)
        if self.queue is not None:
            ray.kill(self.queue, no_restart=True)
        self.queue, self.run_ref = None, None
