"""The real job on a GPU: ``clsvc run``'s path with ``ray.use_gpu=true`` trains in Ray Train workers on their GPU
and evaluates in an evaluator actor on the GPU, and gives what the CPU run gives (skipped without a GPU or Ray).

Run on the device by ``bench/device.sh real``. Both runs use float32 (``base.dtype=float32``, no autocast) and no
LoRA dropout (CUDA and CPU draw different random numbers), so they differ only by the devices' rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _predictions(out: Path) -> dict[str, str]:
    got = {}
    for f in sorted((out / "predictions").rglob("*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            got[f"{f.relative_to(out)}:{rec['question_id']}"] = rec["text"]
    return got


def test_a_two_task_stream_trains_and_evaluates_on_the_gpu_as_on_the_cpu(tmp_path, tiny_base, dcl_shards):
    pytest.importorskip("ray")
    from cl_service.config import load_run_cfg
    from cl_service.on_ray.stream import run

    common = [f"data.path={dcl_shards}", f"base.path={tiny_base}", "data.tasks=[RS,Med]",
              "methods=[mrlora,mrlora_knn,oracle,lora_ft,zero_shot]", "base.dtype=float32",
              "expert.lora.dropout=0", "router.lora.dropout=0", "expert.train.max_steps=8",
              "expert.train.batch_size=4", "router.train.max_steps=8", "router.samples_per_task=4",
              "expert.train.autocast=none", "router.train.autocast=none", "expert.train.lr=1e-2"]
    cpu = run(load_run_cfg(None, common + [f"out={tmp_path / 'cpu'}", "ray.num_workers=0"]), log=print)
    gpu = run(load_run_cfg(None, common + [f"out={tmp_path / 'gpu'}", "ray.num_workers=1", "ray.use_gpu=true",
                                           "ray.cpus_per_worker=2", "ray.gpus_per_worker=0.5", "eval.num_workers=1",
                                           "eval.num_gpus=0.5"]), log=print)
    # Trained on the GPU, in the worker (its train_log), and evaluated on the GPU (the stage records).
    logs = [json.loads(p.read_text()) for p in (tmp_path / "gpu" / "adapters").rglob("train_log.json")]
    assert logs and all(l["device"].startswith("cuda") for l in logs)
    assert all(l["tokens_per_s"] > 0 for l in logs)
    recs = [json.loads(p.read_text()) for p in (tmp_path / "gpu" / "stages").rglob("*.json")]
    assert recs and all(r["device"].startswith("cuda") for r in recs if any(v is not None for v in r["row"]))
    cpu_logs = [json.loads(p.read_text()) for p in (tmp_path / "cpu" / "adapters").rglob("train_log.json")]
    assert all(l["device"] == "cpu" for l in cpu_logs)
    # Same results within the devices' rounding: the losses of every job, then the answers and the matrices.
    by_job = {l["job"]: l["losses"] for l in cpu_logs}
    for l in logs:
        assert l["losses"] == pytest.approx(by_job[l["job"]], rel=2e-3, abs=2e-3), l["job"]
    a, b = _predictions(tmp_path / "cpu"), _predictions(tmp_path / "gpu")
    assert a.keys() == b.keys() and sum(a[k] == b[k] for k in a) >= 0.9 * len(a)
    one_item = 100.0 / 6 + 1e-6  # the fixture has 6 test items per task
    for name, m in cpu["methods"].items():
        for row_c, row_g in zip(m["matrix"], gpu["methods"][name]["matrix"]):
            assert all(abs(x - y) <= one_item for x, y in zip(row_c, row_g) if x == x), name
