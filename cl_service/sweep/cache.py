"""An adapter cache shared by the trials of a sweep: a job is trained once per :meth:`TrainJob.key`.

``CachingTrainer`` wraps any trainer backend (in process or Ray Train). A job whose adapter is already
in ``<cache>/<job key>`` (complete, checksums verified) is not trained again; it is copied into the
run's folder. Otherwise it is trained *into* the cache under an exclusive file lock, so two trials that
need the same expert at the same time train it once (the second waits, holding no CPU, then copies).
The key covers base, data (by shard checksums), samples, LoRA and training settings and seed — not the
output folder — so a router sweep reuses the experts of the run that shares their config, and a rank
sweep reuses the routers (they never see the experts). The cache folder must be on a file system
shared by the trials' nodes (one machine, or NFS with working ``flock``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cl_service.adapters.registry import commit_dir, is_complete, publish_dir
from cl_service.train.job import TrainJob


def try_lock(path: str | Path) -> int | None:
    """An exclusive non-blocking ``flock`` on ``path`` (created if missing): the fd, or None if held elsewhere."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


def unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextmanager
def file_lock(path: str | Path, timeout_s: float, poll_s: float = 0.5) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``, waiting at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (fd := try_lock(path)) is None:
        if time.monotonic() >= deadline:
            raise TimeoutError(f"could not lock {path} within {timeout_s:.0f} s")
        time.sleep(poll_s)
    try:
        yield
    finally:
        unlock(fd)


def copy_adapter(src: str | Path, dst: str | Path) -> None:
    """Publish a copy of adapter folder ``src`` at ``dst`` atomically (staging folder + rename)."""
    stage = publish_dir(dst)
    for p in Path(src).iterdir():
        if p.is_file() and not p.name.startswith("."):
            shutil.copy2(p, stage / p.name)
    commit_dir(stage, dst)


class CachingTrainer:
    """A trainer backend (``fit(jobs) -> seconds per job``) that trains each job key at most once."""

    def __init__(self, inner, cache_dir: str | Path, lock_timeout_s: float = 3600.0, log=None) -> None:
        self.inner = inner
        self.cache = Path(cache_dir).resolve()
        self.lock_timeout_s = lock_timeout_s
        self.log = log or (lambda m: None)
        self.reused: list[str] = []
        """Names of the jobs this trainer served from the cache (for reports and tests)."""

    def cached_dir(self, job: TrainJob) -> Path:
        return self.cache / job.key()

    def fit(self, jobs: list[TrainJob]) -> dict[str, float]:
        """Train the jobs whose key is not cached yet (into the cache), then copy every adapter to its
        ``out_dir``. Jobs locked by another trial are taken after ours: never wait while holding a lock."""
        times: dict[str, float] = {}
        hits: list[str] = []
        pending = sorted(jobs, key=lambda j: j.key())
        deadline = time.monotonic() + self.lock_timeout_s
        while pending:
            got: dict[str, int] = {}
            busy: list[TrainJob] = []
            for job in pending:
                fd = try_lock(self.cache / f".{job.key()}.lock")
                if fd is None:
                    busy.append(job)
                else:
                    got[job.key()] = fd
            mine = [j for j in pending if j.key() in got]
            try:
                todo = [j.replace(out_dir=str(self.cached_dir(j))) for j in mine
                        if not is_complete(self.cached_dir(j), j.key())]
                hits += [j.name for j in mine if not any(t.key() == j.key() for t in todo)]
                if todo:
                    times.update(self.inner.fit(todo))
                for job in mine:
                    if not is_complete(self.cached_dir(job), job.key()):
                        raise RuntimeError(f"job {job.name}: no complete adapter in the cache after training")
                    copy_adapter(self.cached_dir(job), job.out_dir)
            finally:
                for fd in got.values():
                    unlock(fd)
            if busy and not mine:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"adapters {[j.name for j in busy]} stayed locked by another trial for "
                                       f"{self.lock_timeout_s:.0f} s")
                time.sleep(0.5)
            pending = busy
        if hits:
            self.reused.extend(hits)
            self.log(f"reused {len(hits)} cached adapter(s): {', '.join(hits)}")
            times.update({h: 0.0 for h in hits})
        return times
