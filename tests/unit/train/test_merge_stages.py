"""The merging families (``sefe``, ``keeplora``) through the job runner on the tiny base: what a stage starts from,
what trains, what stays frozen and what each saves for the next stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cl_service.adapters.family import JobData, family
from cl_service.adapters.keeplora import read_subspace
from cl_service.adapters.lora import LoraCfg, load_adapter
from cl_service.adapters.merged import saved_pairs
from cl_service.adapters.sefe import read_key_positions
from cl_service.models.mllm import load_mllm
from cl_service.train import runner
from cl_service.train.job import DataPart, TrainJob, job_options, load_parts
from cl_service.train.loop import TrainCfg

pytestmark = pytest.mark.timeout(300)

KEEP = job_options(grad_fraction=0.5, base_energy=0.6, task_energy=0.99)


def _job(root, base, data, kind, name, task, init=None, steps=3, **kw):
    return TrainJob(name=f"{kind}/{name}", kind=kind, task=task, out_dir=str(Path(root) / name), base_path=str(base),
                    dataset=str(data), parts=(DataPart(task, limit=8),), lora=LoraCfg(rank=4, alpha=8, dropout=0.0),
                    train=TrainCfg(lr=1e-2, max_steps=steps, batch_size=4), init_adapter=init, description=name, **kw)


def _pairs(folder) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return saved_pairs(load_file(str(Path(folder) / "adapter_model.safetensors")))


def _logits(mllm, samples) -> torch.Tensor:
    mllm.model.eval()
    with torch.no_grad():
        return mllm.forward(mllm.collate(samples, train=False)).logits


def test_keeplora_starts_from_the_merged_model_and_trains_only_b_outside_the_protected_subspace(
        tmp_path, tiny_base, dcl_shards):
    """Stage 1 of KeepLoRA: its new block's A (from the gradient pass) is orthogonal to the protected subspace stage 0
    saved, B starts at zero (the model is stage 0's merged model), training changes only B of the new block (A is
    saved exactly as prepared, stage 0's block exactly as it was), and the saved subspace still holds stage 0's."""
    torch.set_num_threads(1)
    k0 = _job(tmp_path, tiny_base, dcl_shards, "keeplora", "k0", "RS", options=KEEP)
    runner.run_train_job(k0)
    k1 = _job(tmp_path, tiny_base, dcl_shards, "keeplora", "k1", "Med", init=k0.out_dir, options=KEEP)
    fam = family("keeplora")
    mllm = load_mllm(tiny_base)
    prepared = fam.prepare(k1, mllm, JobData(load_parts(k1), mllm.collate, 4))
    assert mllm.peft is None  # the pass over the merged model took its LoRA off again
    protected = read_subspace(k0.out_dir)
    for name, a in prepared["A"].items():
        assert a.shape[0] == 4 and a.abs().sum() > 0
        assert (a @ protected[name].T).abs().max() < 1e-5, name  # in the residual subspace
    attached = fam.attach(k1, mllm, prepared)
    found = attached.extra["found"]
    assert all(not b.A.requires_grad and torch.equal(b.B[:, 4:], torch.zeros_like(b.B[:, 4:])) for b in found)
    assert {id(p) for p in attached.params}.isdisjoint({id(b.A) for b in found})
    samples = load_parts(k1)[:3]
    started = _logits(mllm, samples)
    prev = load_mllm(tiny_base)
    load_adapter(prev, k0.out_dir, "prev")
    assert torch.allclose(started, _logits(prev, samples), atol=1e-6)  # the stage starts as the merged model

    runner.run_train_job(k1)
    before, after = _pairs(k0.out_dir), _pairs(k1.out_dir)
    for name, (a, b) in after.items():
        assert torch.equal(a[:4], before[name][0]) and torch.equal(b[:, :4], before[name][1])  # stage 0 frozen
        assert torch.equal(a[4:], prepared["A"][name])  # A never changed while training
    assert any(b[:, 4:].abs().sum() > 0 for _, b in after.values())  # B trained
    grown = read_subspace(k1.out_dir)
    for name, u in protected.items():
        assert grown[name].shape[0] >= u.shape[0]
        assert (u - (u @ grown[name].T) @ grown[name]).abs().max() < 1e-2, name  # (float16 on disk)
    cfg = json.loads((Path(k1.out_dir) / "keeplora_config.json").read_text())
    assert cfg["blocks"] == 2 and cfg["grad_samples"] == 4 and set(cfg["protected_rank"]) == set(after)


def test_sefe_regularises_the_new_block_on_the_previous_blocks_key_positions(tmp_path, tiny_base, dcl_shards):
    """SEFE stage 1 from a LoRA: its key positions are the top 2% of that LoRA's B A per Linear (saved with the stage
    and joined by stage 2's); a strong penalty keeps the new block's |B A| at them far below its size elsewhere, which
    training without the penalty does not."""
    torch.set_num_threads(1)
    s0 = _job(tmp_path, tiny_base, dcl_shards, "expert", "s0", "RS", steps=4)
    runner.run_train_job(s0)
    ratios = {}
    for weight in (0.0, 1e5):
        job = _job(tmp_path, tiny_base, dcl_shards, "sefe", f"s1-{weight:g}", "Med", init=s0.out_dir, steps=8,
                   options=job_options(key_fraction=0.02, reg_weight=weight))
        runner.run_train_job(job)
        pos = read_key_positions(job.out_dir)
        on, off = [], []
        for name, (a, b) in _pairs(job.out_dir).items():
            first = _pairs(s0.out_dir)[name]
            expect = torch.topk((first[1] @ first[0]).abs().reshape(-1), int(0.02 * a.shape[1] * b.shape[0])).indices
            assert torch.equal(pos[name], expect.sort().values), name
            assert torch.equal(a[:4], first[0]) and torch.equal(b[:, :4], first[1])
            d = (b[:, 4:] @ a[4:]).abs().reshape(-1)
            mask = torch.zeros_like(d, dtype=torch.bool)
            mask[pos[name]] = True
            on.append(d[mask].mean())
            off.append(d[~mask].mean())
        ratios[weight] = float(torch.stack(on).mean() / torch.stack(off).mean())
    assert ratios[1e5] < 0.3 * ratios[0.0], ratios
    s2 = _job(tmp_path, tiny_base, dcl_shards, "sefe", "s2", "AD", init=str(tmp_path / "s1-100000"), steps=1,
              options=job_options(key_fraction=0.02, reg_weight=1e5))
    runner.run_train_job(s2)
    two, one = read_key_positions(s2.out_dir), read_key_positions(tmp_path / "s1-100000")
    assert all(set(one[n].tolist()) < set(two[n].tolist()) for n in one)  # the union grows
