"""Ray Data over a shard dataset: ``ray.data.read_parquet`` over its shards (a local folder or a URI such as
``s3://bucket/ds``); a schema-version-1 dataset's Arrow IPC shards through :class:`ArrowIPCDatasource`."""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa
import pyarrow.ipc as ipc
import ray.data
from ray.data.datasource.file_based_datasource import FileBasedDatasource

from cl_service.data.shards import ShardDataset


class ArrowIPCDatasource(FileBasedDatasource):
    """Reads Arrow IPC *file* format shards (schema version 1), one record batch per block."""

    _FILE_EXTENSIONS = ["arrow"]

    def _read_stream(self, f: "pa.NativeFile", path: str) -> Iterator[pa.Table]:
        reader = ipc.open_file(pa.BufferReader(f.read()))
        for i in range(reader.num_record_batches):
            yield pa.Table.from_batches([reader.get_batch(i)])


def read_shards(root: str, task: str | None = None, split: str | None = None, **kwargs) -> ray.data.Dataset:
    """A Ray Dataset over the shards of ``root`` (optionally one task/split): the columns of
    :data:`cl_service.data.schema.SAMPLE_SCHEMA` (``images``: ``{bytes, path}`` per image)."""
    ds = ShardDataset(root)
    paths = ds.shard_paths(task, split)
    if not paths:
        raise ValueError(f"no shards for task={task!r} split={split!r} in {root}")
    if ds.legacy:
        return ray.data.read_datasource(ArrowIPCDatasource(paths, **kwargs))
    return ray.data.read_parquet(paths, **kwargs)
