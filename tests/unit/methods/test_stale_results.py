"""Nothing stale: a rerun of a results folder redoes exactly what its base, data and settings change, keeps the
rest, and refuses a folder computed on other data."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cl_service.config import load_run_cfg
from cl_service.data.origin import DataMismatch
from cl_service.data.shards import MANIFEST
from cl_service.digest import base_digest
from cl_service.run import LocalTrainer, plan_stream, prepare_dataset, run_stream

pytestmark = pytest.mark.timeout(300)

METHODS = ["oracle", "zero_shot", "mrlora_proto"]


def _cfg(out, base, data, extra=()):
    return load_run_cfg(None, [
        f"out={out}", f"data.path={data}", f"base.path={base}", "data.tasks=[RS,Med]", f"methods=[{','.join(METHODS)}]",
        "expert.train.max_steps=3", "expert.train.batch_size=4", "router.samples_per_task=4", "expert.lora.rank=4",
        "eval.max_new_tokens=3", "ray.num_workers=0", *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_base, dcl_shards):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("stale")
    base = root / "base"
    shutil.copytree(tiny_base, base)
    metrics = run_stream(_cfg(root / "out", base, dcl_shards), LocalTrainer(), log=lambda s: None)
    return {"out": root / "out", "base": base, "metrics": metrics}


def _copy(run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run["out"], out)
    return out


def _rerun(out, base, data, extra=()):
    logs: list[str] = []
    metrics = run_stream(_cfg(out, base, data, extra), LocalTrainer(), log=logs.append)
    return metrics, logs


def _trained(logs):
    return [line for line in logs if "trained" in line and "already" not in line]


def _records(out):
    """Stage records by path: a unit evaluated again writes another record (its timing at least)."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "stages").rglob("*.json"))}


def test_an_unchanged_rerun_reuses_every_adapter_and_evaluation(run, tmp_path, dcl_shards):
    out = _copy(run, tmp_path)
    before = _records(out)
    assert len(before) == 2 * len(METHODS)
    again, logs = _rerun(out, run["base"], dcl_shards)
    assert not _trained(logs) and not any("evaluated again" in line for line in logs), logs
    assert _records(out) == before
    assert json.dumps(again, sort_keys=True) == json.dumps(run["metrics"], sort_keys=True)
    # A record written before records held their inputs (a results folder of an earlier version) is not trusted.
    path = out / "stages" / "zero_shot" / "stage-1-Med.json"
    rec = json.loads(path.read_text())
    del rec["inputs"]
    path.write_text(json.dumps(rec))
    again, logs = _rerun(out, run["base"], dcl_shards)
    assert not _trained(logs) and any("zero_shot (no inputs recorded)" in line for line in logs), logs
    after = _records(out)
    assert [k for k in before if after[k] != before[k]] == ["stages/zero_shot/stage-1-Med.json"]
    assert json.loads(after["stages/zero_shot/stage-1-Med.json"])["row"] == rec["row"]


def test_changed_eval_settings_evaluate_again_without_training(run, tmp_path, dcl_shards):
    out = _copy(run, tmp_path)
    before = _records(out)
    _, logs = _rerun(out, run["base"], dcl_shards, ["eval.max_new_tokens=2", "data.test_limit=4"])
    assert not _trained(logs), logs
    after = _records(out)
    assert all(after[k] != before[k] for k in before)  # every unit again
    rec = json.loads(after["stages/oracle/stage-1-Med.json"])
    assert rec["inputs"]["max_new_tokens"] == 2 and rec["inputs"]["test_limit"] == 4
    assert any("oracle (test_limit None -> 4, max_new_tokens 3 -> 2)" in line for line in logs), logs
    preds = (out / "predictions" / "zero_shot" / "stage-0-RS" / "RS.jsonl").read_text().splitlines()
    assert len(preds) == 4  # the predictions follow the new test choice too
    # A feature router's setting (it is fit during evaluation): only the method that fits one evaluates again.
    _, logs = _rerun(out, run["base"], dcl_shards, ["eval.max_new_tokens=2", "data.test_limit=4",
                                                   "router.samples_per_task=2"])
    assert not _trained(logs), logs
    again = _records(out)
    assert {k for k in after if again[k] != after[k]} == {k for k in after if k.startswith("stages/mrlora_proto/")}


def test_a_base_rebuilt_in_place_retrains_and_evaluates_zero_shot_again(run, tmp_path, dcl_shards):
    out = _copy(run, tmp_path)
    base = tmp_path / "base"
    shutil.copytree(run["base"], base)
    _, logs = _rerun(out, base, dcl_shards)  # the same bytes at another path: the same base
    assert not _trained(logs) and not any("evaluated again" in line for line in logs), logs
    before = _records(out)
    old_digest = base_digest(base)
    tensors = load_file(str(base / "model.safetensors"))  # rebuilt: other weights, same path
    for name in tensors:
        tensors[name] = tensors[name] * 1.5
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    plan = plan_stream(_cfg(out, base, dcl_shards))
    assert [p["train"] for p in plan] == [["expert/RS"], ["expert/Med"]] and not any(p["trained"] for p in plan)
    assert all(sorted(p["evaluate"]) == sorted(METHODS) for p in plan)
    _, logs = _rerun(out, base, dcl_shards)
    trained = _trained(logs)
    assert len(trained) == 2 and "expert/RS" in trained[0] and "expert/Med" in trained[1], logs
    after = _records(out)
    assert all(after[k] != before[k] for k in before)
    zs = json.loads(after["stages/zero_shot/stage-0-RS.json"])
    assert zs["inputs"]["base"] == base_digest(base) != old_digest
    assert any(f"zero_shot (base {old_digest} -> {base_digest(base)})" in line for line in logs), logs
    resolved = json.loads((out / "config.resolved.json").read_text())
    assert resolved["base_digest"] == base_digest(base)


def test_a_folder_of_other_data_is_refused_naming_what_differs(run, tmp_path, dcl_shards):
    out = tmp_path / "gen"
    small = [f"out={out}", "data.train_per_task=2", "data.test_per_task=1"]
    path = prepare_dataset(load_run_cfg(None, small), out, log=lambda s: None)
    manifest = (path / MANIFEST).read_bytes()
    assert prepare_dataset(load_run_cfg(None, small), out, log=lambda s: None) == path
    assert (path / MANIFEST).read_bytes() == manifest  # the same parameters: reused, not generated again
    other = load_run_cfg(None, [*small, "data.benchmark=acl-mini", "data.train_per_task=3", "seed=1"])
    with pytest.raises(DataMismatch) as e:
        prepare_dataset(other, out, log=lambda s: None)
    msg = str(e.value)
    assert "data.benchmark 'dcl-mini' in the folder, 'acl-mini' now" in msg, msg
    assert "data.train_per_task 2 in the folder, 3 now" in msg and "seed 0 in the folder, 1 now" in msg
    assert "test_per_task" not in msg and (path / MANIFEST).read_bytes() == manifest
    # A folder computed on a dataset it read: another dataset (other rows or tasks) is refused, so is generated data.
    folder = _copy(run, tmp_path)
    changed = tmp_path / "ds2"
    shutil.copytree(dcl_shards, changed)
    m = json.loads((changed / MANIFEST).read_text())
    m["tasks"][0]["description"] += " (edited)"
    (changed / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DataMismatch, match="dataset manifest digest"):
        run_stream(_cfg(folder, run["base"], changed), LocalTrainer(), log=lambda s: None)
    with pytest.raises(DataMismatch, match="in the folder, unset now"):
        run_stream(load_run_cfg(None, [f"out={folder}", "methods=[zero_shot]", "ray.num_workers=0"]), LocalTrainer(),
                   log=lambda s: None)
    assert not (folder / "data").exists()  # refused before generating anything
