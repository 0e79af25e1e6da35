"""Hot add retries what failed verification, and every republished adapter gets the next version — no model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cl_service.adapters.registry import (AdapterError, commit_dir, finalize_adapter, publish_dir, read_adapter,
                                          restamp_version)
from cl_service.serve.catalog import Catalog
from cl_service.serve.hotadd import CatalogWatch

pytestmark = pytest.mark.timeout(60)

TASKS = ["RS", "Med", "AD"]


def _publish(final: Path, weights: bytes, kind: str = "expert", task: str | None = None, job_key: str = "k") -> dict:
    """Save an adapter the way training does: a staging folder, adapter.json last, one folder swap."""
    task = task or final.name
    stage = publish_dir(final)
    (stage / "adapter_model.safetensors").write_bytes(weights)
    meta = finalize_adapter(stage, id=f"{kind}:{task}" if kind == "expert" else f"router:{final.name}", kind=kind,
                            task=task if kind == "expert" else "*", description=f"{task} domain: things", base="b",
                            job_key=job_key)
    commit_dir(stage, final)
    return meta


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def run(tmp_path):
    (tmp_path / "config.resolved.json").write_text(json.dumps({"tasks": TASKS, "base": "/b", "dataset": "/d"}))
    for t in ("RS", "Med"):
        _publish(tmp_path / "adapters" / "experts" / t, b"weights of " + t.encode())
    _publish(tmp_path / "adapters" / "router" / "stage-1-Med", b"router 1", kind="router")
    return tmp_path


def test_versions_count_retrains_and_identical_republishes_keep_theirs(run):
    rs = run / "adapters" / "experts" / "RS"
    assert read_adapter(rs)["version"] == 1
    assert _publish(rs, b"retrained RS weights")["version"] == 2
    assert _publish(rs, b"retrained RS weights")["version"] == 2  # the same files again: the same adapter
    assert _publish(rs, b"retrained RS weights", job_key="k2")["version"] == 3  # another job's training
    router = run / "adapters" / "router" / "stage-1-Med"
    assert _publish(router, b"router 2", kind="router")["version"] == 2
    cat = Catalog.load(run)
    assert {e.task: e.version for e in cat.experts} == {"RS": 3, "Med": 1} and cat.router_version == 2
    # finalized in place (no staging folder), the folder's previous adapter.json is the one replaced
    (rs / "extra.txt").write_text("notes")
    assert finalize_adapter(rs, id="expert:RS", kind="expert", task="RS", description="d", base="b",
                            job_key="k2")["version"] == 4


def test_an_expert_that_failed_verification_is_retried_when_its_files_change(run):
    clock = _Clock()
    watch = CatalogWatch(run, retry_s=5, clock=clock)
    ad = run / "adapters" / "experts" / "AD"
    _publish(ad, b"weights of AD")
    good = (ad / "adapter_model.safetensors").read_bytes()
    (ad / "adapter_model.safetensors").write_bytes(b"torn copy of AD")  # published, then damaged
    assert watch.poll() is False and watch.pending and watch.failures == 1
    assert [e.task for e in watch.catalog.experts] == ["RS", "Med"]
    assert watch.poll() is False and watch.failures == 1  # unchanged and within the backoff: not re-hashed
    (ad / "adapter_model.safetensors").write_bytes(good)  # repaired: its size/mtime changed, so at once
    assert watch.poll() is True and not watch.pending
    assert [e.task for e in watch.catalog.experts] == TASKS and watch.reloads == 1


def test_a_failed_verification_is_retried_after_a_backoff_even_when_nothing_seems_changed(run):
    clock = _Clock()
    watch = CatalogWatch(run, retry_s=5, max_retry_s=20, clock=clock)
    ad = run / "adapters" / "experts" / "AD"
    _publish(ad, b"weights of AD")
    f = ad / "adapter_model.safetensors"
    st = f.stat()
    f.write_bytes(b"weights of XX")  # same size ...
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and mtime: the cheap scan cannot tell
    assert watch.poll() is False and watch.failures == 1
    clock.t += 5.1
    assert watch.poll() is False and watch.failures == 2  # verified again after 5 s, still bad; next in 10 s
    f.write_bytes(b"weights of AD")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    clock.t += 5
    assert watch.poll() is False  # the backoff doubled: not yet
    clock.t += 5.1
    assert watch.poll() is True and [e.task for e in watch.catalog.experts] == TASKS and not watch.pending


def test_a_run_with_nothing_complete_is_retried_and_keeps_serving_the_last_catalog(run):
    watch = CatalogWatch(run, retry_s=0)
    before = watch.catalog
    for t in ("RS", "Med"):
        (run / "adapters" / "experts" / t / "adapter_model.safetensors").write_bytes(b"gone")
    with pytest.raises(AdapterError, match="no complete expert"):
        watch.poll()
    assert watch.catalog is before and watch.pending
    _publish(run / "adapters" / "experts" / "RS", b"weights of RS v2")
    _publish(run / "adapters" / "experts" / "Med", b"weights of Med v2")
    assert watch.poll() is True and {e.task: e.version for e in watch.catalog.experts} == {"RS": 2, "Med": 2}


def test_an_adapter_versioned_elsewhere_is_restamped_against_the_folder_it_replaces(run, tmp_path_factory):
    """A Ray Train worker finalizes into its own folder (version 1 there); the driver restamps it on arrival."""
    rs = run / "adapters" / "experts" / "RS"
    elsewhere = tmp_path_factory.mktemp("worker") / "RS"
    assert _publish(elsewhere, b"retrained on a worker")["version"] == 1
    stage = publish_dir(rs)
    for f in elsewhere.iterdir():
        (stage / f.name).write_bytes(f.read_bytes())
    assert restamp_version(stage, rs)["version"] == 2  # RS held version 1 with other weights
    commit_dir(stage, rs)
    assert read_adapter(rs)["version"] == 2  # and it still verifies
    again = publish_dir(rs)
    for f in elsewhere.iterdir():
        (again / f.name).write_bytes(f.read_bytes())
    assert restamp_version(again, rs)["version"] == 2  # the same files again: the same version
