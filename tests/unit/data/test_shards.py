import io
import json

import pyarrow.dataset as pads
import pytest
from PIL import Image

from cl_service.data.schema import SAMPLE_SCHEMA, SCHEMA_VERSION, Sample
from cl_service.data.shards import MANIFEST, DatasetError, ShardDataset, ShardWriter

pytestmark = pytest.mark.timeout(60)

TASKS = [{"name": "A", "scorer": "exact", "description": "a"}, {"name": "B", "scorer": "contains", "description": "b"}]


def _png(color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _samples(task: str, split: str, n: int) -> list[Sample]:
    return [Sample(task, split, f"{task}-{split}-{i}", [_png((i, 0, 0))], f"q{i}?", [str(i), f"x{i}"], "exact",
                   {"k": i}) for i in range(n)]


def _write(path, shard_size=4):
    rows = _samples("A", "train", 10) + _samples("A", "test", 3) + _samples("B", "train", 5)
    with ShardWriter(path, TASKS, shard_size=shard_size, info={"stream": ["A", "B"]}) as w:
        w.add_all(rows)
    return rows


def test_round_trip_counts_and_shard_size(tmp_path):
    rows = _write(tmp_path / "ds")
    ds = ShardDataset(tmp_path / "ds")
    assert ds.tasks == ["A", "B"]
    assert ds.manifest["schema_version"] == SCHEMA_VERSION
    assert ds.manifest["counts"] == {"A": {"train": 10, "test": 3}, "B": {"train": 5}}
    # 10 rows at 4 per shard -> 3 shards; 3 -> 1; 5 -> 2
    assert len(ds.shard_paths("A", "train")) == 3 and len(ds.shard_paths("B")) == 2
    assert all(s["rows"] <= 4 for s in ds.manifest["shards"])
    assert list(ds.iter_samples("A", "train")) == rows[:10]
    assert ds.samples("B", "train", limit=2) == rows[13:15]
    assert ds.verify() == []


def test_pyarrow_dataset_reads_the_same_files(tmp_path):
    _write(tmp_path / "ds")
    pa_ds = ShardDataset(tmp_path / "ds").arrow_dataset()
    assert pa_ds.schema.equals(SAMPLE_SCHEMA, check_metadata=False)
    table = pa_ds.to_table(filter=(pads.field("task") == "A") & (pads.field("split") == "test"))
    assert sorted(table.column("id").to_pylist()) == ["A-test-0", "A-test-1", "A-test-2"]
    assert json.loads(table.column("metadata")[0].as_py()) == {"k": 0}


def test_verify_detects_corruption_and_missing_shards(tmp_path):
    _write(tmp_path / "ds")
    ds = ShardDataset(tmp_path / "ds")
    first, second = ds.shard_paths()[:2]
    data = bytearray(open(first, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(first, "wb").write(bytes(data))
    import os

    os.remove(second)
    problems = ds.verify()
    assert len(problems) == 2
    assert "sha256" in problems[0] and "missing" in problems[1]


def test_interrupted_write_leaves_nothing(tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError):
        with ShardWriter(out, TASKS, shard_size=2) as w:
            w.add_all(_samples("A", "train", 5))  # two complete shards are already on disk in staging
            raise RuntimeError("killed")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite_and_is_replaced_whole(tmp_path):
    _write(tmp_path / "ds")
    with pytest.raises(FileExistsError):
        ShardWriter(tmp_path / "ds", TASKS)
    with ShardWriter(tmp_path / "ds", TASKS, overwrite=True) as w:
        w.add_all(_samples("B", "test", 2))
    ds = ShardDataset(tmp_path / "ds")
    assert ds.manifest["counts"] == {"B": {"test": 2}}
    assert len(list((tmp_path / "ds" / "shards").iterdir())) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_undeclared_task_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="not in the declared tasks"):
        with ShardWriter(tmp_path / "ds", TASKS) as w:
            w.add_all(_samples("C", "train", 1))
    assert not (tmp_path / "ds").exists()


def test_reader_rejects_other_schema_version_and_non_datasets(tmp_path):
    with pytest.raises(DatasetError, match="not a cl-service dataset"):
        ShardDataset(tmp_path)
    _write(tmp_path / "ds")
    m = json.loads((tmp_path / "ds" / MANIFEST).read_text())
    m["schema_version"] = 99
    (tmp_path / "ds" / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="schema version 99"):
        ShardDataset(tmp_path / "ds")


def test_unknown_task_lists_known(tmp_path):
    _write(tmp_path / "ds")
    with pytest.raises(KeyError, match="tasks: A, B"):
        list(ShardDataset(tmp_path / "ds").iter_samples("Z"))
