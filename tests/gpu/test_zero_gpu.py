"""DeepSpeed ZeRO-2 through the product's job runner on a GPU (``ray.strategy=deepspeed`` calls the same
:func:`cl_service.train.runner.run_train_job` in every Ray Train worker): it trains on ``cuda`` with the GPU
defaults, and a run resumed from a checkpoint (weights, state, this rank's optimizer partition and RNG) ends
where the uninterrupted run ends. Skipped without a GPU or DeepSpeed."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_zero2_job_on_the_gpu_resumes_where_it_would_have_been(tmp_path, tiny_base, dcl_shards):
    pytest.importorskip("deepspeed")
    import torch.distributed as dist

    from cl_service.adapters.lora import LoraCfg
    from cl_service.train import runner
    from cl_service.train.job import DataPart, TrainJob
    from cl_service.train.loop import TrainCfg, resolve_train_cfg

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29581", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    train = resolve_train_cfg(TrainCfg(lr=1e-2, max_steps=4, batch_size=4), gpu=True)
    job = TrainJob(name="expert/RS", kind="expert", task="RS", out_dir=str(tmp_path / "ref"), base_path=str(tiny_base),
                   dataset=str(dcl_shards), parts=(DataPart("RS"),), lora=LoraCfg(rank=4, alpha=8), train=train,
                   description="rs", base_dtype="bfloat16")
    ckpt = tempfile.mkdtemp(dir=tmp_path)
    ref = runner.run_train_job(job, strategy="deepspeed", device="cuda", checkpoint_every=2,
                               on_checkpoint=lambda step, loss, save: save(ckpt))
    log = json.loads((tmp_path / "ref" / "train_log.json").read_text())
    assert log["device"].startswith("cuda") and log["dtype"] == "bfloat16" and log["train"]["autocast"] == "bfloat16"
    resume = runner.load_resume(ckpt, 0)
    assert "zero_optimizer" in resume and resume["state"].step == 2
    runner._BASE_CACHE.clear()
    again = runner.run_train_job(job.replace(out_dir=str(tmp_path / "resumed")), strategy="deepspeed", device="cuda",
                                 resume=resume)
    assert again.losses[:2] == ref.losses[:2]
    assert again.losses == pytest.approx(ref.losses, rel=2e-3, abs=2e-3)
