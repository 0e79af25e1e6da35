"""A stage carries over the entries a method declares unchanged: the same rows, predictions and adapters as a full
evaluation, for a fraction of the items answered (evaluation cost as the stream grows)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cl_service.config import load_run_cfg
from cl_service.eval.stage import EvalSetup, StageEvaluator, evaluate_stage
from cl_service.methods import METHODS
from cl_service.methods.base import StageContext
from cl_service.run import LocalTrainer, run_stream

pytestmark = pytest.mark.timeout(240)
TASKS = ("RS", "Med", "AD")


@pytest.fixture(scope="module")
def carry_run(tmp_path_factory, tiny_base, dcl_shards):
    """oracle and zero_shot over three tasks (experts of one step): the run's driver evaluated with carrying."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("carry-run")
    cfg = load_run_cfg(None, [
        f"out={out}", f"data.path={dcl_shards}", f"base.path={tiny_base}", f"data.tasks=[{','.join(TASKS)}]",
        "methods=[oracle,zero_shot]", "expert.train.max_steps=1", "expert.train.batch_size=4",
        "expert.lora.rank=4", "eval.max_new_tokens=3", "ray.num_workers=0"])
    run_stream(cfg, LocalTrainer(), log=lambda *_: None)
    return EvalSetup(cfg, str(out.resolve()), str(tiny_base), str(dcl_shards), TASKS)


def _units(setup: EvalSetup, method: str, carry: bool) -> list:
    ev = StageEvaluator(setup, carry=carry)
    return [ev.evaluate(method, i) for i in range(len(TASKS))]


@pytest.mark.parametrize("method", ["oracle", "zero_shot"])
def test_carried_stages_equal_full_evaluation_and_answer_only_what_changed(carry_run, method):
    full, carried = _units(carry_run, method, carry=False), _units(carry_run, method, carry=True)
    n = {t: len(full[0].predictions[t]) for t in TASKS}
    for i, (f, c) in enumerate(zip(full, carried)):
        for key in ("row", "router_accuracy", "fallbacks", "adapters", "tasks", "task"):
            assert c.record[key] == f.record[key], (method, i, key)
        assert c.predictions == f.predictions and c.task_adapters == f.task_adapters
        assert f.record["items_answered"] == sum(n.values()) and f.record["carried"] == []
    # stage 0 answers every task; later stages only the new task (oracle) or nothing (zero_shot)
    assert carried[0].record["items_answered"] == sum(n.values())
    for i in (1, 2):
        new = [TASKS[i]] if method == "oracle" else []
        assert carried[i].record["items_answered"] == sum(n[t] for t in new)
        assert carried[i].record["carried"] == [t for t in TASKS if t not in new]
    if method == "oracle":  # expert j answers task j from stage j on: the record lists every expert read so far
        assert set(carried[2].record["adapters"]) == {f"adapters/experts/{t}" for t in TASKS}
        assert {p["model_id"] for p in carried[2].predictions["RS"]} == {"oracle@AD"}


def test_an_entry_whose_adapter_changed_is_answered_again(carry_run):
    ev = StageEvaluator(carry_run)
    r0 = ev.evaluate("oracle", 0)
    r1 = ev.evaluate("oracle", 1)
    assert r1.record["carried"] == ["RS", "AD"]
    stale = dataclasses.replace(r1, task_adapters={**r1.task_adapters, "RS": {"adapters/experts/RS": "0" * 64}})
    ctx = StageContext(2, list(TASKS), ev.descriptions, ev.out, carry_run.cfg, ev.engine, ev._extras["oracle"])
    again = evaluate_stage(METHODS.get("oracle")(), ctx, ev.tests, 0.0, stale)
    assert again.record["carried"] == ["Med"]  # RS answered again (its expert's digest differs), AD is new
    assert again.record["row"] == ev.evaluate("oracle", 2).record["row"]
    # a unit of another stage, or none, carries nothing
    assert evaluate_stage(METHODS.get("oracle")(), ctx, ev.tests, 0.0, r0).record["carried"] == []


def test_a_fresh_evaluator_handed_the_previous_unit_carries_it(carry_run):
    """What a Ray evaluator's driver does when its actors restart between stages: the new process gets the
    method's unit of the stage before and answers only the new task."""
    r0 = StageEvaluator(carry_run).evaluate("oracle", 0)
    fresh = StageEvaluator(carry_run)
    r1 = fresh.evaluate("oracle", 1, previous=r0)
    assert r1.record["carried"] == ["RS", "AD"] and r1.record["items_answered"] == len(fresh.tests["Med"])
    full = StageEvaluator(carry_run, carry=False).evaluate("oracle", 1, previous=r0)  # carry=False ignores it
    assert full.record["carried"] == [] and (full.record["row"], full.predictions) == (r1.record["row"], r1.predictions)


def test_methods_whose_answers_change_every_stage_declare_nothing_unchanged():
    carriers = {n for n in METHODS.names() if hasattr(METHODS.get(n), "unchanged")}
    assert carriers == {"oracle", "zero_shot"}
