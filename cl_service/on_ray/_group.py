"""One Ray Train worker group for a whole run (``ray.persistent_workers``): stages are handed to it, not started.

Starting a worker group costs ~13-18 s per stage on a 2-core machine (controller, workers, each importing
torch/transformers/peft) and ~40 s on an H200. Here the driver starts one ``TorchTrainer`` run (from a remote
task, as :class:`cl_service.on_ray.train.RayTrainer` does for every stage, so that it can be cancelled) whose
train function (:func:`_group_fn`) takes each stage's jobs from a small actor (:class:`_StageQueue`), trains
them exactly as a per-stage group does (:func:`cl_service.on_ray._workers.run_jobs`: the same job store, the same
shipped init adapters), tells the queue when the stage is done, and waits for the next. The driver collects a
stage's adapters from the job store as before.

Faults: Ray Train does not restart this group (``FailureConfig(max_failures=0)``): when a worker fails, the run
ends and the driver starts a new group, which skips the stage's finished jobs and resumes the unfinished one
from its last resume point (both are in the job store, whatever group wrote them). The driver counts those
failures against the stage it is waiting for, also the failures of a group that ended while idle between
stages, and gives the stage up past ``ray.max_failures``. The driver waits as long as the group reports
progress (``ray.stall_timeout_s``, :mod:`cl_service.on_ray._stall`), then cancels it, its workers with it. An
idle group ends after ``ray.stall_timeout_s`` without a stage, all ranks together: the queue decides it, once,
for every rank, and refuses stages from then on (the driver starts a new group for its next stage).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import ray
from ray.train import FailureConfig, RunConfig
from ray.train.torch import TorchConfig, TorchTrainer

from cl_service.config import RayCfg
from cl_service.on_ray._stall import Beat, Beats, Watch
from cl_service.on_ray._workers import drop_run_folder, run_jobs, scaling
from cl_service.train.job import TrainJob
from cl_service.train.jobstore import JobStore

#: What :meth:`_StageQueue.take` answers when the group should end.
_STOP = "stop"
#: Longest single wait of a rank on the queue (it loops until a stage or ``stop`` comes).
_POLL_S = 10.0
#: Longest single wait of the driver on a stage (it then looks at the group's progress).
_WAIT_S = 2.0


@ray.remote(num_cpus=0)
class _StageQueue:
    """The stages handed to a persistent worker group (an asyncio actor: ``take`` and ``wait`` block without
    blocking ``put`` and ``done``). It alone decides when the group ends, so that every rank ends together."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self.stages: dict[int, tuple] = {}  # id -> (jobs, keys, inits), until done
        self.complete: set[int] = set()
        self.next_id = 0
        self.stopped = False  # told to stop, or idle for idle_s: no stage is handed out any more
        self.idle_since = time.monotonic()
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

    async def put(self, jobs: list[TrainJob], keys: list[str], inits: Any) -> int | None:
        """The stage's id; None when the group is ending (the caller starts a new one)."""
        if self.stopped:
            return None
        sid = self.next_id
        self.next_id += 1
        self.stages[sid] = (jobs, keys, inits)
        await self._notify()
        return sid

    async def take(self, after: int, wait_s: float):
        """The first stage after ``after`` that is not done: ``(id, jobs, keys, inits)``; ``"stop"`` when the group
        ends; None if none came within ``wait_s``. The first rank to find the group idle for ``idle_s`` ends it
        for all (an idle period never ends for one rank while another takes the next stage)."""
        def ready():
            return self.stopped or any(i > after for i in self.stages)

        if not await self._until(ready, wait_s):
            if not self.stages and time.monotonic() - self.idle_since > self.idle_s:
                self.stopped = True
                await self._notify()
                return _STOP
            return None
        if self.stopped:
            return _STOP
        sid = min(i for i in self.stages if i > after)
        return (sid, *self.stages[sid])

    async def done(self, sid: int) -> None:
        self.complete.add(sid)
        self.stages.pop(sid, None)  # drops the shipped init adapters' refs
        self.idle_since = time.monotonic()
        await self._notify()

    async def wait(self, sid: int, wait_s: float) -> bool:
        """Whether stage ``sid`` is done, waiting up to ``wait_s`` for it."""
        return await self._until(lambda: sid in self.complete, wait_s)

    async def stop(self) -> None:
        self.stopped = True
        await self._notify()


def _group_fn(config: dict[str, Any]) -> None:
    """The persistent group's train function: stage after stage from the queue until it answers ``stop``."""
    import gc

    import torch

    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    queue, beat = config["queue"], config["beat"]
    rank = ray.train.get_context().get_world_rank()
    if rank == 0:
        beat()  # started: the driver's wait counts silence from here
    after = -1
    while True:
        task = ray.get(queue.take.remote(after, _POLL_S), timeout=_POLL_S * 6)
        if task == _STOP:
            return
        if task is None:
            continue
        sid, jobs, keys, inits = task
        run_jobs(jobs, keys, inits, config, config["store"], beat)
        after = sid
        # Idle until the next stage: give cached GPU memory back (an evaluator may share the GPU). The base
        # itself stays loaded for the next stage's jobs (cl_service.train.runner._BASE_CACHE).
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if rank == 0:
            ray.get(queue.done.remote(sid), timeout=_POLL_S * 6)


@ray.remote(num_cpus=0)
def _run_group(cfg: RayCfg, storage: str, name: str, env: dict[str, str], queue: Any, beat: Beat) -> str | None:
    """The persistent group's ``TorchTrainer`` run; its error, or None when it ended by being stopped."""
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(cfg.poll_interval_s)
    config = {"queue": queue, "checkpoint_every": cfg.checkpoint_every, "strategy": cfg.strategy,
              "threads": max(1, int(cfg.cpus_per_worker)), "store": JobStore(storage), "beat": beat}
    trainer = TorchTrainer(
        _group_fn, train_loop_config=config, scaling_config=scaling(cfg),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage,
                             # the driver starts a new group, counting failures per stage (Ray Train's count
                             # would span the run, and misses a group that fails before its train function runs)
                             failure_config=FailureConfig(max_failures=0),
                             worker_runtime_env={"env_vars": env}))
    try:
        trainer.fit()
    except Exception as e:  # noqa: BLE001  (Train V2 raises the workers' error: the driver reports it)
        return f"{type(e).__name__}: {e}"
    finally:
        drop_run_folder(storage, name)
    return None


class PersistentGroup:
    """The driver's side: starts the group on first use (and again after a failure or an idle end), hands it
    stages, stops it (:meth:`close`)."""

    def __init__(self, cfg: RayCfg, storage: str, env: dict[str, str]) -> None:
        self.cfg, self.storage, self.env = cfg, storage, env
        #: seconds a group waits for a stage before it ends
        self.idle_s = cfg.stall_timeout_s
        self.queue: Any = None
        self.run_ref: Any = None
        self.beats: Any = None
        self.name = ""
        self.groups_started = 0  # for tests and logs

    def _start(self) -> None:
        if self.beats is None:
            self.beats = Beats.remote()
        self.queue = _StageQueue.remote(self.idle_s)
        self.name = f"group-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(4).hex()}"
        self.run_ref = _run_group.remote(self.cfg, self.storage, self.name, self.env, self.queue,
                                         Beat(self.beats, self.name))
        self.groups_started += 1

    def _ended(self) -> tuple[bool, str | None]:
        """Whether the group's run ended, and its error; an ended group is released."""
        if self.run_ref is None or not ray.wait([self.run_ref], timeout=0)[0]:
            return False, None
        try:
            error = ray.get(self.run_ref, timeout=60)
        except ray.exceptions.RayError as e:  # its task died (e.g. its node)
            error = str(e)
        self._release()
        return True, error

    def train(self, jobs: list[TrainJob], keys: list[str], inits: Any) -> float:
        """Train ``jobs`` in the group (their adapters end in the job store); the seconds taken. Raises
        ``TimeoutError`` when the group reports no progress for ``ray.stall_timeout_s`` and ``RuntimeError``
        when it failed more than ``ray.max_failures`` times; the group is stopped then."""
        t0 = time.perf_counter()
        names = [j.name for j in jobs]
        failures, in_stage = 0, False
        try:
            while True:
                ended, error = self._ended()
                if ended and error is None and in_stage:
                    error = "the worker group ended before the stage was done"
                if error is not None:  # mid-stage, or while idle before it: counts against this stage
                    failures += 1
                    if 0 <= self.cfg.max_failures < failures:
                        raise RuntimeError(f"training of {names} failed: the worker group failed {failures} time(s) "
                                           f"in this stage (ray.max_failures={self.cfg.max_failures}); last error: "
                                           f"{error[-3000:]}")
                in_stage = False
                if self.run_ref is None:
                    self._start()
                sid = ray.get(self.queue.put.remote(jobs, keys, inits), timeout=_POLL_S * 6)
                if sid is None:  # it is ending (idle): a new group takes the stage
                    ray.wait([self.run_ref], timeout=60)
                    if not self._ended()[0]:
                        self.close(force=True)
                    continue
                in_stage = True
                watch = Watch(self.beats, self.cfg.stall_timeout_s, lambda tag, _: f"training of {names}")
                watch.start(self.name)
                while True:
                    answer = self.queue.wait.remote(sid, _WAIT_S)
                    ready, _ = ray.wait([answer, self.run_ref], num_returns=1, timeout=_WAIT_S + 60)
                    if answer in ready and ray.get(answer):
                        return time.perf_counter() - t0
                    if self.run_ref in ready or ray.wait([self.run_ref], timeout=0)[0]:
                        break  # failed: counted above, then a new group resumes the stage
                    watch.check()
        except BaseException:
            self.close(force=True)
            raise

    def _release(self) -> None:
        if self.queue is not None:
            ray.kill(self.queue, no_restart=True)
        self.queue, self.run_ref = None, None

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
        self._release()
        if self.beats is not None:
            ray.kill(self.beats, no_restart=True)
            self.beats = None
