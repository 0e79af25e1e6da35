"""The job store: a job's resume points and finished adapter, found by the job (not by who wrote them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cl_service.train.jobstore import JobStore


def _part(tmp_path: Path, name: str, files: dict[str, bytes]) -> Path:
    d = tmp_path / name
    d.mkdir()
    for f, b in files.items():
        (d / f).write_bytes(b)
    return d


def test_a_resume_point_counts_once_complete_and_only_for_the_same_world_and_strategy(tmp_path):
    store = JobStore(str(tmp_path / "storage"))
    slot = store.slot("expert/RS", "k1", "/runs/a/adapters/experts/RS")
    assert slot == store.slot("expert/RS", "k1", "/runs/a/adapters/experts/RS")  # a rerun finds it
    assert slot != store.slot("expert/RS", "k1", "/runs/b/adapters/experts/RS")  # another results folder does not
    assert store.latest(slot, 2, "ddp") is None
    store.put_part(slot, 2, _part(tmp_path, "r0", {"trainable.safetensors": b"w2", "rng_rank0.pt": b"a"}))
    store.put_part(slot, 2, _part(tmp_path, "r1", {"rng_rank1.pt": b"b"}))
    assert store.latest(slot, 2, "ddp") is None  # the ranks' files are there, the marker is not: a writer stopped
    store.commit(slot, 2, 2, "ddp")
    point = store.latest(slot, 2, "ddp")
    assert point["step"] == 2
    with store.open_point(point, 1) as d:
        assert sorted(p.name for p in d.iterdir()) == ["COMPLETE", "meta.json", "rng_rank0.pt", "rng_rank1.pt",
                                                         "trainable.safetensors"]
    store.put_part(slot, 4, _part(tmp_path, "s4", {"trainable.safetensors": b"w4"}))
    assert store.latest(slot, 2, "ddp")["step"] == 2  # step 4 is not complete yet
    store.commit(slot, 4, 2, "ddp")
    assert [p["step"] for p in store.resume_points(slot)] == [4]  # the older point went
    assert store.latest(slot, 1, "ddp") is None and store.latest(slot, 2, "deepspeed") is None
    store.clear_steps(slot)
    assert store.resume_points(slot) == []


def test_a_stored_adapter_stays_until_dropped_and_ends_the_resume_points(tmp_path):
    store = JobStore(str(tmp_path / "storage"))
    slot = store.slot("expert/RS", "k1", "/out")
    store.put_part(slot, 2, _part(tmp_path, "r0", {"trainable.safetensors": b"w"}))
    store.commit(slot, 2, 1, "ddp")
    adapter = _part(tmp_path, "adapter", {"adapter.json": b"{}", "adapter_model.safetensors": b"x"})
    store.put_adapter(slot, adapter)
    assert store.has_adapter(slot) and store.resume_points(slot) == []
    dest = tmp_path / "dest"
    dest.mkdir()
    store.take_adapter(slot, dest)
    assert (dest / "adapter_model.safetensors").read_bytes() == b"x"
    assert store.has_adapter(slot)  # a driver stopped before it committed dest takes it again
    store.drop(slot)
    assert not store.has_adapter(slot) and not Path(slot).exists()
    with pytest.raises(FileNotFoundError):
        store.take_adapter(slot, dest)
