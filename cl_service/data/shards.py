"""A dataset = a folder of Parquet shards plus ``manifest.json``.

Layout::

    DATASET/
      manifest.json                     schema version, tasks in stream order, counts, per-shard sha256
      README.md                         a dataset card: its YAML ``configs`` tell ``datasets`` the splits
      shards/<task>.<split>.<k>.parquet SAMPLE_SCHEMA, <= shard_size rows each, row groups of 64 rows

Other tools open the folder as it is: ``datasets.load_dataset(DATASET)`` (every task, splits ``train`` /
``test``; ``load_dataset(DATASET, "RS")`` one task; images decode to PIL), ``ray.data.read_parquet``,
``pyarrow.dataset`` (:meth:`ShardDataset.arrow_dataset`). Parquet rather than Arrow IPC, because
``datasets`` and the Parquet readers of every engine read it without custom code. Datasets of schema
version 1 (Arrow IPC *file* shards, ``.arrow``) are still read, to the same samples.

Writes are atomic at the dataset level: :class:`ShardWriter` writes into a hidden staging folder next
to the target and renames it into place only after the manifest is written, so an interrupted ingest
leaves nothing that looks like a dataset. Readers stream shard by shard and record batch by record
batch (never the whole set in memory). A dataset is read from a local path or from a URI that
``pyarrow.fs`` knows (``file://``, ``s3://``, ``gs://``, ``hdfs://``): workers on other nodes can read the
shards from object storage instead of a path that only the driver has.
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
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from cl_service import __version__
from cl_service._atomic import (atomic_write_text, remove_leftovers,  # noqa: F401  (atomic_write_text re-exported)
                                replace_dir)
from cl_service.data.schema import (READABLE_VERSIONS, SAMPLE_SCHEMA, SAMPLE_SCHEMA_V1, SCHEMA_VERSION, Sample,
                                    from_record_batch, to_record_batch)

MANIFEST = "manifest.json"
FORMAT = "cl-service/arrow-shards"
CARD = "README.md"
_SAFE = re.compile(r"[^A-Za-z0-9_-]+")
_SPLIT_NAME = re.compile(r"^\w+(\.\w+)*$")  # what datasets accepts as a split name
_ROWS_PER_GROUP = 64  # row groups (record batches) of a shard: reader memory stays bounded for big shards


class DatasetError(ValueError):
    """A dataset folder is missing, incomplete, of another schema version, or corrupt."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20, fs: pafs.FileSystem | None = None) -> str:
    h = hashlib.sha256()
    with (open(path, "rb") if fs is None else fs.open_input_stream(str(path))) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def dataset_location(path: str | os.PathLike) -> str | Path:
    """A dataset's location as jobs and workers get it: a URI (``s3://bucket/ds``, ``file:///data/ds``) as
    given, a local path resolved to an absolute one."""
    return str(path).rstrip("/") if is_uri(path) else Path(path).resolve()


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
        remove_leftovers(self.out)  # staging folders of killed writers (never a dataset: no rename happened)
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
        name = f"{_SAFE.sub('_', cur.task)}.{_SAFE.sub('_', cur.split)}.{cur.index:05d}.parquet"
        path = self.stage / "shards" / name
        batch = to_record_batch(cur.rows)
        # Statistics and dictionaries only for the short columns: min/max of image bytes would only bloat footers.
        pq.write_table(pa.Table.from_batches([batch]), str(path), row_group_size=_ROWS_PER_GROUP,
                       use_dictionary=["task", "split", "scorer"], write_statistics=["task", "split", "id", "scorer"])
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
        atomic_write_text(self.stage / CARD, _card(manifest))
        atomic_write_text(self.stage / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False))
        replace_dir(self.stage, self.out)  # an old folder (overwrite) is swapped out only now
        self._manifest = manifest
        return manifest


def _card(manifest: dict[str, Any]) -> str:
    """The dataset card: YAML ``configs`` that map the shards to ``datasets`` configs and splits (``all``, the
    default, then one per task), so ``load_dataset(folder)`` needs neither a script nor file patterns."""
    def config(name: str, task_glob: str, splits: Iterable[str], default: bool = False) -> list[str]:
        files = [f"  - split: {sp}\n    path: " + json.dumps(f"shards/{task_glob}.{_SAFE.sub('_', sp)}.*.parquet")
                 for sp in sorted(splits, key=order) if _SPLIT_NAME.match(sp)]  # others: not a datasets split name
        return [f"- config_name: {json.dumps(name)}", *(["  default: true"] if default else []), "  data_files:",
                *files] if files else []

    order = lambda sp: (sp != "train", sp != "test", sp)  # noqa: E731  train, test, then the others
    counts = manifest["counts"]
    stream = manifest.get("stream") or [t["name"] for t in manifest["tasks"]]
    configs = config("all", "*", {sp for t in counts.values() for sp in t}, default=True)
    for task in [t["name"] for t in manifest["tasks"]]:
        if task in counts and task != "all":
            configs += config(task, _SAFE.sub("_", task), counts[task])
    lines = ["---", "configs:", *configs] if configs else ["---"]
    title = manifest.get("benchmark") or "cl-service dataset"
    return "\n".join(lines + ["---", f"# {title}", "",
                              f"A cl-service task stream (schema version {manifest['schema_version']}), task order "
                              f"{', '.join(stream)}. `manifest.json` holds the order, the counts and every shard's "
                              "sha256. Open with `datasets.load_dataset(\"<this folder>\")` (all tasks) or "
                              "`load_dataset(\"<this folder>\", \"<task>\")`; `images` decode to PIL images.", ""])


class ShardDataset:
    """Read side of a dataset folder (a local path or a ``pyarrow.fs`` URI). Streams samples shard by shard."""

    def __init__(self, root: str | os.PathLike) -> None:
        if is_uri(root):
            self.root: Path | str = str(root).rstrip("/")
            self._fs, self._base = pafs.FileSystem.from_uri(self.root)
        else:
            self.root = Path(root)
            self._fs, self._base = pafs.LocalFileSystem(), str(self.root.absolute())
        mpath = self._join(MANIFEST)
        try:
            with self._fs.open_input_stream(self._fs_path(MANIFEST)) as f:
                text = f.read().decode()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise DatasetError(f"{self.root} is not a cl-service dataset (no {MANIFEST}); "
                               "create one with `clsvc data synth` or `clsvc data ingest`") from None
        try:
            self.manifest: dict[str, Any] = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{mpath}: not valid JSON ({e})") from None
        if self.manifest.get("format") != FORMAT:
            raise DatasetError(f"{mpath}: format {self.manifest.get('format')!r} is not {FORMAT!r}")
        version = self.manifest.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise DatasetError(f"{mpath}: schema version {version} but this cl-service reads versions "
                               f"{', '.join(map(str, READABLE_VERSIONS))}")

    def _join(self, rel: str) -> str:
        return f"{self.root}/{rel}" if isinstance(self.root, str) else str(self.root / rel)

    def _fs_path(self, rel: str) -> str:
        return f"{self._base.rstrip('/')}/{rel}"

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
        """Shard files as local paths, or as URIs for a dataset opened from a URI."""
        return [self._join(s["file"]) for s in self._select(task, split)]

    def _batches(self, rel: str) -> Iterator[pa.RecordBatch]:
        with self._fs.open_input_file(self._fs_path(rel)) as src:
            if rel.endswith(".arrow"):  # schema version 1
                reader = ipc.open_file(src)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
            else:
                yield from pq.ParquetFile(src).iter_batches(batch_size=_ROWS_PER_GROUP)

    def iter_batches(self, task: str | None = None, split: str | None = None) -> Iterator[pa.RecordBatch]:
        for s in self._select(task, split):
            yield from self._batches(s["file"])

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

    @property
    def legacy(self) -> bool:
        """A schema-version-1 dataset (Arrow IPC shards, ``images`` as ``list<binary>``)."""
        return self.manifest["schema_version"] == 1

    def arrow_dataset(self) -> pads.Dataset:
        """A ``pyarrow.dataset`` over all shards (filter with ``pads.field('task') == 'RS'``); its schema is
        :data:`SAMPLE_SCHEMA` (:data:`SAMPLE_SCHEMA_V1` for a version-1 dataset)."""
        paths = [self._fs_path(s["file"]) for s in self.manifest["shards"]]
        if self.legacy:
            return pads.dataset(paths, format="ipc", schema=SAMPLE_SCHEMA_V1, filesystem=self._fs)
        return pads.dataset(paths, format="parquet", schema=SAMPLE_SCHEMA, filesystem=self._fs)

    def verify(self) -> list[str]:
        """Check every shard's presence, sha256 and row count. Returns a list of problems (empty = ok)."""
        problems = []
        for s in self.manifest["shards"]:
            path = self._fs_path(s["file"])
            if self._fs.get_file_info(path).type != pafs.FileType.File:
                problems.append(f"{s['file']}: missing")
                continue
            digest = sha256_file(path, fs=self._fs)
            if digest != s["sha256"]:
                problems.append(f"{s['file']}: sha256 {digest[:12]}… != manifest {s['sha256'][:12]}…")
                continue
            try:
                with self._fs.open_input_file(path) as src:
                    rows = (ipc.open_file(src).read_all().num_rows if path.endswith(".arrow")
                            else pq.ParquetFile(src).metadata.num_rows)
            except pa.ArrowInvalid as e:
                problems.append(f"{s['file']}: unreadable ({e})")
                continue
            if rows != s["rows"]:
                problems.append(f"{s['file']}: {rows} rows != manifest {s['rows']}")
        return problems
