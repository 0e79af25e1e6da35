"""gRPC round trip of the plain servicer on a tiny 2-task run (RS, Med): Predict with every router kind and with
continuous batching (answers equal the run's offline evaluation), ListExperts, health, bad input."""

import io

import grpc
import pytest
import torch
from PIL import Image

from cl_service.data.schema import Sample
from cl_service.data.shards import ShardDataset

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def served(tiny_run, tiny_base, dcl_shards):
    from cl_service.engine.engine import Engine
    from cl_service.serve.service import ContinualLearningServicer, build_server

    torch.set_num_threads(1)
    out = tiny_run  # the session's finished RS, Med run (conftest.py); read only here
    engine = Engine(tiny_base)
    engine.max_new_tokens = 3
    servicer = ContinualLearningServicer(out, engine, limits__max_image_bytes=200_000)
    server, port = build_server(servicer, 0)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    from cl_service.serve.proto import load

    pb2, pb2_grpc = load()
    sample = next(iter(ShardDataset(dcl_shards).iter_samples("Med", "test")))
    yield {"out": out, "engine": engine, "stub": pb2_grpc.ContinualLearningStub(channel), "pb2": pb2,
           "pb2_grpc": pb2_grpc, "channel": channel, "sample": sample, "servicer": servicer}
    channel.close()
    server.stop(None)
    servicer.close()


def _req(served, **kw):
    s = served["sample"]
    args = {"images": list(s.images), "question": s.question}
    args.update(kw)
    return served["pb2"].PredictRequest(**args)


def test_predict_routes_and_answers(served):
    r = served["stub"].Predict(_req(served), timeout=60)
    assert r.expert in ("RS", "Med")
    assert r.router.kind == "mllm"
    assert r.latency.total_ms >= r.latency.answer_ms > 0 and r.latency.route_ms > 0
    assert isinstance(r.answer, str)


def test_predict_with_expert_matches_offline_engine(served):
    s: Sample = served["sample"]
    r = served["stub"].Predict(_req(served, expert="Med"), timeout=60)
    assert r.expert == "Med" and r.router.kind == "request" and r.latency.route_ms == 0
    offline = served["engine"].answer([s], str(served["out"] / "adapters" / "experts" / "Med"))[0]
    assert r.answer == offline
    r2 = served["stub"].Predict(_req(served, expert="expert:Med", max_new_tokens=1), timeout=60)
    assert r2.expert == "Med"


def test_list_experts_in_stream_order(served):
    r = served["stub"].ListExperts(served["pb2"].ListExpertsRequest(), timeout=30)
    assert [e.task for e in r.experts] == ["RS", "Med"]
    assert [e.id for e in r.experts] == ["expert:RS", "expert:Med"]
    assert all(e.description and e.adapter_version >= 1 for e in r.experts)


def test_health_serving(served):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(served["channel"])
    for name in ("", "cl.v1.ContinualLearning"):
        resp = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def _png(size):
    buf = io.BytesIO()
    Image.frombytes("RGB", (size, size), torch.randint(0, 256, (size * size * 3,), dtype=torch.uint8,
                                                       generator=torch.Generator().manual_seed(0)).numpy().tobytes()
                    ).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("kw,code,needle", [
    ({"images": []}, grpc.StatusCode.INVALID_ARGUMENT, "at least one image"),
    ({"images": [b""]}, grpc.StatusCode.INVALID_ARGUMENT, "empty bytes"),
    ({"images": [b"not an image at all"]}, grpc.StatusCode.INVALID_ARGUMENT, "not a decodable image"),
    ({"images": ["BIG"]}, grpc.StatusCode.INVALID_ARGUMENT, "over the limit"),
    ({"question": "   "}, grpc.StatusCode.INVALID_ARGUMENT, "question"),
    ({"max_new_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    ({"max_new_tokens": 10_000}, grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    ({"expert": "Nope"}, grpc.StatusCode.NOT_FOUND, "known experts: RS, Med"),
])
def test_bad_requests(served, kw, code, needle):
    if kw.get("images") == ["BIG"]:
        kw = {"images": [_png(400)]}  # ~480 kB of noise > the 200 kB limit set above
    with pytest.raises(grpc.RpcError) as ei:
        served["stub"].Predict(_req(served, **kw), timeout=30)
    assert ei.value.code() == code
    assert needle in ei.value.details()
    assert "Traceback" not in ei.value.details()


def test_reflection_lists_services(served):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    db = ProtoReflectionDescriptorDatabase(served["channel"])
    assert "cl.v1.ContinualLearning" in set(db.get_services())


def test_concurrent_clients_are_batched_and_answered_as_alone(served, dcl_shards):
    """Requests of 8 clients at once share routing and answering batches (different experts and answer
    lengths in one batch) and get exactly the answers each gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    pb2 = served["pb2"]
    samples = list(ShardDataset(dcl_shards).iter_samples("RS", "test"))[:4] + \
        list(ShardDataset(dcl_shards).iter_samples("Med", "test"))[:4]
    reqs = []
    for i, s in enumerate(samples):
        kw = {"images": list(s.images), "question": s.question}
        if i % 3 == 1:
            kw["expert"] = "RS" if i % 2 else "Med"
        if i % 4 == 2:
            kw["max_new_tokens"] = 1
        reqs.append(pb2.PredictRequest(**kw))
    alone = [served["stub"].Predict(r, timeout=60) for r in reqs]
    stages = served["servicer"].stages
    before = len(stages.batch_log("Expert"))
    with ThreadPoolExecutor(len(reqs)) as ex:
        together = list(ex.map(lambda r: served["stub"].Predict(r, timeout=60), reqs))
    assert [(r.answer, r.expert, r.router.kind) for r in together] == \
        [(r.answer, r.expert, r.router.kind) for r in alone]
    assert max(n for *_, n in stages.batch_log("Expert")[before:]) > 1  # some requests shared a batch


def _test_items(dcl_shards):
    return [(t, s) for t in ("RS", "Med") for s in ShardDataset(dcl_shards).iter_samples(t, "test")]


@pytest.mark.parametrize("kind, method, continuous", [
    ("mllm", "mrlora", False), ("prototype", "mrlora_proto", False), ("knn", "mrlora_knn", False),
    ("ridge", "mrlora_ridge", False), ("mllm", "mrlora", True), ("knn", "mrlora_knn", True)])
def test_every_router_kind_and_continuous_batching_answer_as_the_offline_evaluation(
        tiny_run, tiny_engine, dcl_shards, offline, kind, method, continuous):
    """The plain servicer (``clsvc serve --local``) with ``router_kind`` and ``continuous``: all twelve test
    requests at once get the expert, the answer (and for the MLLM router, its raw output) that the run's offline
    evaluation of ``method`` gave, with the answer's token counts."""
    from concurrent.futures import ThreadPoolExecutor

    from cl_service.serve.client import Client
    from cl_service.serve.service import ContinualLearningServicer, build_server

    servicer = ContinualLearningServicer(tiny_run, tiny_engine, router_kind=kind, continuous=continuous, watch_s=0,
                                         expert__max_batch_size=4)
    server, port = build_server(servicer, 0)
    server.start()
    try:
        items = _test_items(dcl_shards)
        with Client(f"127.0.0.1:{port}") as c, ThreadPoolExecutor(len(items)) as pool:
            live = list(pool.map(lambda ts: c.predict(ts[1].images, ts[1].question, timeout=60), items))
    finally:
        server.stop(None)
        servicer.close()
    refs = {t: offline(t, method) for t in ("RS", "Med")}
    for (t, s), r in zip(items, live):
        ref = refs[t][s.id]
        assert (r.answer, r.expert, r.router.kind) == (ref["text"], ref["metadata"]["expert"], kind), (kind, s.id)
        if kind == "mllm":
            assert r.router.raw_output == ref["metadata"]["router_raw"]
        assert r.usage.prompt_tokens > 0 and 1 <= r.usage.completion_tokens <= 3
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if continuous:
        assert servicer.stages.expert.cont.stats["joined"] == len(items) and servicer.stages.expert.step_log()


def test_clsvc_serve_local_answers_and_stops_cleanly(served, dcl_shards, offline, capsys):
    """``clsvc serve --local`` with a serve config's keys (``router_kind=knn continuous=true``): the gRPC API from
    the command line without Ray, routed answers equal to the offline evaluation of ``mrlora_knn``; SIGTERM stops
    it. Keys only a Ray deployment can honour are refused by name."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "cl_service.cli", "serve", "--local", "--results",
                             str(served["out"]), "--port", "0", "--max-batch", "4", "router_kind=knn",
                             "continuous=true"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # blocks until the server is up (or the process died)
        assert "on 127.0.0.1:" in line and "router knn, continuous batching" in line, \
            (line, proc.stderr.read() if proc.poll() is not None else "")
        port = int(line.split("127.0.0.1:")[1].split()[0])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = served["pb2_grpc"].ContinualLearningStub(ch)
            for t, s in _test_items(dcl_shards)[::3]:
                r = stub.Predict(served["pb2"].PredictRequest(images=list(s.images), question=s.question), timeout=60)
                ref = offline(t, "mrlora_knn")[s.id]
                assert (r.answer, r.expert, r.router.kind) == (ref["text"], ref["metadata"]["expert"], "knn")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    from cl_service.cli import main

    for args, needle in [([], "--local needs --results"),
                         (["--results", str(served["out"]), "router.replicas=2", "colocate=true"],
                          "cannot honour colocate=True, router.replicas=2")]:
        assert main(["serve", "--local", *args]) == 2
        assert needle in capsys.readouterr().err


def test_a_request_the_kv_buffers_cannot_hold_gets_resource_exhausted(tiny_run, tiny_engine, dcl_shards):
    """With ``continuous=true``, a request whose keys and values the batcher cannot make room for (the engine's
    ``KVCacheFull``: device memory short) is refused with ``RESOURCE_EXHAUSTED`` (clients retry it later), not
    ``INTERNAL``; the next request is answered."""
    from concurrent.futures import Future

    import grpc

    from cl_service.engine import KVCacheFull
    from cl_service.serve.client import Client
    from cl_service.serve.service import ContinualLearningServicer, build_server

    servicer = ContinualLearningServicer(tiny_run, tiny_engine, router_kind="knn", continuous=True, watch_s=0)
    server, port = build_server(servicer, 0)
    server.start()
    cont = servicer.stages.expert.cont
    real = cont.submit

    def full_once(*a, **kw):
        cont.submit = real  # the next request goes through
        f: Future = Future()
        f.set_exception(KVCacheFull("the key/value buffers cannot grow to hold this request (injected)"))
        return f

    cont.submit = full_once
    try:
        (_, s), *_ = _test_items(dcl_shards)
        with Client(f"127.0.0.1:{port}", retries=0) as c:
            with pytest.raises(grpc.RpcError) as ei:
                c.predict(s.images, s.question, timeout=60)
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, ei.value
            assert "key/value buffers" in ei.value.details() and "retry later" in ei.value.details()
            assert c.predict(s.images, s.question, timeout=60).answer
    finally:
        server.stop(None)
        servicer.close()
