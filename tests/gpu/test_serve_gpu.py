"""``clsvc serve --local``'s servicer on a GPU (skipped without one): both stages over one engine on two CUDA
streams, batch-at-a-time and with continuous batching (CUDA graphs), the MLLM and the knn router; concurrent
requests get the route and the answer the engine gives each alone on the same GPU, and a streamed answer adds
up to the whole one. float32, so eager and graph decoding agree."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(400),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory, tiny_base, dcl_shards):
    from cl_service.config import load_run_cfg
    from cl_service.run import LocalTrainer, run_stream

    out = tmp_path_factory.mktemp("gpu-run")
    cfg = load_run_cfg(None, [
        f"out={out}", f"data.path={dcl_shards}", f"base.path={tiny_base}", "data.tasks=[RS,Med]",
        "methods=[mrlora,mrlora_knn]", "base.dtype=float32", "expert.train.max_steps=2", "expert.train.batch_size=4",
        "router.train.max_steps=2", "router.samples_per_task=4", "expert.lora.rank=4", "router.lora.rank=4",
        "eval.max_new_tokens=6", "ray.num_workers=0", "tracking.backend=none"])
    run_stream(cfg, LocalTrainer(), log=lambda *_: None)
    return out


@pytest.mark.parametrize("kind, continuous", [("mllm", False), ("mllm", True), ("knn", True)])
def test_the_local_servicer_on_a_gpu_answers_as_the_engine_alone(gpu_run, dcl_shards, kind, continuous):
    from cl_service.data.shards import ShardDataset
    from cl_service.engine.engine import Engine
    from cl_service.routers.store import load_router
    from cl_service.serve.catalog import Catalog
    from cl_service.serve.proto import pb2
    from cl_service.serve.service import ContinualLearningServicer

    cat = Catalog.load(gpu_run)
    samples = [s for t in ("RS", "Med") for s in ShardDataset(dcl_shards).iter_samples(t, "test")]
    ref_engine = Engine(cat.resolved["base"], device="cuda", cuda_graphs=False, **cat.base_settings())
    ref_engine.max_new_tokens = 6
    if kind == "mllm":
        routes = [ref_engine.route_mllm([s], str(cat.router_dir), cat.pool)[0].expert for s in samples]
    else:
        folder, _ = cat.feature_routers["knn"]
        routes = [load_router(folder, ref_engine).route([s])[0].expert for s in samples]
    ref = [(e, ref_engine.answer_mixed([s], [str(cat.find(e).path)])[0]) for s, e in zip(samples, routes)]

    servicer = ContinualLearningServicer(gpu_run, device="cuda", router_kind=kind, continuous=continuous, watch_s=0,
                                         expert__max_batch_size=4)
    try:
        assert servicer.stages.engine.mllm.device.type == "cuda"

        def ask(s):
            return servicer.run(servicer.core.predict(pb2.PredictRequest(images=list(s.images), question=s.question),
                                                      ()))

        with ThreadPoolExecutor(len(samples)) as pool:
            got = list(pool.map(ask, samples))
        assert [(r.expert, r.answer) for r in got] == ref

        async def streamed(s):
            return [x async for x in servicer.core.predict_stream(
                pb2.PredictRequest(images=list(s.images), question=s.question), ())]

        items = servicer.run(streamed(samples[0]))
        assert "".join(x for x in items if isinstance(x, str)) == items[-1].answer == ref[0][1]
        if continuous:
            assert servicer.stages.expert.cont.dec.stats["replays"] > 0  # decoded by captured graphs
    finally:
        servicer.close()
