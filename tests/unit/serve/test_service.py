"""gRPC round trip of the plain servicer on a tiny 2-task run (RS, Med): Predict, ListExperts, health, bad input."""

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
    servicer = ContinualLearningServicer(out, engine, max_image_bytes=200_000)
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
    log = served["servicer"].pipeline.log
    before = len(log)
    with ThreadPoolExecutor(len(reqs)) as ex:
        together = list(ex.map(lambda r: served["stub"].Predict(r, timeout=60), reqs))
    assert [(r.answer, r.expert, r.router.kind) for r in together] == \
        [(r.answer, r.expert, r.router.kind) for r in alone]
    assert max(n for s, _, _, n in log[before:] if s == 2) > 1  # some requests shared a batch


def test_clsvc_serve_local_answers_and_stops_cleanly(served):
    """``clsvc serve --local``: the gRPC API from the command line without Ray; SIGTERM stops it."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "cl_service.cli", "serve", "--local", "--results",
                             str(served["out"]), "--port", "0", "--max-batch", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # blocks until the server is up (or the process died)
        assert "on 127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        port = int(line.split("127.0.0.1:")[1].split()[0])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = served["pb2_grpc"].ContinualLearningStub(ch)
            r = stub.Predict(_req(served, expert="Med"), timeout=60)
            assert r.expert == "Med" and r.answer == served["stub"].Predict(_req(served, expert="Med"), timeout=60).answer
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    bad = subprocess.run([sys.executable, "-m", "cl_service.cli", "serve", "--local"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and "--local needs --results" in bad.stderr
