"""A results folder names no path of the machine that ran it: ``config.resolved.json`` records the generated
dataset relative to the folder and a base under ``$CLSVC_HOME`` relative to the home, and reads back to paths
that open after the folder and the home have moved; a base that is not the run's is refused, not used."""

import json
import shutil

import pytest
import torch

from cl_service.config import load_run_cfg
from cl_service.data.shards import ShardDataset
from cl_service.resolved import RESOLVED, ResolvedError, portable_path, read_resolved, resolve_path
from cl_service.run import LocalTrainer, run_stream

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def moved(tmp_path_factory, tiny_base):
    """A zero-shot run on generated data with its base under ``$CLSVC_HOME``, then folder and home moved."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("resolved")
    home, out = root / "home", root / "runs" / "r"
    shutil.copytree(tiny_base, home / "models" / "b")
    mp = pytest.MonkeyPatch()
    mp.setenv("CLSVC_HOME", str(home))
    mp.chdir(root)  # the paths as a user writes them: relative to where the command runs
    try:
        run_stream(load_run_cfg(None, [
            "out=runs/r", "base.path=home/models/b", "data.train_per_task=2", "data.test_per_task=2",
            "data.tasks=[RS]", "methods=[zero_shot]", "eval.max_new_tokens=2", "ray.num_workers=0"]),
            LocalTrainer(), log=lambda s: None)
    finally:
        mp.undo()
    text = (out / RESOLVED).read_text()
    new = tmp_path_factory.mktemp("elsewhere")
    shutil.move(out, new / "r")
    shutil.move(home, new / "home")
    return {"text": text, "root": root, "run": new / "r", "home": new / "home"}


def test_the_run_records_its_base_and_data_without_a_path_of_the_machine(moved):
    resolved = json.loads(moved["text"])
    assert resolved["dataset"] == "data"
    assert resolved["base"] == "$CLSVC_HOME/models/b"
    assert str(moved["root"]) not in moved["text"]


def test_the_recorded_paths_open_after_the_folder_and_the_home_moved(moved, monkeypatch):
    monkeypatch.setenv("CLSVC_HOME", str(moved["home"]))
    resolved = read_resolved(moved["run"])
    assert resolved["base"] == str(moved["home"] / "models" / "b")
    assert ShardDataset(resolved["dataset"]).tasks[0] == "RS"
    assert resolved["dataset"] == str((moved["run"] / "data").resolve())


def test_another_base_at_the_recorded_place_is_refused(moved, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("CLSVC_HOME", str(home))
    with pytest.raises(ResolvedError, match="is not at"):  # no base there
        read_resolved(moved["run"])
    shutil.copytree(moved["home"] / "models" / "b", home / "models" / "b")
    assert read_resolved(moved["run"])["base"] == str(home / "models" / "b")  # a copy is the same base
    cfg = home / "models" / "b" / "config.json"
    cfg.write_text(cfg.read_text().replace("{", '{"rebuilt": 1, ', 1))
    with pytest.raises(ResolvedError, match="another base"):
        read_resolved(moved["run"])


def test_paths_outside_the_folder_and_the_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CLSVC_HOME", str(tmp_path / "home"))
    out = tmp_path / "runs" / "r"
    assert portable_path(tmp_path / "data" / "dcl", out, "data/dcl") == "../../data/dcl"
    assert portable_path(tmp_path / "data" / "dcl", out, str(tmp_path / "data" / "dcl")) == str(tmp_path / "data" / "dcl")
    assert portable_path("s3://bucket/dcl", out) == "s3://bucket/dcl"
    assert resolve_path("../../data/dcl", out) == str(tmp_path / "data" / "dcl")
    assert resolve_path("/abs/base", out) == "/abs/base"  # folders written before recorded absolute paths
