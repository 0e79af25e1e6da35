"""Job keys name a finished adapter across code versions: a results folder from before a TrainJob field was
added must still recognise its adapters (or every resumed/extended run retrains everything)."""

import hashlib
import json

from cl_service._cfgload import to_dict
from cl_service.adapters.lora import LoraCfg
from cl_service.train import job as job_mod
from cl_service.train.job import DataPart, TrainJob
from cl_service.train.loop import TrainCfg


def _job(**kw):
    return TrainJob(name="expert/RS", kind="expert", task="RS", out_dir="/x/e", base_path="/b", dataset="/d",
                    parts=(DataPart("RS"),), lora=LoraCfg(rank=4), train=TrainCfg(max_steps=3), **kw)


def test_a_job_that_does_not_use_moelora_keeps_the_key_it_had_before_the_field_existed(monkeypatch):
    monkeypatch.setattr(job_mod, "_dataset_fingerprint", lambda path: "fp")
    j = _job()
    d = to_dict(j)
    del d["moe_experts"]  # what key() hashed before moelora was added
    for part in d["parts"]:
        del part["augment"]  # ... and before router data could be augmented
        del part["swap_images"]  # ... or carry swapped images
    d.pop("out_dir")
    d.pop("name")
    d["dataset"], d["init_adapter"] = "fp", None
    assert j.key() == hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert _job(moe_experts=4).key() != j.key() and _job(moe_experts=4).weights_key() != j.weights_key()


def test_augmented_router_data_is_another_adapter(monkeypatch):
    monkeypatch.setattr(job_mod, "_dataset_fingerprint", lambda path: "fp")
    plain, aug = _job(), _job().replace(parts=(DataPart("RS", augment=1),))
    assert aug.key() != plain.key() and aug.weights_key() != plain.weights_key()
