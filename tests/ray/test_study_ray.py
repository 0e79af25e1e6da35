"""A study on Ray: cells as Ray tasks, each expert trained once per seed for every order, a killed study resumed
cell by cell (finished cells are not run again), study.json and report.md over the cells."""

import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]


def test_killed_study_resumes_cell_by_cell_and_trains_each_expert_once_per_seed(ray_local, spawn, tmp_path,
                                                                                 tiny_base, dcl_shards):
    from cl_service.on_ray.study import run_study
    from cl_service.study.plan import read_trainings

    cfg = tmp_path / "cfg.yaml"
    # 2 tasks, 2 orders x 2 seeds; training in each cell's own process (Ray Train inside a cell is what
    # `clsvc run` does, tested elsewhere): each cell reserves 1 of the 2 CPUs.
    cfg.write_text(yaml.safe_dump({
        "methods": ["mrlora", "oracle"], "data": {"path": str(dcl_shards), "tasks": ["RS", "Med"], "test_limit": 4},
        "base": {"path": str(tiny_base)},
        "expert": {"lora": {"rank": 2, "alpha": 4}, "train": {"max_steps": 2, "batch_size": 4}},
        "router": {"samples_per_task": 3, "lora": {"rank": 2, "alpha": 4}, "train": {"max_steps": 2, "batch_size": 4}},
        "eval": {"max_new_tokens": 3}, "ray": {"num_workers": 0}}))
    out = tmp_path / "study"
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address, PYTHONPATH=str(REPO),
               TOKENIZERS_PARALLELISM="false")
    p = spawn([sys.executable, "-m", "cl_service.cli", "study", "--config", str(cfg), "--orders", "2", "--seeds", "2",
               "--out", str(out), "--max-concurrent", "1"], env=env, cwd=str(REPO))
    p.wait_line("[study] cell o0-s0 done", timeout=300)
    p.wait_line("[cell o0-s1] [stage 1/2 RS] accuracy", timeout=200)  # the second cell is half done: kill it
    p.signal(signal.SIGKILL, group=True)
    p.finish(timeout=60)
    first = out / "cells" / "o0-s0" / "cell.json"
    assert first.is_file() and not (out / "cells" / "o0-s1" / "cell.json").exists(), p.output()[-3000:]
    before = first.stat().st_mtime_ns

    logs: list[str] = []
    result = run_study(str(cfg), None, None, "2", "2", str(out), log=logs.append)  # the same study again, here
    assert result["exit"] == 0, logs[-20:]
    assert not any("cell o0-s0 started" in line for line in logs) and first.stat().st_mtime_ns == before
    assert any("cell o0-s1 started" in line for line in logs)
    assert any("2 at once" in line for line in logs)  # 2 CPUs / 1 per cell

    # each expert once per seed, whatever the order; one router per cell (its pool's order differs)
    trained = read_trainings(out)
    experts = Counter((t["job"], t["seed"]) for t in trained if t["job"].startswith("expert/"))
    assert experts == {("expert/RS", 0): 1, ("expert/Med", 0): 1, ("expert/RS", 1): 1, ("expert/Med", 1): 1}
    assert sorted(t["cell"] for t in trained if t["job"].startswith("router/")) == ["o0-s0", "o0-s1", "o1-s0", "o1-s1"]
    jobs = result["jobs"]
    assert (jobs["jobs"], jobs["trainings"], jobs["shared"]) == (12, 8, 4) and result["trained"] == 8
    # the resumed cell kept its first stage (expert RS of seed 1 trained once, by the killed launch)
    assert any(t["cell"] == "o0-s1" and t["job"] == "expert/RS" for t in trained)

    study = json.loads((out / "study.json").read_text())
    assert [c["id"] for c in study["cells"]] == ["o0-s0", "o0-s1", "o1-s0", "o1-s1"]
    assert [c["order"] for c in study["cells"]] == [["RS", "Med"]] * 2 + [["Med", "RS"]] * 2
    mft = study["methods"]["oracle"]["MFT"]
    assert mft["n"] == 4 and mft["method"].startswith("t interval over 4 cells") and mft["low"] <= mft["mean"] <= mft["high"]
    for c in study["cells"]:
        m = json.loads((out / c["run"] / "metrics.json").read_text())
        assert m["tasks"] == c["order"] and mft["values"][c["id"]] == pytest.approx(m["methods"]["oracle"]["MFT"])
        assert "## Routing confusion per stage" in (out / c["run"] / "report.md").read_text()
    comp = next(x for x in study["comparisons"] if x["metric"] == "MFT")
    assert (comp["a"], comp["b"]) == ("mrlora", "oracle") and 0 < comp["p_value"] <= 1 and comp["units"] == 4 * 2 * 4
    assert str(tmp_path) not in (out / "study.json").read_text() + (out / "report.md").read_text()
