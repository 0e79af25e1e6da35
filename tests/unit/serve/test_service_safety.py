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

    server_kw = {k: kw.pop(k) for k in ("tls_cert", "tls_key") if k in kw}
    kw.setdefault("limits__max_image_bytes", 200_000)
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
    import asyncio

    from cl_service.engine.engine import Engine
    from cl_service.serve.client import Client
    from cl_service.serve.stages import Answer

    engine = Engine(tiny_base)
    engine.max_new_tokens = 3
    # The test base has 16 image tokens per image: at max_length 190, twelve images (192 tokens) overflow as
    # they do on the tiny profile (64 tokens per image, max_length 320); one image and a question fit.
    engine.mllm.cfg = dataclasses.replace(engine.mllm.cfg, max_length=190)
    valid = _samples(dcl_shards, "RS", 4) + _samples(dcl_shards, "Med", 3)
    big = dataclasses.replace(valid[0], images=list(valid[0].images) * 12)
    with _serving(tiny_run, engine, router__max_batch_size=8, expert__max_batch_size=8, router__batch_wait_ms=300,
                  limits__max_images=12) as (servicer, port), Client(f"127.0.0.1:{port}") as c:
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

        # The same rows straight into stage two's batch (no validation): the model call raises for the big row only.
        import cl_service.serve.stages as stages_mod

        expert, path = servicer.stages.expert, str(servicer.catalog.find("Med").path)

        async def batch(rows):
            return await asyncio.gather(*[expert.answer(s, path, None) for s in rows], return_exceptions=True)

        admit, stages_mod.admit = stages_mod.admit, lambda *a: 1  # every row taken as fitting
        try:
            before = len(expert.batch_log())
            out = servicer.run(batch(valid + [big]))
        finally:
            stages_mod.admit = admit
        assert max(n for *_, n in expert.batch_log()[before:]) == 8  # one batch
        assert isinstance(out[7], ValueError) and "do not fit max_length=190" in str(out[7])
        assert all(isinstance(a, Answer) for a in out[:7])
        assert [a.text for a in out[:7]] == [a.text for a in servicer.run(batch(valid))]


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

        assert versions() == {"RS": 1, "Med": 1} and servicer.catalog.router_version == 1
        med = c.predict(sample.images, sample.question, expert="Med").answer
        experts = run / "adapters" / "experts"
        assert _republish(experts / "RS", experts / "Med") == 2  # RS retrained (here: to Med's weights)
        assert _eventually(lambda: versions() == {"RS": 2, "Med": 1}), versions()
        assert c.predict(sample.images, sample.question, expert="RS").answer == med
        router = servicer.catalog.router_dir
        assert _republish(router, router) == 2
        assert _eventually(lambda: servicer.catalog.router_version == 2)
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
def _noise_png(size: int, seed: int = 0) -> bytes:
    """A PNG of random pixels (incompressible: about 3 x size**2 bytes)."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_the_token_is_checked_before_the_request_and_health_stays_open(tiny_run, tiny_engine, dcl_shards):
    from cl_service.serve.client import Client

    sample = _samples(dcl_shards, "Med", 1)[0]
    from cl_service.serve.catalog import DECODED

    with _serving(tiny_run, tiny_engine, token="s3cret") as (servicer, port):
        for token in (None, "wrong", "s3cre"):
            with Client(f"127.0.0.1:{port}", token=token) as c, pytest.raises(grpc.RpcError) as ei:
                c.predict(sample.images, sample.question)
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Traceback" not in ei.value.details()
        seen, decoded = servicer.core.stats["calls"], DECODED["images"]
        # every image valid and just under the 200 kB limit, as many as allowed: the most a caller may send
        huge = _request(sample, images=[_noise_png(250, seed) for seed in range(servicer.limits.max_images)])
        assert huge.ByteSize() > 0.9 * servicer.limits.max_images * servicer.limits.max_image_bytes
        with Client(f"127.0.0.1:{port}") as c, pytest.raises(grpc.RpcError) as ei:
            c.stub.Predict(huge, timeout=30)  # refused unread
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (servicer.core.stats["calls"], DECODED["images"]) == (seen, decoded)  # refused before the handler
        with Client(f"127.0.0.1:{port}", token="s3cret") as c:  # the same request with the token: decoded
            assert c.stub.Predict(huge, timeout=30, metadata=c.metadata).expert in ("RS", "Med")
        assert DECODED["images"] == decoded + servicer.limits.max_images
        with Client(f"127.0.0.1:{port}") as c:
            assert c.health() == "SERVING"
        with Client(f"127.0.0.1:{port}", token="s3cret") as c:
            assert c.predict(sample.images, sample.question, expert="Med").expert == "Med"


def test_a_message_over_the_limits_is_refused_by_grpc_and_the_server_keeps_serving(tiny_run, tiny_engine,
                                                                                   dcl_shards):
    from cl_service.serve.client import Client
    from cl_service.serve.security import grpc_message_limit

    sample = _samples(dcl_shards, "Med", 1)[0]
    with _serving(tiny_run, tiny_engine, limits__max_images=2) as (servicer, port), Client(f"127.0.0.1:{port}") as c:
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
    from cl_service.serve.http_server import OpenAIHTTPServer

    servicer = ContinualLearningServicer(tiny_run, tiny_engine, watch_s=0)
    try:
        with pytest.raises(InsecureExposure, match="without a token"):
            OpenAIHTTPServer(servicer, 0, "0.0.0.0")
    finally:
        servicer.close()
    out = subprocess.run([sys.executable, "-m", "cl_service.cli", "serve", "--local", "--results", str(tiny_run),
                          "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "CLSVC_TOKEN": ""})
    assert out.returncode == 2 and "without a token" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------------- error messages
def _no_server_path(message: str, *folders: Path) -> None:
    import re

    assert not any(str(f) in message for f in folders), message
    assert "/adapters/" not in message and "/routers/" not in message and ".safetensors" not in message, message
    assert not re.search(r"(?:^|[\s'\"(=])/(?:[\w.-]+/)+", message), message  # no absolute path at all


def test_no_error_message_names_a_server_path(tiny_base, tiny_run, dcl_shards, tmp_path):
    """Every kind of failure a client can meet, over gRPC and HTTP: a bad image, an unknown expert, an expert
    whose adapter no longer verifies, a feature router whose weights no longer verify, a run without the router
    asked for, an internal error whose exception names a file, a missing token. Each is refused with its status
    and a message that names no file or folder of the server (the log has them)."""
    from cl_service.engine.engine import Engine
    from cl_service.serve.client import Client
    from cl_service.serve.http_server import serve_http

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    knn = run / "routers" / "knn" / "stage-1-Med" / "router.safetensors"  # the one the catalog serves
    knn.write_bytes(knn.read_bytes()[:-8] + b"\0" * 8)
    shutil.rmtree(run / "routers" / "ridge")
    engine = Engine(tiny_base)
    engine.max_new_tokens = 3
    sample = _samples(dcl_shards, "RS", 1)[0]
    seen = {}
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_run, damaged)
    for kind in ("mllm", "knn", "ridge"):
        folder = damaged if kind == "mllm" else run
        with _serving(folder, engine, router_kind=kind, token="t0ken") as (servicer, port), \
                Client(f"127.0.0.1:{port}", token="t0ken") as c:
            if kind == "mllm":  # damaged after the server took it into its catalog
                for f in (damaged / "adapters" / "experts" / "Med").glob("*.safetensors"):
                    f.write_bytes(f.read_bytes()[:-8] + b"\0" * 8)
            cases = {"mllm": [("bad image", dict(images=[b"not an image"])), ("unknown expert", dict(expert="Nope")),
                              ("adapter", dict(expert="Med"))],
                     "knn": [("feature router", {})], "ridge": [("no router", {})]}[kind]
            for name, kw in cases:
                with pytest.raises(grpc.RpcError) as ei:
                    c.predict(kw.get("images", sample.images), sample.question, expert=kw.get("expert"))
                seen[name] = (ei.value.code(), ei.value.details())
            if kind == "mllm":
                with Client(f"127.0.0.1:{port}") as anonymous, pytest.raises(grpc.RpcError) as ei:
                    anonymous.predict(sample.images, sample.question)
                seen["token"] = (ei.value.code(), ei.value.details())
                httpd = serve_http(servicer, 0)

                def http(model: str) -> tuple[int, str]:
                    import base64
                    import urllib.error
                    import urllib.request

                    url = "data:image/png;base64," + base64.b64encode(sample.images[0]).decode()
                    body = {"model": model, "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": sample.question}]}]}
                    headers = {"Authorization": "Bearer t0ken", "Content-Type": "application/json"}
                    req = urllib.request.Request(f"http://127.0.0.1:{httpd.port}/v1/chat/completions", method="POST",
                                                 data=json.dumps(body).encode(), headers=headers)
                    with pytest.raises(urllib.error.HTTPError) as he:
                        urllib.request.urlopen(req, timeout=60)
                    return he.value.code, json.loads(he.value.read())["error"]["message"]

                real = engine.answer_mixed

                def broken(*a, **kw):
                    raise OSError(f"cannot read {damaged}/adapters/experts/RS/adapter_model.safetensors")

                try:
                    seen["http adapter"] = http("Med")
                    engine.answer_mixed = broken
                    with pytest.raises(grpc.RpcError) as ei:
                        c.predict(sample.images, sample.question, expert="RS")
                    seen["internal"] = (ei.value.code(), ei.value.details())
                    seen["http internal"] = http("RS")
                finally:
                    engine.answer_mixed = real
                    httpd.stop()
    C = grpc.StatusCode
    assert {k: v[0] for k, v in seen.items()} == {
        "bad image": C.INVALID_ARGUMENT, "unknown expert": C.NOT_FOUND, "adapter": C.FAILED_PRECONDITION,
        "token": C.UNAUTHENTICATED, "internal": C.INTERNAL, "http adapter": 400, "http internal": 500,
        "feature router": C.FAILED_PRECONDITION, "no router": C.FAILED_PRECONDITION}, seen
    assert "expert 'Med'" in seen["adapter"][1] and "knn router" in seen["feature router"][1], seen
    for _, message in seen.values():
        _no_server_path(message, run, damaged, tmp_path, tiny_base)


def test_decoding_runs_off_the_event_loop(tiny_run, tiny_engine, dcl_shards, monkeypatch):
    """While one request's images (and, over HTTP, its JSON and base64) are decoded, the event loop that takes
    requests keeps running: a ticker on it is not held up by a slow decode (0.5 s here)."""
    import asyncio

    import cl_service.serve.core as core_mod
    import cl_service.serve.openai_api as api_mod

    sample = _samples(dcl_shards, "RS", 1)[0]
    real_parse, real_chat = core_mod.parse_predict, api_mod.Exchange.parse

    def slow(fn):
        def run(*a):
            time.sleep(0.5)  # holds the thread it runs on, as a decode of big images does
            return fn(*a)
        return run

    monkeypatch.setattr(core_mod, "parse_predict", slow(real_parse))
    monkeypatch.setattr(api_mod.Exchange, "parse", slow(real_chat))
    with _serving(tiny_run, tiny_engine) as (servicer, _):
        async def ticking(work) -> float:
            gaps, last, done = [], time.monotonic(), asyncio.ensure_future(work)
            while not done.done():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now
            await done
            return max(gaps)

        import base64

        from cl_service.serve.openai_api import Exchange, respond

        grpc_gap = servicer.run(ticking(servicer.core.predict(_request(sample, expert="RS"), ())))
        body = json.dumps({"model": "RS", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
                sample.images[0]).decode()}}, {"type": "text", "text": sample.question}]}]}).encode()
        ex = Exchange("POST", "/v1/chat/completions", {}, servicer.limits)
        http_gap = servicer.run(ticking(respond(servicer.core, ex, body)))
    assert grpc_gap < 0.25 and http_gap < 0.25, (grpc_gap, http_gap)
