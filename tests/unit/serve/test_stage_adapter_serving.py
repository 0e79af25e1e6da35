"""``clsvc serve method=<name>``: a merging method's latest stage (the model merged after every task, one peft LoRA)
served as the single expert that answers every request, and the refusals that name the method and why."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import torch

from cl_service.adapters.registry import AdapterError, finalize_adapter
from cl_service.data.shards import ShardDataset
from cl_service.serve.catalog import Catalog

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def merged_run(tmp_path_factory, tiny_base, dcl_shards):
    """A tiny finished 2-task run (RS, Med) of sefe and keeplora."""
    from cl_service.config import load_run_cfg
    from cl_service.run import LocalTrainer, run_stream

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("merged-run")
    cfg = load_run_cfg(None, [
        f"out={out}", f"data.path={dcl_shards}", f"base.path={tiny_base}", "data.tasks=[RS,Med]",
        "methods=[sefe,keeplora]", "expert.train.max_steps=2", "expert.train.batch_size=4", "expert.lora.rank=4",
        "eval.max_new_tokens=3", "ray.num_workers=0"])
    run_stream(cfg, LocalTrainer(), log=lambda *_: None)
    return out


@pytest.mark.parametrize("method", ["sefe", "keeplora"])
def test_a_merging_methods_latest_stage_answers_every_request_as_the_run_evaluated_it(merged_run, tiny_base,
                                                                                      dcl_shards, method):
    from cl_service.engine.engine import Engine
    from cl_service.serve.proto import load
    from cl_service.serve.service import ContinualLearningServicer, build_server

    engine = Engine(tiny_base)
    engine.max_new_tokens = 3
    servicer = ContinualLearningServicer(merged_run, engine, method=method)
    server, port = build_server(servicer, 0)
    server.start()
    pb2, pb2_grpc = load()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb2_grpc.ContinualLearningStub(ch)
            [e] = stub.ListExperts(pb2.ListExpertsRequest(), timeout=30).experts
            assert (e.id, e.task, e.description) == (f"{method}:stage-1", method, f"{method} after Med")
            ds = ShardDataset(dcl_shards)
            for task in ("RS", "Med"):
                lines = (merged_run / "predictions" / method / "stage-1-Med" / f"{task}.jsonl").read_text().splitlines()
                offline = {r["question_id"]: r["text"] for r in map(json.loads, lines)}
                for s in ds.samples(task, "test")[:3]:
                    r = stub.Predict(pb2.PredictRequest(images=list(s.images), question=s.question), timeout=60)
                    assert (r.answer, r.expert, r.router.kind) == (offline[s.id], method, "single")
            named = stub.Predict(pb2.PredictRequest(images=list(s.images), question=s.question, expert=method),
                                 timeout=60)
            assert named.expert == method and named.router.kind == "request"
            with pytest.raises(grpc.RpcError) as err:
                stub.Predict(pb2.PredictRequest(images=list(s.images), question=s.question, expert="RS"), timeout=60)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and f"known experts: {method}" in err.value.details()
    finally:
        server.stop(None)
        servicer.close()


def test_a_run_of_merging_methods_alone_is_refused_without_method_naming_how_to_serve_it(merged_run):
    with pytest.raises(AdapterError, match=r"no complete expert adapter; .*sefe is one merged LoRA for every task.*"
                                           r"clsvc serve method=<this method> serves its latest stage"):
        Catalog.load(merged_run)


def _adapter(folder: Path, id: str, kind: str, task: str) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights of " + id.encode())
    (folder / "adapter_config.json").write_text("{}")
    finalize_adapter(folder, id=id, kind=kind, task=task, description=f"{id} after {task}", base="b", job_key="k")


def test_the_latest_complete_stage_is_served_and_other_methods_are_refused_with_the_reason(tmp_path):
    (tmp_path / "config.resolved.json").write_text(json.dumps(
        {"tasks": ["RS", "Med", "AD"], "base": "/b", "dataset": "/d", "config": {"methods": ["mrlora", "clmoe", "sefe"]}}))
    with pytest.raises(AdapterError, match="holds no complete sefe stage adapter yet"):
        Catalog.load(tmp_path, method="sefe")
    _adapter(tmp_path / "adapters" / "sefe" / "stage-0-RS", "sefe:stage-0", "sequential", "RS")
    first = Catalog.load(tmp_path, method="sefe")
    assert [(e.id, e.task) for e in first.experts] == [("sefe:stage-0", "sefe")] and first.router_dir is None
    _adapter(tmp_path / "adapters" / "sefe" / "stage-1-Med", "sefe:stage-1", "sefe", "Med")
    second = Catalog.load(tmp_path, method="sefe")
    assert second.experts[0].id == "sefe:stage-1" and second.fingerprint != first.fingerprint  # hot add sees it
    (tmp_path / "adapters" / "sefe" / "stage-1-Med" / "adapter_model.safetensors").write_bytes(b"torn")
    assert Catalog.load(tmp_path, method="sefe").experts[0].id == "sefe:stage-0"  # not verified: not served
    for method, needle in [("keeplora", "did not run method 'keeplora'; its methods: mrlora, clmoe, sefe"),
                           ("mrlora", "'mrlora' keeps no single adapter per stage .*leave method unset"),
                           ("clmoe", "'clmoe' keeps no single adapter per stage .*it is one MoE-LoRA for every task")]:
        with pytest.raises(AdapterError, match=needle):
            Catalog.load(tmp_path, method=method)


@pytest.mark.parametrize("method", ["sefe", "keeplora"])
def test_each_stage_is_the_merged_model_so_far_and_exports_as_it(merged_run, tiny_base, tmp_path, method):
    """The run's stage 1 holds stage 0's block unchanged plus a trained one, and its merged export's weights are
    the base's plus ``alpha / r`` times the sum of both blocks' ``B A`` on every adapted Linear: the model merged
    after each task, written out."""
    from safetensors.torch import load_file

    from cl_service.adapters.export import export_run
    from cl_service.adapters.merged import saved_pairs
    from cl_service.models.mllm import load_mllm

    ads = merged_run / "adapters" / method
    [s0], [s1] = ads.glob("stage-0-*"), ads.glob("stage-1-*")
    p0, p1 = (saved_pairs(load_file(str(s / "adapter_model.safetensors"))) for s in (s0, s1))
    r = json.loads((s0 / "adapter_config.json").read_text())
    cfg1 = json.loads((s1 / "adapter_config.json").read_text())
    assert (cfg1["r"], cfg1["lora_alpha"] / cfg1["r"]) == (2 * r["r"], r["lora_alpha"] / r["r"])
    k = r["r"]
    for name, (a, b) in p1.items():
        assert torch.equal(a[:k], p0[name][0]) and torch.equal(b[:, :k], p0[name][1]), name  # stage 0 as merged
    assert any(b[:, k:].abs().sum() > 0 for _, b in p1.values())  # a trained block on top

    [out] = export_run(merged_run, "merged", tmp_path / "m", expert=f"{method}:stage-1")
    merged, base = (dict(load_mllm(p).model.named_modules()) for p in (out, tiny_base))
    scale = cfg1["lora_alpha"] / cfg1["r"]
    for name, (a, b) in p1.items():
        want = base[name].weight.float() + scale * (b.float() @ a.float())
        assert torch.allclose(merged[name].weight.float(), want, atol=1e-6), name


def test_a_pinned_stage_is_served_as_it_is_and_refused_until_complete(tmp_path):
    """``stage=`` serves that stage's adapter even when a later one is complete, is refused (naming the stage)
    until it is complete or past the stream, and is a config error without ``method``."""
    from cl_service.serve.config import ServeCfg

    (tmp_path / "config.resolved.json").write_text(json.dumps(
        {"tasks": ["RS", "Med", "AD"], "base": "/b", "dataset": "/d", "config": {"methods": ["keeplora"]}}))
    _adapter(tmp_path / "adapters" / "keeplora" / "stage-0-RS", "keeplora:stage-0", "keeplora", "RS")
    _adapter(tmp_path / "adapters" / "keeplora" / "stage-1-Med", "keeplora:stage-1", "keeplora", "Med")
    assert Catalog.load(tmp_path, method="keeplora").experts[0].id == "keeplora:stage-1"
    assert Catalog.load(tmp_path, method="keeplora", stage=0).experts[0].id == "keeplora:stage-0"
    with pytest.raises(AdapterError, match=r"no complete keeplora stage adapter of stage 2 \(AD\) yet"):
        Catalog.load(tmp_path, method="keeplora", stage=2)
    with pytest.raises(AdapterError, match="stage 3 is past the run's 3 stages"):
        Catalog.load(tmp_path, method="keeplora", stage=3)
    with pytest.raises(ValueError, match="stage: used only with method="):
        ServeCfg(results=str(tmp_path), stage=0)
