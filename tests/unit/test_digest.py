"""Content digests of a base folder and of a dataset: the same bytes give the same digest wherever they are,
other bytes another one; a base's files are hashed once."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cl_service import digest as digest_mod
from cl_service.data.shards import MANIFEST, ShardWriter, sha256_file
from cl_service.digest import base_digest, dataset_digest, digest_cache

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CLSVC_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(digest_mod, "_MEMO", {})  # as in a fresh process
    return tmp_path / "home"


def rewrite_weights(folder) -> None:
    """Other weights in the same file: what `clsvc base build` does to a base it rebuilds in place."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_a_base_is_named_by_its_content(tmp_path, tiny_base):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_base, a)
    shutil.copytree(tiny_base, b)
    files = sorted(p.name for p in a.iterdir())
    da = base_digest(a)
    assert base_digest(b) == da  # a copy elsewhere: the same base
    assert sorted(p.name for p in a.iterdir()) == files  # the base's folder is only read
    cache = json.loads(digest_cache(a).read_text())["files"]
    assert cache["model.safetensors"][3] == sha256_file(a / "model.safetensors")
    (b / "base.json").write_text('{"built": "another day"}')  # the store's build record is not the base
    assert base_digest(b) == da
    rewrite_weights(b)
    db = base_digest(b)
    assert db != da and base_digest(a) == da
    cached = json.loads(digest_cache(b).read_text())["files"]
    assert cached["model.safetensors"][3] == sha256_file(b / "model.safetensors")
    (b / "tokenizer_config.json").write_text((b / "tokenizer_config.json").read_text() + "\n")
    assert base_digest(b) not in (da, db)  # any file the loader reads counts


def test_a_base_is_hashed_once_then_its_files_are_only_stat(tmp_path, tiny_base):
    a = tmp_path / "a"
    shutil.copytree(tiny_base, a)
    first = base_digest(a)
    # A later process trusts the cache while the files' size, mtime and ctime are unchanged: with a wrong
    # checksum planted in it, it gives another digest (it did not read the weights again) ...
    entries = json.loads(digest_cache(a).read_text())
    entries["files"]["model.safetensors"][3] = "0" * 64
    digest_cache(a).write_text(json.dumps(entries))
    digest_mod._MEMO.clear()
    assert base_digest(a) != first
    # ... and a rewritten file (new mtime/ctime) is read again, whatever the cache says.
    (a / "model.safetensors").write_bytes((a / "model.safetensors").read_bytes())
    assert base_digest(a) == first


def test_without_a_writable_home_the_base_is_hashed_again(tmp_path, tiny_base, home):
    home.write_text("not a folder")  # $CLSVC_HOME cannot hold the cache
    d = base_digest(tiny_base)
    digest_mod._MEMO.clear()
    assert base_digest(tiny_base) == d and not digest_cache(tiny_base).exists()


def test_a_missing_base_has_no_digest(tmp_path):
    with pytest.raises(FileNotFoundError):
        base_digest(tmp_path / "nothing")


def _write(out, seed, n=2):
    from cl_service.data.synth import BENCHMARKS

    spec = BENCHMARKS.get("dcl-mini")
    tasks = [{"name": t.name, "scorer": t.scorer, "description": t.description} for t in spec.tasks[:2]]
    names = {t["name"] for t in tasks}
    with ShardWriter(out, tasks, info={"benchmark": spec.name, "seed": seed}, overwrite=True) as w:
        w.add_all(s for s in spec.generate("train", n, seed) if s.task in names)
        w.add_all(s for s in spec.generate("test", n, seed) if s.task in names)


def test_a_dataset_is_named_by_its_rows_not_when_or_where_it_was_written(tmp_path):
    _write(tmp_path / "a", 0)
    _write(tmp_path / "b", 0)
    m = json.loads((tmp_path / "b" / MANIFEST).read_text())
    m.update(created="1999-01-01T00:00:00Z", cl_service_version="0.0.1", ingest_seconds=1.5)
    (tmp_path / "b" / MANIFEST).write_text(json.dumps(m))
    assert dataset_digest(tmp_path / "a") == dataset_digest(tmp_path / "b")
    _write(tmp_path / "c", 1)
    _write(tmp_path / "d", 0, n=3)
    assert len({dataset_digest(tmp_path / x) for x in "acd"}) == 3
    # a task's scorer or description is part of the dataset too
    m["tasks"][0]["scorer"] = "exact"
    (tmp_path / "b" / MANIFEST).write_text(json.dumps(m))
    assert dataset_digest(tmp_path / "b") != dataset_digest(tmp_path / "a")
