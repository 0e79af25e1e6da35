"""Shards other tools open (Parquet: ``datasets``, ``pyarrow.dataset``), datasets read from a URI, and old
(schema version 1, Arrow IPC) datasets read to exactly the samples the new format holds."""

import io
import json
import shutil

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cl_service.data.schema import SAMPLE_SCHEMA_V1, SCHEMA_VERSION
from cl_service.data.shards import CARD, MANIFEST, ShardDataset, ShardWriter, sha256_file
from cl_service.data.synth import BENCHMARKS
from cl_service.train.job import choose_with_copies

pytestmark = pytest.mark.timeout(120)

SPEC = BENCHMARKS.get("dcl-mini")
TASKS = [{"name": t.name, "scorer": t.scorer, "description": t.description} for t in SPEC.tasks]


def _synth(out, train=7, test=3, shard_size=4):
    """What the demo does to make its data (``run.prepare_dataset``), smaller."""
    with ShardWriter(out, TASKS, shard_size=shard_size, info={"benchmark": SPEC.name, "stream": SPEC.task_names}) as w:
        w.add_all(SPEC.generate("train", train, 0))
        w.add_all(SPEC.generate("test", test, 0))
    return ShardDataset(out)


def _as_version_1(src: ShardDataset, out) -> ShardDataset:
    """The same dataset as the writer of schema version 1 wrote it: Arrow IPC files of ``SAMPLE_SCHEMA_V1`` in
    64-row record batches, ``images`` as ``list<binary>``, the manifest listing ``.arrow`` shards."""
    (out / "shards").mkdir(parents=True)
    manifest = json.loads(json.dumps(src.manifest))
    manifest["schema_version"] = 1
    for shard in manifest["shards"]:
        table = pq.read_table(str(src.root / shard["file"]))
        cols = {n: table.column(n).to_pylist() for n in SAMPLE_SCHEMA_V1.names}
        cols["images"] = [[im["bytes"] for im in ims] for ims in cols["images"]]
        batch = pa.RecordBatch.from_pydict(cols, schema=SAMPLE_SCHEMA_V1)
        shard["file"] = shard["file"].replace(".parquet", ".arrow")
        path = out / shard["file"]
        with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, SAMPLE_SCHEMA_V1) as w:
            for start in range(0, batch.num_rows, 64):
                w.write_batch(batch.slice(start, 64))
        shard["bytes"], shard["sha256"] = path.stat().st_size, sha256_file(path)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return ShardDataset(out)


def test_version_1_datasets_read_to_the_same_samples_as_the_new_format(tmp_path):
    new = _synth(tmp_path / "new")
    old = _as_version_1(new, tmp_path / "old")
    assert new.manifest["schema_version"] == SCHEMA_VERSION == 2 and old.legacy and not new.legacy
    assert all(p.endswith(".parquet") for p in new.shard_paths()) and all(p.endswith(".arrow") for p in old.shard_paths())
    # everything training and evaluation see: every sample (images byte for byte) in order, and the seeded choice
    # of a job's part with its jittered copies
    for task in SPEC.task_names:
        for split in ("train", "test"):
            assert list(old.iter_samples(task, split)) == list(new.iter_samples(task, split))
        assert choose_with_copies(old, task, "train", 5, 3, 1) == choose_with_copies(new, task, "train", 5, 3, 1)
    assert list(old.iter_samples()) == list(new.iter_samples()) and len(list(new.iter_samples())) == 50
    assert old.verify() == [] and new.verify() == []
    assert old.arrow_dataset().to_table().num_rows == new.arrow_dataset().to_table().num_rows == 50
    assert old.arrow_dataset().schema.field("images").type == pa.list_(pa.binary())


def test_the_same_samples_write_the_same_bytes(tmp_path):
    """Shard checksums (and so the manifest digest that job keys use) do not depend on when data was written."""
    a, b = _synth(tmp_path / "a"), _synth(tmp_path / "b")
    assert [s["sha256"] for s in a.manifest["shards"]] == [s["sha256"] for s in b.manifest["shards"]]
    assert (tmp_path / "a" / CARD).read_text() == (tmp_path / "b" / CARD).read_text()


def test_a_dataset_opens_from_a_uri(tmp_path):
    local = _synth(tmp_path / "ds")
    remote = ShardDataset((tmp_path / "ds").as_uri())
    assert remote.shard_paths()[0].startswith("file://") and remote.tasks == local.tasks
    assert list(remote.iter_samples("Med", "test")) == list(local.iter_samples("Med", "test"))
    assert remote.verify() == [] and remote.arrow_dataset().count_rows() == 50
    shutil.rmtree(tmp_path / "ds" / "shards")
    assert len(remote.verify()) == len(local.manifest["shards"])


def test_datasets_load_dataset_opens_the_folder_with_its_splits_and_tasks(tmp_path):
    datasets = pytest.importorskip("datasets")
    ours = _synth(tmp_path / "ds")
    card = (tmp_path / "ds" / CARD).read_text()
    assert card.startswith('---\nconfigs:\n- config_name: "all"\n  default: true\n  data_files:\n  - split: train')
    hf = datasets.load_dataset(str(tmp_path / "ds"), cache_dir=str(tmp_path / "cache"))
    assert sorted(hf) == ["test", "train"]
    for split in ("train", "test"):
        rows = sorted(hf[split], key=lambda r: r["id"])
        mine = sorted(ours.iter_samples(split=split), key=lambda s: s.id)
        assert [(r["task"], r["id"], r["question"], r["answers"], json.loads(r["metadata"])) for r in rows] == \
            [(s.task, s.id, s.question, s.answers, s.metadata) for s in mine]
    first = min(hf["test"], key=lambda r: r["id"])
    sample = min(ours.iter_samples(split="test"), key=lambda s: s.id)
    assert isinstance(first["images"][0], Image.Image)  # the Image feature came from the schema: no code
    assert first["images"][0].tobytes() == Image.open(io.BytesIO(sample.images[0])).tobytes()
    med = datasets.load_dataset(str(tmp_path / "ds"), "Med", split="train", cache_dir=str(tmp_path / "cache"))
    assert [r["id"] for r in med] == [s.id for s in ours.iter_samples("Med", "train")]


def test_a_training_job_reads_its_samples_from_a_uri_as_from_the_path(tmp_path):
    """What a Ray Train worker does with ``job.dataset``: the same samples and the same job key from a URI."""
    from cl_service.adapters.lora import LoraCfg
    from cl_service.train.job import DataPart, TrainJob, load_parts
    from cl_service.train.loop import TrainCfg

    _synth(tmp_path / "ds")
    job = TrainJob(name="expert/Med", kind="expert", task="Med", out_dir=str(tmp_path / "out"), base_path="base",
                   dataset=str(tmp_path / "ds"), parts=(DataPart("Med", limit=5, seed=2, augment=1),),
                   lora=LoraCfg(), train=TrainCfg())
    remote = job.replace(dataset=(tmp_path / "ds").as_uri())
    assert load_parts(remote) == load_parts(job) and len(load_parts(job)) == 10
    assert remote.key() == job.key()
