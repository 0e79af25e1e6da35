"""A dataset = a folder of Arrow IPC shards plus ``manifest.json``.

Layout::

    DATASET/
      manifest.json                 schema version, tasks in stream order, counts, per-shard sha256
      shards/<task>.<split>.<k>.arrow   Arrow IPC files, SAMPLE_SCHEMA, <= shard_size rows each

Writes are atomic at the dataset level: :class:`ShardWriter` writes into a hidden staging folder next
to the target and renames it into place only after the manifest is written, so an interrupted ingest
leaves nothing that looks like a dataset. Readers stream shard by shard and record batch by record
batch (never the whole set in memory); :meth:`ShardDataset.arrow_dataset` exposes the same files to
``pyarrow.dataset`` (and through it to Ray Data).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.ipc as ipc

from cl_service import __version__
from cl_service._atomic import atomic_write_text, replace_dir  # noqa: F401  (atomic_write_text re-exported)
from cl_service.data.schema import SAMPLE_SCHEMA, SCHEMA_VERSION, Sample, from_record_batch, to_record_batch

MANIFEST = "manifest.json"
FORMAT = "cl-service/arrow-shards"
_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


class DatasetError(ValueError):
    """A dataset folder is missing, incomplete, of another schema version, or corrupt."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class _Open:
    task: str
    split: str
    index: int
    rows: list[Sample]


class ShardWriter:
    """Collects samples into per-(task, split) shards of at most ``shard_size`` rows.

    Use as a context manager; on a clean exit the staging folder becomes ``out`` (which must not
    exist unless ``overwrite``); on an exception the staging folder is removed.

    Args:
        out: the dataset folder to create.
        tasks: task descriptors in stream order: dicts with ``name``, ``scorer``, ``description``.
        shard_size: rows per shard file.
        info: extra manifest fields (``benchmark``, ``source``, ...).
    """

    def __init__(
        self,
        out: str | os.PathLike,
        tasks: list[dict[str, str]],
        shard_size: int = 512,
        info: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{self.out} exists; pass --overwrite to replace it")
        self.overwrite = overwrite
        self.tasks = tasks
        self.shard_size = shard_size
        self.info = dict(info or {})
        self.stage = self.out.with_name(f".{self.out.name}.partial-{os.getpid()}")
        self._open: dict[tuple[str, str], _Open] = {}
        self._shards: list[dict[str, Any]] = []
        self._counts: dict[str, dict[str, int]] = {}
        self._skipped: dict[str, dict[str, int]] = {}
        self._skipped_examples: list[str] = []
        self._manifest: dict[str, Any] | None = None

    def __enter__(self) -> "ShardWriter":
        if self.stage.exists():
            shutil.rmtree(self.stage)
        (self.stage / "shards").mkdir(parents=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
            return
        if self._manifest is None:
            self.close()

    def add(self, sample: Sample) -> None:
        key = (sample.task, sample.split)
        cur = self._open.get(key)
        if cur is None:
            cur = self._open[key] = _Open(sample.task, sample.split, 0, [])
        cur.rows.append(sample)
        self._counts.setdefault(sample.task, {}).setdefault(sample.split, 0)
        self._counts[sample.task][sample.split] += 1
        if len(cur.rows) >= self.shard_size:
            self._flush(cur)

    def add_all(self, samples: Iterable[Sample]) -> None:
        for s in samples:
            self.add(s)

    def skip(self, task: str, split: str, reason: str) -> None:
        """Record a bad record that was skipped (``--skip-bad``); counted in the manifest."""
        self._skipped.setdefault(task, {}).setdefault(split, 0)
        self._skipped[task][split] += 1
        if len(self._skipped_examples) < 100:
            self._skipped_examples.append(reason)

    def _flush(self, cur: _Open) -> None:
        if not cur.rows:
            return
        name = f"{_SAFE.sub('_', cur.task)}.{_SAFE.sub('_', cur.split)}.{cur.index:05d}.arrow"
        path = self.stage / "shards" / name
        batch = to_record_batch(cur.rows)
        with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, SAMPLE_SCHEMA) as w:
            # Several record batches per shard keep reader memory bounded for big shards.
            for start in range(0, batch.num_rows, 64):
                w.write_batch(batch.slice(start, 64))
        self._shards.append(
            {
                "file": f"shards/{name}",
                "task": cur.task,
                "split": cur.split,
                "rows": batch.num_rows,
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )
        cur.index += 1
        cur.rows = []

    def close(self) -> dict[str, Any]:
        """Flush open shards, write the manifest and move the dataset into place. Idempotent."""
        if self._manifest is not None:
            return self._manifest
        for cur in self._open.values():
            self._flush(cur)
        names = [t["name"] for t in self.tasks]
        for task in self._counts:
            if task not in names:
                raise DatasetError(f"sample of task {task!r} not in the declared tasks {names}")
        manifest = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "cl_service_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **self.info,
            "tasks": self.tasks,
            "counts": self._counts,
            "skipped": self._skipped,
            "skipped_examples": self._skipped_examples,
            "shard_size": self.shard_size,
            "shards": self._shards,
        }
        atomic_write_text(self.stage / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False))
        replace_dir(self.stage, self.out)  # an old folder (overwrite) is swapped out only now
        self._manifest = manifest
        return manifest


class ShardDataset:
    """Read side of a dataset folder. Streams samples shard by shard."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        mpath = self.root / MANIFEST
        if not mpath.is_file():
            raise DatasetError(f"{self.root} is not a cl-service dataset (no {MANIFEST}); "
                               "create one with `clsvc data synth` or `clsvc data ingest`")
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise DatasetError(f"{mpath}: not valid JSON ({e})") from None
        if self.manifest.get("format") != FORMAT:
            raise DatasetError(f"{mpath}: format {self.manifest.get('format')!r} is not {FORMAT!r}")
        version = self.manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DatasetError(f"{mpath}: schema version {version} but this cl-service reads {SCHEMA_VERSION}")

    @property
    def tasks(self) -> list[str]:
        """Stream task names in order (router/replay extras such as ``_router`` are not in the stream)."""
        return list(self.manifest.get("stream") or [t["name"] for t in self.manifest["tasks"]])

    def task_meta(self, task: str) -> dict[str, str]:
        for t in self.manifest["tasks"]:
            if t["name"] == task:
                return t
        raise KeyError(f"task {task!r} not in dataset {self.root}; tasks: {', '.join(self.tasks)}")

    def count(self, task: str | None = None, split: str | None = None) -> int:
        return sum(s["rows"] for s in self._select(task, split))

    def splits(self, task: str) -> list[str]:
        return sorted(self.manifest["counts"].get(task, {}))

    def _select(self, task: str | None, split: str | None) -> list[dict[str, Any]]:
        if task is not None and task not in self.manifest["counts"]:
            raise KeyError(f"task {task!r} not in dataset {self.root}; tasks: {', '.join(self.tasks)}")
        return [s for s in self.manifest["shards"]
                if (task is None or s["task"] == task) and (split is None or s["split"] == split)]

    def shard_paths(self, task: str | None = None, split: str | None = None) -> list[str]:
        return [str(self.root / s["file"]) for s in self._select(task, split)]

    def iter_batches(self, task: str | None = None, split: str | None = None) -> Iterator[pa.RecordBatch]:
        for path in self.shard_paths(task, split):
            with pa.memory_map(path, "r") as src:
                reader = ipc.open_file(src)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)

    def iter_samples(self, task: str | None = None, split: str | None = None) -> Iterator[Sample]:
        for batch in self.iter_batches(task, split):
            yield from from_record_batch(batch)

    def samples(self, task: str, split: str, limit: int | None = None) -> list[Sample]:
        """Materialise one task's split (small splits only: training and test sets of one task)."""
        out: list[Sample] = []
        for s in self.iter_samples(task, split):
            if limit is not None and len(out) >= limit:
                break
            out.append(s)
        return out

    def arrow_dataset(self) -> pads.Dataset:
        """A ``pyarrow.dataset`` over all shards (filter with ``pads.field('task') == 'RS'``)."""
        return pads.dataset(self.shard_paths(), format="ipc", schema=SAMPLE_SCHEMA)

    def verify(self) -> list[str]:
        """Check every shard's presence, sha256 and row count. Returns a list of problems (empty = ok)."""
        problems = []
        for s in self.manifest["shards"]:
            path = self.root / s["file"]
            if not path.is_file():
                problems.append(f"{s['file']}: missing")
                continue
            digest = sha256_file(path)
            if digest != s["sha256"]:
                problems.append(f"{s['file']}: sha256 {digest[:12]}… != manifest {s['sha256'][:12]}…")
                continue
            try:
                with pa.memory_map(str(path), "r") as src:
                    rows = ipc.open_file(src).read_all().num_rows
            except pa.ArrowInvalid as e:
                problems.append(f"{s['file']}: unreadable ({e})")
                continue
            if rows != s["rows"]:
                problems.append(f"{s['file']}: {rows} rows != manifest {s['rows']}")
        return problems
