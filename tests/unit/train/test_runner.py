"""The job runner keeps the plain base between the jobs of one process: the next job trains exactly what it
would on a freshly loaded base."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from cl_service.adapters.lora import LoraCfg
from cl_service.train import runner
from cl_service.train.job import DataPart, TrainJob
from cl_service.train.loop import TrainCfg


def _job(tmp_path, base, data, task, name, **train):
    return TrainJob(name=f"expert/{task}", kind="expert", task=task, out_dir=str(tmp_path / name), base_path=str(base),
                    dataset=str(data), parts=(DataPart(task),), lora=LoraCfg(rank=4, alpha=8),
                    train=TrainCfg(lr=1e-2, max_steps=3, batch_size=4, **train), description=task)


def _weights(folder: str) -> dict[str, torch.Tensor]:
    return load_file(str(next(Path(folder).glob("*.safetensors"))))


def test_a_job_after_another_on_the_kept_base_trains_what_a_fresh_base_trains(tmp_path, tiny_base, dcl_shards):
    runner._BASE_CACHE.clear()
    first = _job(tmp_path, tiny_base, dcl_shards, "RS", "rs", activation_checkpointing=True)
    runner.run_train_job(first)
    kept = runner._BASE_CACHE[runner._base_key(first, torch.device("cpu"))][0]
    assert kept.peft is None and not any(p.requires_grad for p in kept.model.parameters())
    second = _job(tmp_path, tiny_base, dcl_shards, "Med", "med-kept")
    runner.run_train_job(second)
    log = json.loads((tmp_path / "med-kept" / "train_log.json").read_text())
    runner._BASE_CACHE.clear()
    fresh = second.replace(out_dir=str(tmp_path / "med-fresh"))
    runner.run_train_job(fresh)
    a, b = _weights(second.out_dir), _weights(fresh.out_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert log["losses"] == json.loads((tmp_path / "med-fresh" / "train_log.json").read_text())["losses"]
    assert log["device"] == "cpu" and log["tokens_per_s"] > 0 and len(log["step_seconds"]) == 3


def test_a_base_rebuilt_in_place_is_loaded_again(tmp_path, tiny_base, dcl_shards):
    runner._BASE_CACHE.clear()
    job = _job(tmp_path, tiny_base, dcl_shards, "RS", "rs")
    runner.run_train_job(job)
    kept = runner._BASE_CACHE[runner._base_key(job, torch.device("cpu"))][0]
    assert runner._acquire_base(job, torch.device("cpu")) is kept  # same folder: the kept base
    runner._release_base(job, torch.device("cpu"), kept, reusable=True)
    cfg = Path(tiny_base) / "config.json"
    cfg.write_text(cfg.read_text() + " ")  # same content, new file: the folder changed
    assert runner._acquire_base(job, torch.device("cpu")) is not kept
