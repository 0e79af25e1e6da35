"""The run's seed seeds dropout too (with the data order and the adapter's initialisation): the seeds of a study or
a sweep must not share dropout masks. Seed 0 trains exactly as before (its job keys are unchanged)."""

import torch

from cl_service.adapters.lora import LoraCfg
from cl_service.train.job import DataPart, TrainJob
from cl_service.train.loop import TrainCfg
from cl_service.train.runner import run_train_job


def _job(out, tiny_base, dcl_shards, seed):
    # one step over all 12 RS samples in one batch: the same tensor shapes (so the same number of dropout draws)
    # whatever the data order
    return TrainJob(name="expert/RS", kind="expert", task="RS", out_dir=str(out), base_path=str(tiny_base),
                    dataset=str(dcl_shards), parts=(DataPart("RS"),), lora=LoraCfg(rank=2, alpha=4, dropout=0.1),
                    train=TrainCfg(max_steps=1, batch_size=12), description="RS", seed=seed)


def test_dropout_rng_follows_the_run_seed(tmp_path, tiny_base, dcl_shards):
    torch.set_num_threads(1)
    rng = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        rng[name] = run_train_job(_job(tmp_path / name, tiny_base, dcl_shards, seed)).rng
    assert torch.equal(rng["a"], rng["b"])
    # before, dropout was seeded by train.seed alone: seed 1 drew the same masks as seed 0
    assert not torch.equal(rng["a"], rng["c"])


def test_job_keys_mark_the_seeded_dropout_only_off_seed_0(tmp_path, tiny_base, dcl_shards):
    j0 = _job(tmp_path / "a", tiny_base, dcl_shards, 0)
    j1 = _job(tmp_path / "a", tiny_base, dcl_shards, 1)
    assert "dropout_seed" not in j0._fields() and j1._fields()["dropout_seed"] == "train.seed+seed"
