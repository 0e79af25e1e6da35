"""A 2-trial Ray Tune sweep on a tiny 2-task stream: Ray Train workers inside each trial, ASHA, shared experts,
resume (a second launch with the same --out runs nothing)."""

import json

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def test_two_trial_sweep_with_ray_train_inside_tune_then_resume(ray_local, tmp_path, tiny_base, dcl_shards):
    from cl_service.adapters.registry import read_adapter
    from cl_service.on_ray.tune import run_sweep
    from cl_service.tracking.backends import read_tensorboard_scalars

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "methods": ["mrlora"], "data": {"path": str(dcl_shards), "tasks": ["RS", "Med"], "test_limit": 4},
        "base": {"path": str(tiny_base)},
        "expert": {"lora": {"rank": 2, "alpha": 4}, "train": {"max_steps": 2, "batch_size": 4}},
        "router": {"lora": {"rank": 2, "alpha": 4}, "train": {"max_steps": 2, "batch_size": 4}},
        "eval": {"max_new_tokens": 3}, "ray": {"num_workers": 1, "cpus_per_worker": 1, "stall_timeout_s": 300}}))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"space": {"router.samples_per_task": [2, 3]},
                                     "sweep": {"asha": {"grace_period": 1, "reduction_factor": 2},
                                               "time_budget_s": 500}}))
    out = tmp_path / "sweep"
    logs: list[str] = []
    result = run_sweep(cfg, space, out, log=logs.append)
    trials = result["trials"]
    assert len(trials) == 2 and {t["router.samples_per_task"] for t in trials} == {2, 3}
    assert {t["state"] for t in trials} <= {"done", "stopped (ASHA)"} and trials[0]["state"] == "done"
    assert any("2 concurrent trial(s)" in line for line in logs)  # 2 CPUs / 1 worker of 1 CPU
    assert any("stage 1/2 RS" in line for line in logs)
    # trained in Ray Train workers (world size 1) into the shared cache: 2 experts + 1 router per trial reaching
    # stage 2 — never an expert twice
    cache = [read_adapter(p) for p in (out / "cache").iterdir() if not p.name.startswith(".")]
    assert sorted(m["id"] for m in cache if m["kind"] == "expert") == ["expert:Med", "expert:RS"]
    n_routers = sum(1 for t in trials if t["stages"] == 2)
    assert sum(1 for m in cache if m["kind"] == "router") == n_routers
    done = [t for t in trials if t["state"] == "done"]
    for t in done:
        assert 0 <= t["MFT"] <= 100 and 0 <= t["router_acc"] <= 100
        log = json.loads((out / "trials" / t["id"] / "seed-0" / "adapters" / "experts" / "RS" / "train_log.json").read_text())
        assert log["world_size"] == 1 and log["steps"] == 2
        # tracked by the trial's driver from the train_log the Ray Train worker wrote (TensorBoard, one run per trial)
        got = read_tensorboard_scalars(out / "tracking" / f"trial-{t['id']}")
        assert [v for _, v in got["train/expert/RS/loss"]] == pytest.approx(log["losses"], rel=1e-6)
        assert [s for s, _ in got["eval/mrlora/acc_seen"]] == [1, 2]
    assert (out / "report.md").is_file() and (out / "sweep.csv").is_file()
    before = {t["id"]: (out / "trials" / t["id"] / "trial.json").stat().st_mtime_ns for t in trials}
    logs.clear()
    again = run_sweep(cfg, space, out, log=logs.append)  # resume: every trial has its done-record
    assert any("2 already done, 0 to run" in line for line in logs)
    assert [t["state"] for t in again["trials"]] == [t["state"] for t in trials]
    assert {t["id"]: (out / "trials" / t["id"] / "trial.json").stat().st_mtime_ns for t in trials} == before


def test_max_concurrent_trials_come_from_the_resources():
    from cl_service.config import load_run_cfg
    from cl_service.on_ray.tune import concurrency
    from cl_service.sweep.space import parse_space

    space = parse_space({"space": {"expert.lora.rank": [2, 4]}})
    one = load_run_cfg(None, ["ray.num_workers=1", "ray.cpus_per_worker=1"])
    assert concurrency(one, space, {"CPU": 2.0})[0] == 2
    assert concurrency(load_run_cfg(None, ["ray.num_workers=2", "ray.cpus_per_worker=1"]), space, {"CPU": 8.0})[0] == 4
    gpu = load_run_cfg(None, ["ray.num_workers=2", "ray.use_gpu=true", "ray.cpus_per_worker=1"])
    assert concurrency(gpu, space, {"CPU": 64.0, "GPU": 8.0})[0] == 4  # GPUs bound it
    assert concurrency(one, space, {"CPU": 0.5})[0] == 1  # never zero
    capped = parse_space({"space": {"expert.lora.rank": [2, 4]}, "sweep": {"max_concurrent_trials": 1}})
    assert concurrency(one, capped, {"CPU": 16.0})[0] == 1
    inproc = load_run_cfg(None, ["ray.num_workers=0"])
    n, per = concurrency(inproc, space, {"CPU": 2.0})
    assert n == 2 and per == {"cpu": 1.0}  # training runs in the trial process: it reserves a CPU
