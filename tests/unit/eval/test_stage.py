"""The (method, stage) evaluation unit: what it computes, what the driver writes, what a process keeps."""

from __future__ import annotations

import json

import torch

from cl_service.config import load_run_cfg
from cl_service.eval.stage import (EvalSetup, LocalEvaluator, StageEvaluator, load_stage_record, stage_record_path,
                                   write_stage)


def _setup(out, tiny_base, dcl_shards) -> EvalSetup:
    cfg = load_run_cfg(None, [f"out={out}", f"data.path={dcl_shards}", f"base.path={tiny_base}",
                              "data.tasks=[RS,Med]", "methods=[zero_shot]", "eval.max_new_tokens=3"])
    return EvalSetup(cfg, str(out), str(tiny_base), str(dcl_shards), ("RS", "Med"))


def test_unit_answers_every_task_and_the_process_keeps_its_answers(tmp_path, tiny_base, dcl_shards):
    from cl_service.engine import Engine
    from cl_service.eval.stage import score

    torch.set_num_threads(1)
    setup = _setup(tmp_path, tiny_base, dcl_shards)
    ev = StageEvaluator(setup)
    r0 = ev.evaluate("zero_shot", 0, train_s=1.5)
    rec = r0.record
    assert (rec["method"], rec["stage"], rec["task"], rec["tasks"], rec["train_s"]) == \
        ("zero_shot", 0, "RS", ["RS", "Med"], 1.5)
    assert rec["adapters"] == {} and rec["router_accuracy"] == {}
    fresh = Engine(tiny_base, setup.cfg)  # no memo: every answer computed afresh
    for j, t in enumerate(setup.tasks):
        tests = ev.tests[t]
        assert [p["question_id"] for p in r0.predictions[t]] == [s.id for s in tests]
        texts = fresh.answer(tests, None)
        assert [p["text"] for p in r0.predictions[t]] == texts
        assert [p["model_id"] for p in r0.predictions[t]] == ["zero_shot@RS"] * len(tests)
        assert rec["row"][j] == score(tests, [type("A", (), {"text": x})() for x in texts])
    memo = dict(ev.engine.memo)
    r1 = ev.evaluate("zero_shot", 1)  # stage 2 asks the base the same questions: all from the memo
    assert ev.engine.memo == memo and r1.record["row"] == rec["row"] and r1.record["task"] == "Med"
    assert [p["text"] for p in r1.predictions["Med"]] == [p["text"] for p in r0.predictions["Med"]]


def test_driver_writes_predictions_then_a_record_that_resumes(tmp_path, tiny_base, dcl_shards):
    setup = _setup(tmp_path, tiny_base, dcl_shards)
    result = StageEvaluator(setup).evaluate("zero_shot", 0)
    write_stage(tmp_path, result)
    for t in setup.tasks:
        lines = (tmp_path / "predictions" / "zero_shot" / "stage-0-RS" / f"{t}.jsonl").read_text().splitlines()
        assert [json.loads(x) for x in lines] == result.predictions[t]
    path = stage_record_path(tmp_path, "zero_shot", 0, "RS")
    assert load_stage_record(path, tmp_path, ["RS", "Med"]) == result.record
    assert load_stage_record(path, tmp_path, ["RS", "Med", "AD"]) is None  # a longer stream re-evaluates


def test_local_evaluator_loads_no_base_without_units(tmp_path, tiny_base, dcl_shards):
    def boom(*a, **k):
        raise AssertionError("no unit to evaluate: no engine")

    ev = LocalEvaluator(engine_factory=boom)
    ev.start(_setup(tmp_path, tiny_base, dcl_shards))
    assert list(ev.evaluate(0, [], 0.0)) == []
    ev.close()


def test_folders_a_unit_produces_come_back_with_it_and_the_driver_writes_them(tmp_path):
    """A feature router fit during a unit is returned (path relative to the run folder), not written by the
    evaluator, which may run on another node; :func:`write_stage` writes it, atomically."""
    import pytest

    from cl_service.eval.stage import evaluate_stage
    from cl_service.methods.base import Answer, StageContext

    class _Engine:
        mllm = type("M", (), {"device": "cpu"})()

        def reset_used(self):
            pass

        def used_adapters(self):
            return []

    class _Method:
        name, routed = "fake", False

        def evaluates(self, ctx):
            return True

        def predict(self, ctx, samples):
            ctx.extra["emit_folder"](ctx.run_dir / "routers" / "knn" / "stage-0-RS", {"router.json": b"{}"})
            return [Answer("x") for _ in samples]

    out = (tmp_path / "run").resolve()
    ctx = StageContext(0, ["RS"], {"RS": ""}, out, None, _Engine(), {})
    result = evaluate_stage(_Method(), ctx, {"RS": []}, 0.0)
    assert result.folders == {"routers/knn/stage-0-RS": {"router.json": b"{}"}}
    assert not (out / "routers").exists() and "emit_folder" not in ctx.extra
    write_stage(out, result)
    assert (out / "routers" / "knn" / "stage-0-RS" / "router.json").read_bytes() == b"{}"
    assert stage_record_path(out, "fake", 0, "RS").is_file()

    class _Outside(_Method):
        def predict(self, ctx, samples):
            ctx.extra["emit_folder"](tmp_path / "elsewhere", {"a": b""})

    with pytest.raises(ValueError, match="outside the run folder"):
        evaluate_stage(_Outside(), ctx, {"RS": []}, 0.0)
