"""Adapter folders moved as bytes: a copy elsewhere is the same adapter (digest, job key), a corrupt copy is
refused, and a mirror converges to its source by sending only what is missing or changed."""

from __future__ import annotations

import json

import pytest

from cl_service.adapters.registry import AdapterError, adapter_digest, finalize_adapter, read_adapter
from cl_service.adapters.transfer import drop, folder_files, inventory, materialise, plan


def _adapter(folder, weights: bytes, job_key: str = "k1"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(weights)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4}))
    finalize_adapter(folder, id="expert:RS", kind="expert", task="RS", description="", base="b", job_key=job_key)
    return folder


def test_a_shipped_copy_is_the_same_adapter_and_a_corrupt_one_is_refused(tmp_path):
    src = _adapter(tmp_path / "run" / "adapters" / "experts" / "RS", b"\x01" * 64)
    (src / ".adapter.json.tmp-1").write_text("leftover")  # not part of the adapter
    files = folder_files(src)
    assert sorted(files) == ["adapter.json", "adapter_config.json", "adapter_model.safetensors"]
    copy = materialise(files, tmp_path / "elsewhere" / "init")
    assert adapter_digest(copy) == adapter_digest(src)
    assert read_adapter(copy)["files"] == read_adapter(src)["files"]  # what TrainJob.key() knows it by
    bad = dict(files, **{"adapter_model.safetensors": b"\x02" * 64})
    with pytest.raises(AdapterError, match="did not arrive intact"):
        materialise(bad, tmp_path / "elsewhere" / "bad")
    assert not (tmp_path / "elsewhere" / "bad").exists()
    (src / "sub").mkdir()
    with pytest.raises(AdapterError, match="flat"):
        folder_files(src)


def test_a_mirror_gets_what_it_lacks_or_holds_changed_and_loses_what_is_gone(tmp_path):
    root, mirror = tmp_path / "run" / "adapters", tmp_path / "mirror" / "adapters"
    _adapter(root / "experts" / "RS", b"a" * 8)
    _adapter(root / "experts" / "Med", b"b" * 8)
    _adapter(root / ".experts.partial-9", b"c" * 8)  # an unfinished save is no adapter yet
    assert sorted(inventory(root)) == ["experts/Med", "experts/RS"] and inventory(mirror) == {}
    send, gone = plan(inventory(root), inventory(mirror))
    assert (send, gone) == (["experts/Med", "experts/RS"], [])
    for rel in send:
        materialise(folder_files(root / rel), mirror / rel)
    assert inventory(mirror) == inventory(root) and plan(inventory(root), inventory(mirror)) == ([], [])
    # retrained in place (another digest), one added, one removed from the source
    _adapter(root / "experts" / "RS", b"z" * 8, job_key="k2")
    _adapter(root / "router" / "stage-1-Med", b"r" * 8)
    import shutil

    shutil.rmtree(root / "experts" / "Med")
    send, gone = plan(inventory(root), inventory(mirror))
    assert (send, gone) == (["experts/RS", "router/stage-1-Med"], ["experts/Med"])
    for rel in send:
        materialise(folder_files(root / rel), mirror / rel)
    drop(mirror, gone)
    assert inventory(mirror) == inventory(root)
    assert (mirror / "experts" / "RS" / "adapter_model.safetensors").read_bytes() == b"z" * 8
    with pytest.raises(ValueError, match="not inside"):
        drop(mirror, ["../../run"])
