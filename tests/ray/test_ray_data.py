import json

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from cl_service.data.schema import SAMPLE_SCHEMA_V1
from cl_service.data.shards import MANIFEST, ShardDataset, sha256_file

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]


def test_ray_data_reads_shards(ray_local, dcl_shards):
    import ray.data

    from cl_service.on_ray.data import read_shards

    ds = ShardDataset(dcl_shards)
    rds = read_shards(str(dcl_shards), task="Med", split="train")
    rows = rds.take_all()
    assert len(rows) == ds.count("Med", "train") == 12
    assert {r["task"] for r in rows} == {"Med"}
    by_id = {s.id: s for s in ds.iter_samples("Med", "train")}
    assert sorted(r["id"] for r in rows) == sorted(by_id)
    assert all([im["bytes"] for im in r["images"]] == by_id[r["id"]].images for r in rows)
    assert read_shards(str(dcl_shards)).count() == ds.count()
    # the shards folder as it is, through Ray Data's own Parquet reader
    assert ray.data.read_parquet(str(dcl_shards / "shards")).count() == ds.count()


def test_ray_data_reads_version_1_datasets(ray_local, dcl_shards, tmp_path):
    from cl_service.on_ray.data import read_shards

    new = ShardDataset(dcl_shards)
    manifest = {**new.manifest, "schema_version": 1, "shards": []}
    (tmp_path / "shards").mkdir()
    for split in ("train", "test"):  # an Arrow IPC file of schema version 1 per split, as its writer made them
        rows = [s.to_row() for s in new.iter_samples("RS", split)]
        cols = {n: [r[n] for r in rows] for n in SAMPLE_SCHEMA_V1.names}
        cols["images"] = [[im["bytes"] for im in ims] for ims in cols["images"]]
        path = tmp_path / "shards" / f"RS.{split}.00000.arrow"
        with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, SAMPLE_SCHEMA_V1) as w:
            w.write_batch(pa.RecordBatch.from_pydict(cols, schema=SAMPLE_SCHEMA_V1))
        manifest["shards"].append({"file": f"shards/{path.name}", "task": "RS", "split": split, "rows": len(rows),
                                   "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    rows = read_shards(str(tmp_path), task="RS", split="test").take_all()
    assert sorted((r["id"], tuple(r["images"])) for r in rows) == \
        sorted((s.id, tuple(s.images)) for s in new.iter_samples("RS", "test"))
