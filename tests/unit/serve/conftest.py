"""A tiny finished 2-task run (RS, Med: experts, the MLLM router and the prototype, knn and ridge routers), trained
once per session for the serving tests.

Tests that change the run (republish an adapter) work on a copy.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_base, dcl_shards):
    import torch

    from cl_service.config import load_run_cfg
    from cl_service.run import LocalTrainer, run_stream

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("tiny-run")
    cfg = load_run_cfg(None, [
        f"out={out}", f"data.path={dcl_shards}", f"base.path={tiny_base}", "data.tasks=[RS,Med]",
        "methods=[mrlora,mrlora_proto,mrlora_knn,mrlora_ridge]", "expert.train.max_steps=2",
        "expert.train.batch_size=4", "router.train.max_steps=2", "router.samples_per_task=4", "expert.lora.rank=4",
        "router.lora.rank=4", "eval.max_new_tokens=3", "ray.num_workers=0"])
    run_stream(cfg, LocalTrainer(), log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def tiny_engine(tiny_base):
    """The run's base in an :class:`Engine` (answers of 3 tokens, as the run evaluated)."""
    from cl_service.engine.engine import Engine

    engine = Engine(tiny_base)
    engine.max_new_tokens = 3
    return engine


@pytest.fixture(scope="session")
def offline(tiny_run):
    """``offline(task, method="mrlora")``: the tiny run's own predictions of ``method`` for ``task``'s test
    samples at its last stage, ``question_id -> record`` (text, metadata.expert, metadata.router_raw)."""
    import json

    def read(task: str, method: str = "mrlora", stage: str = "stage-1-Med") -> dict[str, dict]:
        lines = (tiny_run / "predictions" / method / stage / f"{task}.jsonl").read_text().splitlines()
        return {r["question_id"]: r for r in map(json.loads, lines)}

    return read
