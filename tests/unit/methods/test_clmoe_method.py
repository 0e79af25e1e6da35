"""``clmoe`` through the job runner, the engine and the CLI: without ``clmoe.paper`` it is our MoE-LoRA with its
experts and warm start; with it, the task gates are measured, carried from task to task and mixed in, the momentum
update is applied on save, and the engine answers with the seen tasks' mean task gate. ``--dry-run`` lists its
jobs; ``clsvc serve`` refuses a run of it alone, saying why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cl_service.adapters import clmoe as clmoe_mod
from cl_service.adapters.family import JobData, family
from cl_service.adapters.lora import LoraCfg
from cl_service.train.job import DataPart, TrainJob, job_options, load_parts
from cl_service.train.loop import TrainCfg
from cl_service.train.runner import run_train_job

pytestmark = pytest.mark.timeout(300)

LORA = LoraCfg(rank=10, alpha=20, dropout=0.0)  # 5 experts of rank 2


def _job(root, base, data, kind, stage, task, init=None, **kw):
    name = f"{kind}-{stage}"
    return TrainJob(name=f"{kind}/stage-{stage}", kind=kind, task=task, out_dir=str(Path(root) / name),
                    base_path=str(base), dataset=str(data), parts=(DataPart(task, limit=8),), lora=LORA,
                    train=TrainCfg(lr=1e-2, max_steps=2, batch_size=4), init_adapter=init, description=name, seed=0,
                    moe_experts=5, **kw)


def _tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def test_without_the_paper_option_clmoe_is_moelora_with_five_experts_and_warm_start(tmp_path, tiny_base, dcl_shards):
    torch.set_num_threads(1)
    out = {}
    for kind in ("clmoe", "moelora"):
        s0 = _job(tmp_path, tiny_base, dcl_shards, kind, 0, "RS")
        s1 = _job(tmp_path, tiny_base, dcl_shards, kind, 1, "Med", init=s0.out_dir)
        out[kind] = [(run_train_job(j), j.out_dir)[1] for j in (s0, s1)]
    for a, b in zip(out["clmoe"], out["moelora"]):
        ta, tb = _tensors(a), _tensors(b)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    s0, s1 = (_tensors(d) for d in out["clmoe"])
    k = next(k for k in s0 if k.endswith(".B"))
    assert s0[k].shape[0] == 5 and s0[k].shape[2] == 2  # 5 experts of rank 10 / 5
    assert any(not torch.equal(s0[k], s1[k]) for k in s0)  # stage 1 trained on from stage 0
    cfg = json.loads((Path(out["clmoe"][1]) / "moelora_config.json").read_text())
    assert cfg["method"] == "clmoe" and not (Path(out["clmoe"][1]) / clmoe_mod.TASK_GATES).exists()


def test_paper_mode_measures_carries_and_mixes_task_gates_and_applies_the_momentum_update(
        tmp_path, tiny_base, dcl_shards, monkeypatch):
    from cl_service.adapters.moelora import moelora_active
    from cl_service.data.shards import ShardDataset
    from cl_service.engine import Engine
    from cl_service.models.mllm import load_mllm

    torch.set_num_threads(1)
    paper = job_options(paper=True, beta=0.5, momentum=0.7, top_k=2)
    s0 = _job(tmp_path, tiny_base, dcl_shards, "clmoe", 0, "RS", options=paper)
    s1 = _job(tmp_path, tiny_base, dcl_shards, "clmoe", 1, "Med", init=s0.out_dir, options=paper)
    merges = []
    real_merge = clmoe_mod.momentum_merge

    def recorded(*args, **kw):
        merges.append((args, real_merge(*args, **kw)))
        return merges[-1][1]

    monkeypatch.setattr(clmoe_mod, "momentum_merge", recorded)
    run_train_job(s0)
    assert not merges  # nothing before the first task to keep
    run_train_job(s1)
    tasks0, g0, _ = clmoe_mod.read_task_gates(s0.out_dir)
    tasks1, g1, cfg = clmoe_mod.read_task_gates(s1.out_dir)
    assert tasks0 == ["RS"] and tasks1 == ["RS", "Med"] and cfg["beta"] == 0.5 and cfg["top_k"] == 2
    assert g0.keys() == g1.keys() and len(g0) == 2 * 7  # every adapted decoder Linear (2 layers x 7)
    for name in g0:
        assert g0[name].shape == (1, 5) and g1[name].shape == (2, 5)
        assert torch.equal(g1[name][0], g0[name][0])  # the earlier task's gate is carried, not measured again
        assert torch.allclose(g1[name].sum(-1), torch.ones(2), atol=1e-6)
    # Med's gate is the statistic of the adapter Med starts from (stage 0, as it answers) over Med's samples
    mllm = load_mllm(tiny_base)
    fam = family("clmoe")
    with fam.active(mllm, s0.out_dir, {}, None) as moe:
        usage = clmoe_mod.gate_usage(moe, mllm, JobData(load_parts(s1), mllm.collate, 4).batches(), top_k=2)
    assert all(torch.allclose(usage[n], g1[n][1], atol=1e-6) for n in g1)
    # the momentum update: previous = stage 0's saved experts, and its result is what stage 1 saved
    [(args, merged)] = merges
    old, _, prev, cur, top_k, momentum = args
    assert all(torch.equal(old[k], v) for k, v in _tensors(s0.out_dir).items())
    assert all(torch.equal(prev[n], g1[n][0]) and torch.equal(cur[n], g1[n][1]) for n in g1)
    assert (top_k, momentum) == (2, 0.7)
    saved = _tensors(s1.out_dir)
    assert all(torch.equal(saved[k], merged[k]) for k in saved)
    # At test time: the seen tasks' mean task gate mixed in with 1 - beta; it changes what the adapter answers
    samples = ShardDataset(dcl_shards).samples("Med", "test")[:3]
    batch = mllm.collate(samples, train=False)
    with torch.no_grad(), fam.active(mllm, s1.out_dir, {}, None) as moe:
        name, _, layer = next(moe.linears())
        assert torch.allclose(layer.prior, g1[name].mean(0)) and layer.beta == 0.5
        dual = mllm.forward(batch).logits
    with torch.no_grad(), moelora_active(mllm, s1.out_dir):  # the same experts with the token gate alone
        token_only = mllm.forward(batch).logits
    assert not torch.allclose(dual, token_only)
    engine = Engine(tiny_base)  # found by the kind its adapter.json records
    with torch.no_grad(), fam.active(engine.mllm, s1.out_dir, {}, None):
        want = engine.mllm.generate(samples, 3, 8)
    assert engine.answer(samples, s1.out_dir, 3) == want
    with pytest.raises(ValueError, match="clmoe adapters are answered by Engine.answer, not in mixed batches"):
        engine.answer_mixed(samples, [s1.out_dir] * len(samples), 3)


def test_dry_run_lists_clmoe_jobs_and_serve_refuses_a_clmoe_run_naming_the_method(tmp_path, tiny_base, dcl_shards,
                                                                                 capsys, monkeypatch):
    from cl_service.cli import main

    monkeypatch.setenv("CLSVC_HOME", str(tmp_path / "home"))
    out = tmp_path / "run"
    args = ["run", "--data", str(dcl_shards), "--out", str(out), "--methods", "clmoe,clmoe_replay",
            f"base.path={tiny_base}", "data.tasks=[RS,Med]", "expert.lora.rank=5", "expert.train.max_steps=1",
            "expert.train.batch_size=4", "data.train_limit=4", "data.test_limit=2", "eval.max_new_tokens=2",
            "ray.num_workers=0", "clmoe.paper=true"]
    assert main(args + ["--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "stage 1 RS:" in plan and "stage 2 Med:" in plan
    lines = [line.split(None, 1) for line in plan.splitlines()]
    assert "clmoe/stage-0" in plan and "clmoe/stage-1, clmoe_replay/stage-1" in plan
    assert any("identical" in line[1] and "clmoe_replay/stage-0" in line[1] for line in lines if len(line) > 1)
    assert not out.exists()
    assert main(args) == 0  # trains and evaluates it in this process
    capsys.readouterr()
    assert (out / "adapters" / "clmoe_replay" / "stage-1-Med" / clmoe_mod.TASK_GATES).is_file()
    assert main(["serve", "--local", "--results", str(out), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "holds no complete expert adapter" in err and "clmoe is one MoE-LoRA for every task" in err
    assert "clmoe_replay is one MoE-LoRA" in err
