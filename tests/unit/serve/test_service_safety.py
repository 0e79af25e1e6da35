"""Safe serving on the plain gRPC server over a tiny 2-task run (RS, Med): the token budget is checked before a
request joins a batch, and a row that fails inside a batch fails alone; a retrained expert or router shows its
new version; TLS with a self-signed certificate; the shared token; the message-size limit; no serving beyond
loopback without a token."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from cl_service.data.shards import ShardDataset

pytestmark = pytest.mark.timeout(180)


@contextmanager
def _serving(run, engine, **kw):
    """A started server over ``run``; ``kw``: servicer keywords, plus build_server's token/tls_cert/tls_key."""
    from cl_service.serve.service import ContinualLearningServicer, build_server

    server_kw = {k: kw.pop(k) for k in ("token", "tls_cert", "tls_key") if k in kw}
    kw.setdefault("max_image_bytes", 200_000)
    kw.setdefault("watch_s", 0)
    servicer = ContinualLearningServicer(run, engine, **kw)
    server, port = build_server(servicer, 0, **server_kw)
    server.start()
    try:
        yield servicer, port
    finally:
        server.stop(None)
        servicer.close()


def _samples(dcl_shards, task, n):
    return list(ShardDataset(dcl_shards).iter_samples(task, "test"))[:n]


def _pb2():
    from cl_service.serve.proto import load

    return load()


def _request(sample, images=None, **kw):
    pb2, _ = _pb2()
    return pb2.PredictRequest(images=list(images if images is not None else sample.images), question=sample.question,
                              **kw)


# ---------------------------------------------------------------------------------------------- token budget
def test_a_request_over_the_token_budget_fails_alone_and_its_batch_mates_are_answered(tiny_run, tiny_base,
                                                                                      dcl_shards):
    """Twelve images (over the model's max_length) sent with seven valid requests. The big one gets
    INVALID_ARGUMENT before batching; the seven get the answers they get alone. Below validation, a row that
    raises inside the batched model call fails alone too."""
    from cl_service.engine.engine import Engine
    from cl_service.serve.client import Client
    from cl_service.serve.service import _Done, _Job

    engine = Engine(tiny_base)
    engine.max_new_tokens = 3
    # The test base has 16 image tokens per image: at max_length 190, twelve images (192 tokens) overflow as
    # they do on the tiny profile (64 tokens per image, max_length 320); one image and a question fit.
    engine.mllm.cfg = dataclasses.replace(engine.mllm.cfg, max_length=190)
    valid = _samples(dcl_shards, "RS", 4) + _samples(dcl_shards, "Med", 3)
    big = dataclasses.replace(valid[0], images=list(valid[0].images) * 12)
    with _serving(tiny_run, engine, max_batch=8, batch_wait_ms=300) as (servicer, port), \
            Client(f"127.0.0.1:{port}") as c:
        reqs = [_request(s, expert="RS") if i % 2 else _request(s) for i, s in enumerate(valid)]
        alone = [c.stub.Predict(r, timeout=60) for r in reqs]
        with ThreadPoolExecutor(8) as ex:
            futs = [ex.submit(c.stub.Predict, r, timeout=60) for r in reqs + [_request(big)]]
            together = [f.result() for f in futs[:7]]
            with pytest.raises(grpc.RpcError) as ei:
                futs[7].result()
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "12 image(s) x 16 image tokens" in ei.value.details() and "max_length of 190" in ei.value.details()
        assert [(r.answer, r.expert) for r in together] == [(r.answer, r.expert) for r in alone]

        # The same batch straight into the pipeline (no validation): the model call raises for the big row only.
        cat = servicer.model.catalog
        jobs = [_Job(s, None, cat, None, "mllm") for s in valid] + [_Job(big, None, cat, None, "mllm")]
        before = len(servicer.pipeline.log)
        out = servicer.pipeline.map(jobs, timeout_s=120)
        assert max(n for s, _, _, n in servicer.pipeline.log[before:] if s == 1) == 8  # one batch
        assert isinstance(out[7], ValueError) and "do not fit max_length=190" in str(out[7])
        assert all(isinstance(d, _Done) for d in out[:7])
        routed = [i for i, r in enumerate(reqs) if not r.HasField("expert")]
        assert [(out[i].answer, out[i].expert.task) for i in routed] == [(alone[i].answer, alone[i].expert)
                                                                          for i in routed]


# ---------------------------------------------------------------------------------------------- versions
def _republish(final: Path, files_from: Path) -> int:
    """Publish ``files_from``'s weights under ``final``'s identity, as a retrain does; the new version."""
    from cl_service.adapters.registry import commit_dir, finalize_adapter, publish_dir

    meta = json.loads((final / "adapter.json").read_text())
    stage = publish_dir(final)
    for f in files_from.iterdir():
        if f.is_file() and f.name != "adapter.json":
            shutil.copy2(f, stage / f.name)
    (stage / "retrain.txt").write_text("retrained")
    new = finalize_adapter(stage, **{k: meta[k] for k in ("id", "kind", "task", "description", "base", "job_key")})
    commit_dir(stage, final)
    return new["version"]


def _eventually(fn, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_a_retrained_expert_and_router_get_the_next_version_and_the_expert_its_new_weights(tiny_run, tiny_engine,
                                                                                          dcl_shards, tmp_path):
    from cl_service.serve.client import Client

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    sample = _samples(dcl_shards, "Med", 1)[0]
    with _serving(run, tiny_engine, watch_s=0.2) as (servicer, port), Client(f"127.0.0.1:{port}") as c:
        def versions():
            return {e.task: e.adapter_version for e in c.list_experts().experts}

        assert versions() == {"RS": 1, "Med": 1} and servicer.model.catalog.router_version == 1
        med = c.predict(sample.images, sample.question, expert="Med").answer
        experts = run / "adapters" / "experts"
        assert _republish(experts / "RS", experts / "Med") == 2  # RS retrained (here: to Med's weights)
        assert _eventually(lambda: versions() == {"RS": 2, "Med": 1}), versions()
        assert c.predict(sample.images, sample.question, expert="RS").answer == med
        router = servicer.model.catalog.router_dir
        assert _republish(router, router) == 2
        assert _eventually(lambda: servicer.model.catalog.router_version == 2)
        assert c.predict(sample.images, sample.question).router.kind == "mllm"


# ---------------------------------------------------------------------------------------------- TLS
def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 / localhost and its key (cryptography if installed, else the openssl CLI)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither cryptography nor the openssl CLI is available to make a test certificate")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True,
                       timeout=60)
        return cert, key
    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    c = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
         .sign(k, hashes.SHA256()))
    cert.write_bytes(c.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return cert, key


def test_tls_with_a_self_signed_certificate(tiny_run, tiny_engine, dcl_shards, tmp_path, capsys):
    from cl_service.cli import main
    from cl_service.serve.client import Client

    cert, key = _self_signed(tmp_path)
    sample = _samples(dcl_shards, "RS", 1)[0]
    with _serving(tiny_run, tiny_engine, tls_cert=str(cert), tls_key=str(key)) as (_, port):
        with Client(f"127.0.0.1:{port}", tls_ca=str(cert)) as c:
            assert c.predict(sample.images, sample.question, expert="RS").expert == "RS"
            assert c.health() == "SERVING"
        with Client(f"127.0.0.1:{port}", retries=0) as plain, pytest.raises(grpc.RpcError) as ei:
            plain.list_experts(timeout=10)  # a plaintext client cannot talk to a TLS server (UNAVAILABLE: no retry)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        capsys.readouterr()
        assert main(["predict", "--address", f"127.0.0.1:{port}", "--tls-ca", str(cert), "--list"]) == 0
        assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == ["RS", "Med"]
    from cl_service.serve.service import ContinualLearningServicer, build_server

    servicer = ContinualLearningServicer(tiny_run, tiny_engine, watch_s=0)
    try:
        with pytest.raises(ValueError, match="both a certificate and its key"):
            build_server(servicer, 0, tls_cert=str(cert))
        with pytest.raises(ValueError, match="cannot read the TLS key"):
            build_server(servicer, 0, tls_cert=str(cert), tls_key=str(tmp_path / "missing.pem"))
    finally:
        servicer.close()


# ---------------------------------------------------------------------------------------------- token, size, host
def test_the_token_is_checked_before_the_request_and_health_stays_open(tiny_run, tiny_engine, dcl_shards):
    from cl_service.serve.client import Client

    sample = _samples(dcl_shards, "Med", 1)[0]
    with _serving(tiny_run, tiny_engine, token="s3cret") as (servicer, port):
        for token in (None, "wrong", "s3cre"):
            with Client(f"127.0.0.1:{port}", token=token) as c, pytest.raises(grpc.RpcError) as ei:
                c.predict(sample.images, sample.question)
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Traceback" not in ei.value.details()
        log = len(servicer.pipeline.log)
        with Client(f"127.0.0.1:{port}") as c, pytest.raises(grpc.RpcError) as ei:
            c.stub.Predict(_request(sample, images=[b"\0" * 150_000] * 16), timeout=30)  # refused unread
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED and len(servicer.pipeline.log) == log
        with Client(f"127.0.0.1:{port}") as c:
            assert c.health() == "SERVING"
        with Client(f"127.0.0.1:{port}", token="s3cret") as c:
            assert c.predict(sample.images, sample.question, expert="Med").expert == "Med"


def test_a_message_over_the_limits_is_refused_by_grpc_and_the_server_keeps_serving(tiny_run, tiny_engine,
                                                                                   dcl_shards):
    from cl_service.serve.client import Client
    from cl_service.serve.security import grpc_message_limit

    sample = _samples(dcl_shards, "Med", 1)[0]
    with _serving(tiny_run, tiny_engine, max_images=2) as (servicer, port), Client(f"127.0.0.1:{port}") as c:
        limit = grpc_message_limit(servicer.limits)
        assert 400_000 < limit < 500_000  # 2 images of 200 kB + the question + framing
        with pytest.raises(grpc.RpcError) as ei:
            c.stub.Predict(_request(sample, images=[b"x" * (limit + 1)]), timeout=30)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert c.predict(sample.images, sample.question, expert="Med").expert == "Med"


def test_no_serving_beyond_loopback_without_a_token(tiny_run, tiny_engine):
    from cl_service.serve.security import InsecureExposure, is_loopback, require_safe_exposure
    from cl_service.serve.service import ContinualLearningServicer, build_server

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "", "10.1.2.3", "example.org"))
    for host in ("0.0.0.0", "::", "192.168.1.7"):
        with pytest.raises(InsecureExposure, match="--insecure"):
            require_safe_exposure(host, None, False)
        require_safe_exposure(host, "token", False)
        require_safe_exposure(host, None, True)
    servicer = ContinualLearningServicer(tiny_run, tiny_engine, watch_s=0)
    try:
        with pytest.raises(InsecureExposure, match="without a token"):
            build_server(servicer, 0, host="0.0.0.0")
    finally:
        servicer.close()
    out = subprocess.run([sys.executable, "-m", "cl_service.cli", "serve", "--local", "--results", str(tiny_run),
                          "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "CLSVC_TOKEN": ""})
    assert out.returncode == 2 and "without a token" in out.stderr and "Traceback" not in out.stderr
