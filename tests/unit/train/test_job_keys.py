"""Job keys name a finished adapter across code versions: a results folder from before a TrainJob field was
added must still recognise its adapters (or every resumed/extended run retrains everything)."""

import hashlib
import json

from cl_service._cfgload import to_dict
from cl_service.adapters.lora import LoraCfg
from cl_service.train import job as job_mod
from cl_service.train.job import DataPart, TrainJob
from cl_service.train.loop import TrainCfg


def _job(train=None, **kw):
    return TrainJob(name="expert/RS", kind="expert", task="RS", out_dir="/x/e", base_path="/b", dataset="/d",
                    parts=(DataPart("RS"),), lora=LoraCfg(rank=4), train=train or TrainCfg(max_steps=3), **kw)


def test_a_job_that_does_not_use_moelora_keeps_the_key_it_had_before_the_field_existed(monkeypatch):
    monkeypatch.setattr(job_mod, "_dataset_fingerprint", lambda path: "fp")
    monkeypatch.setattr(job_mod, "_base_fingerprint", lambda path: "bd")
    j = _job()
    d = to_dict(j)
    del d["base_digest"]  # the base is hashed by content (hashing it by content changed every earlier key once)
    d["base_path"] = "bd"
    del d["moe_experts"]  # what key() hashed before moelora was added
    del d["base_dtype"], d["prompt_style"]  # ... before the base's dtype and prompt style were run settings
    del d["options"]  # ... before methods passed options to their jobs
    for k in ("lora_fp32_inputs", "fused_optimizer", "activation_checkpointing", "fused_kernels"):
        del d["train"][k]  # ... and before the GPU training options were
    d["train"]["autocast"] = "none"  # ... whose CPU value 'auto' stands for
    for part in d["parts"]:
        del part["augment"]  # ... and before router data could be augmented
        del part["swap_images"]  # ... or carry swapped images
        del part["share"]  # ... or be sized as a share of the job's first part (replay.fraction)
    d.pop("out_dir")
    d.pop("name")
    d["dataset"], d["init_adapter"] = "fp", None
    assert j.key() == hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert _job(moe_experts=4).key() != j.key() and _job(moe_experts=4).weights_key() != j.weights_key()


def test_augmented_router_data_is_another_adapter(monkeypatch):
    monkeypatch.setattr(job_mod, "_dataset_fingerprint", lambda path: "fp")
    plain, aug = _job(), _job().replace(parts=(DataPart("RS", augment=1),))
    assert aug.key() != plain.key() and aug.weights_key() != plain.weights_key()


def test_cpu_resolved_training_options_keep_the_old_key_and_gpu_ones_change_it(monkeypatch):
    from cl_service.train.loop import resolve_train_cfg

    monkeypatch.setattr(job_mod, "_dataset_fingerprint", lambda path: "fp")
    old = _job(train=TrainCfg(max_steps=3, autocast="none"))
    cpu = _job(train=resolve_train_cfg(TrainCfg(max_steps=3), gpu=False))
    gpu = _job(train=resolve_train_cfg(TrainCfg(max_steps=3), gpu=True), base_dtype="bfloat16")
    assert cpu.train.autocast == "none" and cpu.train.lora_fp32_inputs is True and cpu.train.fused_optimizer is False
    assert gpu.train.autocast == "bfloat16" and gpu.train.lora_fp32_inputs is False and gpu.train.fused_optimizer
    assert cpu.key() == old.key() and cpu.weights_key() == old.weights_key()
    assert gpu.key() != cpu.key() and gpu.weights_key() != cpu.weights_key()
    assert _job(base_dtype="bfloat16").key() != old.key()


def test_the_base_is_keyed_by_its_content_not_its_path(tmp_path, tiny_base, dcl_shards):
    """A base rebuilt in place (other bytes, same path) trains other adapters; the same bytes elsewhere do not.
    The digest the driver stamps on a job is the one a worker would compute."""
    import shutil

    from safetensors.torch import load_file, save_file

    from cl_service.digest import base_digest

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    job = _job().replace(base_path=str(base), dataset=str(dcl_shards))
    key, wkey = job.key(), job.weights_key()
    assert job.replace(base_digest=base_digest(base)).key() == key
    assert job.replace(base_path=str(tiny_base)).key() == key  # a copy of the same base
    tensors = load_file(str(base / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * 2
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    assert job.key() != key and job.weights_key() != wkey
    assert job.replace(base_path=str(tmp_path / "gone")).key() != key  # no base there: nothing is complete


def test_method_options_hash_only_when_set(monkeypatch):
    """The one key rule for methods' own hyper-parameters: an unset option (None) is not part of the key, so a
    method or option added later changes no other job's key; set options are hashed by name, in any order."""
    import pytest

    from cl_service.train.job import job_options

    monkeypatch.setattr(job_mod, "_dataset_fingerprint", lambda path: "fp")
    plain = _job()
    assert job_options(beta=None) == () and _job(options=job_options(beta=None)).key() == plain.key()
    a = _job(options=job_options(paper=True, beta=0.5))
    assert a.key() != plain.key() and a.weights_key() != plain.weights_key()
    assert a.option("beta") == 0.5 and a.option("momentum", 0.7) == 0.7 and plain.option("paper") is None
    assert _job(options=job_options(beta=0.5, paper=True)).key() == a.key()  # keyword order does not matter
    assert _job(options=job_options(paper=True, beta=0.25)).key() != a.key()
    assert a.replace(kind="other").weights_key() == a.weights_key()  # like every field but the kind and names
    with pytest.raises(ValueError, match="options must come from job_options"):
        _job(options=(("paper", True), ("beta", 0.5)))  # unsorted: two spellings of one job
    with pytest.raises(TypeError, match="values are bool, int, float, str"):
        job_options(gates=[0.5])


def test_a_part_sized_as_a_share_is_another_adapter_and_unset_share_keeps_the_key(monkeypatch):
    import pytest

    monkeypatch.setattr(job_mod, "_dataset_fingerprint", lambda path: "fp")
    plain = _job().replace(parts=(DataPart("RS"), DataPart("Med", limit=2)))
    share = _job().replace(parts=(DataPart("RS"), DataPart("Med", share=0.5)))
    assert share.key() != plain.key()
    with pytest.raises(ValueError, match="share=0.5 needs limit=None"):
        DataPart("Med", limit=2, share=0.5)
