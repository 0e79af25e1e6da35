"""Where a training job's progress lives between processes: its resume points and its finished adapter.

A folder of the run's storage (``ray.storage_path``: a local folder, NFS or ``s3://``) named after the job —
its key and its output folder (:meth:`JobStore.slot`) — not after the process or the worker group that trains
it. So a worker group restarted after a fault, a new group, and a rerun of the whole command on the same results
folder all find it: an unfinished job resumes from its last resume point, and a finished adapter the driver did
not take yet is taken without training again.

Layout of one job's folder, ``<storage>/jobs/<slot>/``::

    step-000042/      a resume point: every rank's files (cl_service.train.runner.save_resume) and meta.json
                      (step, world size, strategy); valid once its COMPLETE marker is there, which rank 0 writes
                      after every rank has written its files
    adapter/          the finished adapter; valid once adapter.done is beside it

Nothing here is written atomically (object stores have no rename), so readers trust a folder only with its marker.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs

_MARK = "COMPLETE"
_META = "meta.json"
_ADAPTER = "adapter"
_ADAPTER_MARK = "adapter.done"


def _fs(root: str):
    if "://" in root:
        fs, path = pyarrow.fs.FileSystem.from_uri(root)
        return fs, path.rstrip("/")
    return pyarrow.fs.LocalFileSystem(), str(Path(root).resolve())


class JobStore:
    """The job folders under ``<root>/jobs`` (``root``: a local folder or a ``pyarrow.fs`` URI such as
    ``s3://bucket/runs``). Picklable: the driver hands it to the workers."""

    def __init__(self, root: str) -> None:
        self.root = root

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.root = state["root"]

    @property
    def _fs(self):
        if not hasattr(self, "_cached"):
            self._cached = _fs(self.root)
        return self._cached

    @property
    def local(self) -> bool:
        """Whether the store is a local (or mounted) folder: files are then read in place and moved, not copied."""
        return self._fs[0].type_name == "local"

    def slot(self, name: str, key: str, out_dir: str) -> str:
        """The folder of the job named ``name`` with key ``key`` that publishes to ``out_dir`` (two results
        folders sharing one storage never share a job folder)."""
        where = hashlib.sha256(out_dir.encode()).hexdigest()[:8]
        return f"{self._fs[1]}/jobs/{name.replace('/', '_')}-{key}-{where}"

    # -- listing ---------------------------------------------------------------------------------------------
    def _exists(self, path: str) -> bool:
        return self._fs[0].get_file_info(path).type != pyarrow.fs.FileType.NotFound

    def _entries(self, path: str) -> list:
        return self._fs[0].get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))

    def _read(self, path: str) -> bytes:
        with self._fs[0].open_input_stream(path) as f:
            return f.read()

    def _write(self, path: str, data: bytes) -> None:
        self._fs[0].create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self._fs[0].open_output_stream(path) as f:
            f.write(data)

    def _copy_in(self, folder: str | Path, path: str) -> None:
        """Copy a local folder's files into the store's ``path``."""
        self._fs[0].create_dir(path, recursive=True)  # copy_files makes only the source's sub-folders
        pyarrow.fs.copy_files(str(folder), path, source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=self._fs[0])

    def _delete(self, path: str) -> None:
        try:
            self._fs[0].delete_dir(path)
        except FileNotFoundError:
            pass

    def resume_points(self, slot: str) -> list[dict[str, Any]]:
        """The complete resume points of a job, newest first: ``{"step", "path", "world_size", "strategy"}``."""
        out = []
        for e in self._entries(slot):
            if e.type != pyarrow.fs.FileType.Directory or not e.base_name.startswith("step-"):
                continue
            if not self._exists(f"{e.path}/{_MARK}"):
                continue  # its writer was stopped half-way
            meta = json.loads(self._read(f"{e.path}/{_META}"))
            out.append({**meta, "path": e.path})
        return sorted(out, key=lambda m: -m["step"])

    def latest(self, slot: str, world_size: int, strategy: str) -> dict[str, Any] | None:
        """The newest complete resume point written by as many ranks with the same strategy, or None (each rank
        holds its own share of the data and, under DeepSpeed, of the optimizer: another world size cannot
        continue it)."""
        points = self.resume_points(slot)
        if points and points[0]["world_size"] == world_size and points[0]["strategy"] == strategy:
            return points[0]
        return None

    # -- resume points ---------------------------------------------------------------------------------------
    def step_path(self, slot: str, step: int) -> str:
        return f"{slot}/step-{step:06d}"

    def put_part(self, slot: str, step: int, folder: str | Path) -> None:
        """Copy one rank's files of the resume point at ``step`` into the store (every rank calls it)."""
        self._copy_in(folder, self.step_path(slot, step))

    def commit(self, slot: str, step: int, world_size: int, strategy: str) -> None:
        """Mark the resume point at ``step`` complete (rank 0, once every rank's :meth:`put_part` returned), then
        delete the older ones."""
        path = self.step_path(slot, step)
        meta = {"step": step, "world_size": world_size, "strategy": strategy}
        self._write(f"{path}/{_META}", json.dumps(meta).encode())
        self._write(f"{path}/{_MARK}", b"")
        self.clear_steps(slot, keep=path)

    def clear_steps(self, slot: str, keep: str | None = None) -> None:
        """Delete the job's resume points (complete or not) but ``keep``."""
        for e in self._entries(slot):
            if e.type == pyarrow.fs.FileType.Directory and e.base_name.startswith("step-") and e.path != keep:
                self._delete(e.path)

    @contextlib.contextmanager
    def open_point(self, point: dict[str, Any], rank: int) -> Iterator[Path]:
        """A local folder with what ``rank`` reads of a resume point (the point itself on a local store, else a
        temporary copy without the other ranks' optimizer partitions)."""
        if self.local:
            yield Path(point["path"])
            return
        with tempfile.TemporaryDirectory(prefix="clsvc-resume-") as d:
            for e in self._entries(point["path"]):
                if e.type != pyarrow.fs.FileType.File:
                    continue
                if e.base_name.startswith("zero_optimizer_rank") and e.base_name != f"zero_optimizer_rank{rank}.pt":
                    continue
                pyarrow.fs.copy_files(e.path, str(Path(d) / e.base_name), source_filesystem=self._fs[0],
                                      destination_filesystem=pyarrow.fs.LocalFileSystem())
            yield Path(d)

    # -- finished adapters -----------------------------------------------------------------------------------
    def has_adapter(self, slot: str) -> bool:
        return self._exists(f"{slot}/{_ADAPTER_MARK}")

    def put_adapter(self, slot: str, folder: str | Path) -> None:
        """Store the finished adapter (rank 0), then drop the job's resume points: nothing resumes a finished job."""
        self._delete(f"{slot}/{_ADAPTER}")
        if self.local:
            Path(slot).mkdir(parents=True, exist_ok=True)
            shutil.copytree(folder, f"{slot}/{_ADAPTER}")
        else:
            self._copy_in(folder, f"{slot}/{_ADAPTER}")
        self._write(f"{slot}/{_ADAPTER_MARK}", b"")
        self.clear_steps(slot)

    def take_adapter(self, slot: str, dest: str | Path) -> None:
        """Bring the stored adapter's files into the local folder ``dest`` (hard-linked on a local store where it
        can: at 7B an r128 adapter is 1.4 GB). The stored copy stays until :meth:`drop`, so a driver stopped
        before it committed ``dest`` finds it again."""
        src = f"{slot}/{_ADAPTER}"
        if not self.has_adapter(slot) or not self._exists(src):
            raise FileNotFoundError(f"no finished adapter in {slot}")
        if self.local:
            for f in Path(src).iterdir():
                try:
                    os.link(f, Path(dest) / f.name)
                except OSError:  # another filesystem, or links refused
                    shutil.copy2(f, Path(dest) / f.name)
            return
        for e in self._entries(src):
            if e.type == pyarrow.fs.FileType.File:
                pyarrow.fs.copy_files(e.path, str(Path(dest) / e.base_name), source_filesystem=self._fs[0],
                                      destination_filesystem=pyarrow.fs.LocalFileSystem())

    def drop(self, slot: str) -> None:
        """Delete the job's folder: its adapter is in the results folder (or it must be trained anew)."""
        self._delete(slot)


__all__ = ["JobStore"]
