"""`clsvc run` SIGKILLed with its whole process group mid-stage — during training, then during evaluation —
and run again: only the missing work runs, and the results are those of an uninterrupted run."""

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from cl_service.config import load_run_cfg
from cl_service.run import plan_stream

pytestmark = pytest.mark.timeout(420)
REPO = Path(__file__).resolve().parents[3]


def _overrides(out: Path, tiny_base: Path, dcl_shards: Path) -> list[str]:
    # training and evaluation in the command's own process (ray.num_workers=0); stage 2 trains 3 jobs in a row
    return [f"out={out}", f"data.path={dcl_shards}", f"base.path={tiny_base}", "data.tasks=[RS,Med]",
            "methods=[mrlora,lora_ft]", "expert.train.max_steps=12", "expert.train.batch_size=4",
            "expert.lora.rank=4", "router.train.max_steps=12", "router.samples_per_task=4", "router.lora.rank=4",
            "eval.max_new_tokens=3", "ray.num_workers=0"]


def _trained(lines: list[str]) -> list[str]:
    """Jobs trained, from the run's '[stage i/T task] trained N adapter(s) in S s: name Ss, ...' lines."""
    return sorted(item.rsplit(" ", 1)[0] for line in lines if "] trained " in line
                  for item in line.split(": ", 1)[1].split(", "))


def _adapters(out: Path) -> dict[str, tuple]:
    """Every adapter's file checksums (but its train log's, which holds times) and training losses."""
    got = {}
    for p in (out / "adapters").rglob("adapter.json"):
        files = {k: v for k, v in json.loads(p.read_text())["files"].items() if k != "train_log.json"}
        got[str(p.parent.relative_to(out))] = (files, json.loads((p.parent / "train_log.json").read_text())["losses"])
    return got


def _results(out: Path) -> dict:
    """What a run produced, but for the time it took: metrics (less router ms/request), every prediction file,
    every adapter."""
    metrics = json.loads((out / "metrics.json").read_text())
    for m in metrics["methods"].values():
        m.pop("router_ms_per_request", None)
    preds = {str(p.relative_to(out)): p.read_text() for p in sorted((out / "predictions").rglob("*.jsonl"))}
    return {"metrics": metrics, "predictions": preds, "adapters": _adapters(out)}


def test_a_run_killed_while_training_then_while_evaluating_resumes_to_the_same_results(spawn, tmp_path, tiny_base,
                                                                                     dcl_shards):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")

    def clsvc_run(out: Path):
        return spawn([sys.executable, "-m", "cl_service.cli", "run", *_overrides(out, tiny_base, dcl_shards)],
                     env=env, cwd=str(REPO))

    # The reference runs beside the interrupted ones (each command trains on one thread: one core each); its
    # results are compared at the end.
    ref = clsvc_run(tmp_path / "uninterrupted")
    out = tmp_path / "run"
    cfg = load_run_cfg(None, _overrides(out, tiny_base, dcl_shards))

    # 1. killed in stage 2's training: its first job (expert/Med) is published, the other two are not
    p = clsvc_run(out)
    p.wait_for(lambda: (out / "adapters" / "experts" / "Med" / "adapter.json").is_file(), timeout=300)
    p.signal(signal.SIGKILL, group=True)
    assert p.finish(timeout=30) == -signal.SIGKILL
    plan = plan_stream(cfg)
    assert plan[0]["train"] == [] and plan[0]["evaluate"] == []  # stage 1 is complete
    missing = sorted(plan[1]["train"])
    assert missing and "expert/Med" not in missing and set(plan[1]["evaluate"]) == {"mrlora", "lora_ft"}, plan

    # 2. the same command: it trains exactly the missing jobs; killed as stage 2's evaluation starts
    p = clsvc_run(out)
    p.wait_line("[stage 2/2 Med] trained ", timeout=300)
    p.signal(signal.SIGKILL, group=True)
    assert p.finish(timeout=30) == -signal.SIGKILL
    assert _trained(p.lines) == missing, p.output()[-3000:]
    assert not (out / "metrics.json").exists()
    plan = plan_stream(cfg)
    assert all(st["train"] == [] and st["copies"] == [] for st in plan) and plan[0]["evaluate"] == []
    to_evaluate = plan[1]["evaluate"]
    assert to_evaluate, plan  # killed before stage 2's evaluation was written
    kept = {p: p.stat().st_mtime_ns for p in (out / "stages").rglob("*.json")}

    # 3. the same command again: no training, only the missing evaluations, then the uninterrupted run's results
    p = clsvc_run(out)
    assert p.finish(timeout=300) == 0, p.output()[-3000:]
    assert _trained(p.lines) == []
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished evaluations were not redone
    redone = {p.parent.name for p in (out / "stages").rglob("*.json") if p not in kept}
    assert redone == set(to_evaluate)
    assert ref.finish(timeout=300) == 0, ref.output()[-3000:]
    assert _results(out) == _results(tmp_path / "uninterrupted")
    assert not [p for p in out.rglob(".*") if ".partial-" in p.name or ".tmp-" in p.name]  # no staging left over
