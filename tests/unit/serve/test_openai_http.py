"""OpenAI-compatible HTTP of ``clsvc serve --local`` on a tiny 2-task run (RS, Med): the real ``openai`` client
and plain urllib against the stdlib server, answers equal to gRPC's, and every refusal in OpenAI's error shape."""

import base64
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import openai  # the dev extra's real client
import pytest
import torch
from PIL import Image

from cl_service.data.shards import ShardDataset

pytestmark = pytest.mark.timeout(120)

TOKEN = "http-test-token"


@pytest.fixture(scope="module")
def srv(tiny_run, tiny_engine, dcl_shards):
    from cl_service.serve.client import Client
    from cl_service.serve.http_server import serve_http
    from cl_service.serve.service import ContinualLearningServicer, build_server

    out = tiny_run  # the session's finished RS, Med run (conftest.py)
    servicer = ContinualLearningServicer(out, tiny_engine, max_image_bytes=200_000)
    server, port = build_server(servicer, 0)
    server.start()
    httpd = serve_http(servicer, 0, token=TOKEN)
    base = f"http://127.0.0.1:{httpd.port}/v1"
    client = openai.OpenAI(base_url=base, api_key=TOKEN, max_retries=0, timeout=60)
    samples = {t: list(ShardDataset(dcl_shards).iter_samples(t, "test")) for t in ("RS", "Med")}
    with Client(f"127.0.0.1:{port}") as grpc_client:
        yield {"out": out, "base": base, "openai": client, "grpc": grpc_client, "samples": samples}
    client.close()
    httpd.stop()
    server.stop(None)
    servicer.close()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _messages(sample, image_url=None):
    parts = [{"type": "image_url", "image_url": {"url": image_url or _data_url(im)}} for im in sample.images]
    return [{"role": "system", "content": "ignored: the run fixes the prompt"},
            {"role": "user", "content": [*parts, {"type": "text", "text": sample.question}]}]


def _post(srv, body, token=TOKEN, path="/chat/completions", method="POST", headers=None):
    """``(status, parsed JSON body)`` of a plain HTTP request."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(srv["base"] + path, data=data if method == "POST" else None, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_openai_client_answers_equal_grpc_answers(srv):
    """Routed (model=auto), named (task or adapter id) and max_tokens requests: the same answer, expert and
    router output as the same request over gRPC."""
    cases = [(s, "auto", None) for t in ("RS", "Med") for s in srv["samples"][t][:2]]
    cases += [(srv["samples"]["RS"][0], "Med", None), (srv["samples"]["Med"][1], "expert:RS", 1)]
    for s, model, n in cases:
        kw = {"max_tokens": n} if n else {}
        c = srv["openai"].chat.completions.create(model=model, messages=_messages(s), **kw)
        g = srv["grpc"].predict(s.images, s.question, expert=None if model == "auto" else model, max_new_tokens=n)
        assert c.object == "chat.completion" and c.id.startswith("chatcmpl-") and c.created > 0
        assert (c.choices[0].message.content, c.model) == (g.answer, g.expert), (model, s.id)
        assert c.choices[0].message.role == "assistant" and c.choices[0].finish_reason == "stop"
        extra = c.model_extra["clsvc"]
        assert extra["expert"] == g.expert and extra["router"]["raw_output"] == g.router.raw_output
        assert extra["router"]["kind"] == ("mllm" if model == "auto" else "request")


def test_streaming_and_plain_base64_give_the_same_answer(srv):
    s = srv["samples"]["Med"][0]
    whole = srv["openai"].chat.completions.create(model="auto", messages=_messages(s))
    chunks = list(srv["openai"].chat.completions.create(model="auto", messages=_messages(s), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop" and {c.model for c in chunks} == {whole.model}
    bare = srv["openai"].chat.completions.create(
        model="auto", messages=_messages(s, base64.b64encode(s.images[0]).decode()))
    assert bare.choices[0].message.content == whole.choices[0].message.content


def test_models_list_the_catalog(srv):
    models = srv["openai"].models.list()
    assert [m.id for m in models.data] == ["auto", "RS", "Med"]
    assert all(m.owned_by == "clsvc" for m in models.data)
    med = srv["openai"].models.retrieve("Med")
    assert med.id == "Med" and med.model_extra["adapter_id"] == "expert:Med" and med.model_extra["description"]
    assert srv["openai"].models.retrieve("expert:RS").id == "RS"
    with pytest.raises(openai.NotFoundError):
        srv["openai"].models.retrieve("Nope")


def test_token_is_required(srv):
    s = srv["samples"]["RS"][0]
    for token in (None, "wrong"):
        status, body = _post(srv, {"model": "auto", "messages": _messages(s)}, token=token)
        assert status == 401 and body["error"]["code"] == "unauthenticated"
        assert body["error"]["type"] == "authentication_error" and "token" in body["error"]["message"]
        assert _post(srv, None, token=token, path="/models", method="GET")[0] == 401
    bad = openai.OpenAI(base_url=srv["base"], api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    status, body = _post(srv, None, token=None, path="/models", method="GET", headers={"x-clsvc-token": TOKEN})
    assert status == 200 and len(body["data"]) == 3


def _noise_png(size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(torch.randint(0, 256, (size, size, 3), dtype=torch.uint8,
                                  generator=torch.Generator().manual_seed(0)).numpy()).save(buf, "PNG")
    return buf.getvalue()


def _body(srv, **change):
    s = srv["samples"]["RS"][0]
    body = {"model": "auto", "messages": _messages(s, change.pop("url", None))}
    if "content" in change:
        body["messages"] = [{"role": "user", "content": change.pop("content")}]
    return {**body, **change}


@pytest.mark.parametrize("case,status,code,needle", [
    ("malformed JSON", 400, "invalid_argument", "not valid JSON"),
    ("not an object", 400, "invalid_argument", "JSON object"),
    ("bad base64", 400, "invalid_argument", "not valid base64"),
    ("corrupt image", 400, "invalid_argument", "not a decodable image"),
    ("http url", 400, "invalid_argument", "fetches no URL"),
    ("no image", 400, "invalid_argument", "at least one image"),
    ("empty question", 400, "invalid_argument", "question: must not be empty"),
    ("assistant turn", 400, "invalid_argument", "user messages only"),
    ("max_tokens", 400, "invalid_argument", "max_tokens: 100000 is outside [1, 256]"),
    ("n", 400, "invalid_argument", "only 1 choice"),
    ("unknown expert", 404, "not_found", "unknown expert 'Nope'; known experts: RS, Med"),
    ("oversized image", 413, "request_too_large", "over the limit of 200000"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(srv, case, status, code, needle):
    body = {
        "malformed JSON": b'{"model": "auto", "messages": [',
        "not an object": b"[1, 2]",
        "bad base64": _body(srv, url="data:image/png;base64,@@@not-base64@@@"),
        "corrupt image": _body(srv, url=_data_url(b"definitely not an image")),
        "http url": _body(srv, url="https://example.com/chart.png"),
        "no image": _body(srv, content="what is shown?"),
        "empty question": _body(srv, content=[{"type": "image_url", "image_url": {"url": _data_url(
            srv["samples"]["RS"][0].images[0])}}]),
        "assistant turn": {"model": "auto", "messages": [*_body(srv)["messages"],
                                                         {"role": "assistant", "content": "hi"}]},
        "max_tokens": _body(srv, max_tokens=100_000),
        "n": _body(srv, n=2),
        "unknown expert": _body(srv, model="Nope"),
        "oversized image": _body(srv, url=_data_url(_noise_png(300))),  # ~270 kB > the 200 kB limit
    }[case]
    got, reply = _post(srv, body)
    assert got == status, reply
    err = reply["error"]
    assert err["code"] == code and needle in err["message"] and "Traceback" not in err["message"]
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    s = srv["samples"]["RS"][0]
    assert _post(srv, {"model": "RS", "messages": _messages(s)})[1]["model"] == "RS"


def test_oversized_body_unknown_path_and_wrong_method(srv):
    host, port = srv["base"].split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")  # announces a 1 GB body and sends none: refused at once
    for k, v in (("Authorization", f"Bearer {TOKEN}"), ("Content-Length", str(10**9))):
        conn.putheader(k, v)
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"
    conn.close()
    assert _post(srv, None, path="/completions", method="GET")[0] == 404
    status, body = _post(srv, {}, path="/models")
    assert status == 405 and "GET" in body["error"]["message"]


def test_clsvc_serve_local_http_port(srv, tmp_path):
    """``clsvc serve --local --http-port 0``: HTTP next to gRPC, ``$CLSVC_TOKEN`` required when set."""
    env = {**os.environ, "CLSVC_TOKEN": "cli-token"}
    proc = subprocess.Popen([sys.executable, "-m", "cl_service.cli", "serve", "--local", "--results", str(srv["out"]),
                             "--port", "0", "--http-port", "0", "--max-batch", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert "OpenAI-compatible HTTP on http://127.0.0.1:" in lines[1], (lines, proc.poll())
        local = {"base": lines[1].split()[3]}
        assert _post(local, None, token=None, path="/models", method="GET")[0] == 401
        s = srv["samples"]["Med"][0]
        status, body = _post(local, {"model": "Med", "messages": _messages(s), "max_tokens": 2}, token="cli-token")
        g = srv["grpc"].predict(s.images, s.question, expert="Med", max_new_tokens=2)
        assert status == 200 and body["choices"][0]["message"]["content"] == g.answer
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_grpc_errors_map_to_http_statuses():
    from cl_service.serve.openai_api import grpc_error

    got = {c: grpc_error(c, "x").status for c in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                                                  grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                  grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                                  grpc.StatusCode.INTERNAL)}
    assert list(got.values()) == [400, 401, 404, 429, 503, 504, 500]
    assert grpc_error(grpc.StatusCode.UNAVAILABLE, "busy").json() == {
        "error": {"message": "busy", "type": "server_error", "param": None, "code": "unavailable"}}
