"""A sweep interrupted by SIGTERM and then by SIGINT (a `clsvc sweep` process on the session's cluster), then
rerun: only the scheduler's own decisions are recorded as early stops, the interrupted command exits 128 + the
signal, and the rerun finishes the interrupted trials."""

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.long, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[2]


def _states(out: Path) -> dict[str, dict]:
    recs = {}
    for d in (out / "trials").iterdir():
        rec = json.loads((d / "trial.json").read_text()) if (d / "trial.json").is_file() else {"state": "pending"}
        recs[d.name] = rec
    return recs


def _asha_stops(lines: list[str]) -> set[str]:
    return {line.split("ASHA stops trial ")[1].split()[0] for line in lines if "ASHA stops trial " in line}


def test_interrupted_sweep_records_no_early_stop_and_a_rerun_finishes_it(ray_local, spawn, tmp_path, tiny_base,
                                                                         dcl_shards):
    from cl_service.on_ray.tune import run_sweep, sweep_exit_code

    cfg = tmp_path / "cfg.yaml"
    # 3 stages, training in the trial's own process (the Tune layer is what is tested here). An interrupted Tune
    # run lets each running trial go on to its next report, then stops it: a trial in stage 2 when the signal
    # comes is cut short after stage 2.
    cfg.write_text(yaml.safe_dump({
        "methods": ["mrlora"], "data": {"path": str(dcl_shards), "tasks": ["RS", "Med", "AD"], "test_limit": 4},
        "base": {"path": str(tiny_base)},
        "expert": {"lora": {"rank": 2, "alpha": 4}, "train": {"max_steps": 5, "batch_size": 4}},
        "router": {"lora": {"rank": 2, "alpha": 4}, "train": {"max_steps": 20, "batch_size": 4}},
        "eval": {"max_new_tokens": 3}, "ray": {"num_workers": 0}}))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"space": {"router.samples_per_task": [2, 3]},
                                     "sweep": {"asha": {"grace_period": 1, "reduction_factor": 2}}}))
    out = tmp_path / "sweep"
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address, PYTHONPATH=str(REPO),
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "cl_service.cli", "sweep", "--config", str(cfg), "--space", str(space),
           "--out", str(out)]
    stopped_by_asha: set[str] = set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        p = spawn(cmd, env=env, cwd=str(REPO))
        p.wait_line(" stage 1/3 RS:", timeout=150)  # Tune has a trial's first stage: the trial is in stage 2
        p.signal(sig)
        rc = p.finish(timeout=120)
        assert rc == 128 + sig, p.output()[-3000:]
        assert f"{sig.name}: stopping the running trials" in p.output()
        stopped_by_asha |= _asha_stops(p.lines)
        recs = _states(out)
        # nothing is recorded as stopped but what ASHA itself stopped; the cut-short trials say so
        assert {t for t, r in recs.items() if r["state"] == "stopped"} == stopped_by_asha, (recs, p.output()[-3000:])
        cut = {t for t, r in recs.items() if r["state"] == "interrupted"}
        # (a trial cut short by the first signal and not started again before the second keeps its first reason)
        assert all(recs[t]["reason"] in ("interrupted by SIGTERM", f"interrupted by {sig.name}")
                   and 1 <= recs[t]["stages"] < 3 for t in cut), (
            sig.name, recs, p.output()[-3000:])
        if sig == signal.SIGTERM:  # the first trial to report stage 1 (ASHA continues the first one in a rung)
            assert cut, (recs, p.output()[-3000:])

    logs: list[str] = []
    result = run_sweep(cfg, space, out, log=logs.append)  # the same sweep again, in this process
    unfinished = {t for t, r in recs.items() if r["state"] not in ("done", "stopped")}
    assert any(f"{2 - len(unfinished)} already done, {len(unfinished)} to run" in line for line in logs), logs
    assert sweep_exit_code(result) == 0 and result["interrupted"] is None
    final = _states(out)
    assert {t for t, r in final.items() if r["state"] == "stopped"} == stopped_by_asha | _asha_stops(logs)
    assert all(final[t]["state"] in ("done", "stopped") for t in final), final
    for t in unfinished - _asha_stops(logs):  # finished by the rerun, every stage
        assert final[t]["state"] == "done" and final[t]["stages"] == 3
