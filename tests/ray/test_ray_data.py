import pytest

from cl_service.data.shards import ShardDataset

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]


def test_ray_data_reads_shards(ray_local, dcl_shards):
    from cl_service.on_ray.data import read_shards

    ds = ShardDataset(dcl_shards)
    rds = read_shards(str(dcl_shards), task="Med", split="train")
    rows = rds.take_all()
    assert len(rows) == ds.count("Med", "train") == 12
    assert {r["task"] for r in rows} == {"Med"}
    assert sorted(r["id"] for r in rows) == sorted(s.id for s in ds.iter_samples("Med", "train"))
    assert read_shards(str(dcl_shards)).count() == ds.count()
