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
    servicer = ContinualLearningServicer(out, tiny_engine, token=TOKEN, limits__max_image_bytes=200_000)
    server, port = build_server(servicer, 0)
    server.start()
    httpd = serve_http(servicer, 0)
    base = f"http://127.0.0.1:{httpd.port}/v1"
    client = openai.OpenAI(base_url=base, api_key=TOKEN, max_retries=0, timeout=60)
    samples = {t: list(ShardDataset(dcl_shards).iter_samples(t, "test")) for t in ("RS", "Med")}
    with Client(f"127.0.0.1:{port}", token=TOKEN) as grpc_client:
        yield {"out": out, "base": base, "openai": client, "grpc": grpc_client, "samples": samples,
               "servicer": servicer, "max_new_tokens": tiny_engine.max_new_tokens}
    client.close()
    httpd.stop()
    server.stop(None)
    servicer.close()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _messages(sample, image_url=None):
    parts = [{"type": "image_url", "image_url": {"url": image_url or _data_url(im)}} for im in sample.images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": sample.question}]}]


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
    """Routed (model=auto), named (task or adapter id) and max_tokens requests: the same answer, expert, router
    output and token counts as the same request over gRPC; the settings of greedy decoding are accepted."""
    cases = [(s, "auto", None) for t in ("RS", "Med") for s in srv["samples"][t][:2]]
    cases += [(srv["samples"]["RS"][0], "Med", None), (srv["samples"]["Med"][1], "expert:RS", 1)]
    for s, model, n in cases:
        kw = {"max_tokens": n} if n else {}
        c = srv["openai"].chat.completions.create(model=model, messages=_messages(s), temperature=0, top_p=1, n=1,
                                                  seed=7, presence_penalty=0, **kw)
        g = srv["grpc"].predict(s.images, s.question, expert=None if model == "auto" else model, max_new_tokens=n)
        assert c.object == "chat.completion" and c.id.startswith("chatcmpl-") and c.created > 0
        assert (c.choices[0].message.content, c.model) == (g.answer, g.expert), (model, s.id)
        assert c.choices[0].message.role == "assistant" and c.choices[0].finish_reason == g.finish_reason
        assert g.finish_reason == "stop" or g.usage.completion_tokens == (n or srv["max_new_tokens"])
        extra = c.model_extra["clsvc"]
        assert extra["expert"] == g.expert and extra["router"]["raw_output"] == g.router.raw_output
        assert extra["router"]["kind"] == ("mllm" if model == "auto" else "request")
        assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (
            g.usage.prompt_tokens, g.usage.completion_tokens, g.usage.total_tokens)
        assert c.usage.prompt_tokens > 16 and 1 <= c.usage.completion_tokens <= (n or 3)


def test_finish_reason_says_whether_the_answer_was_cut_at_max_tokens(srv):
    """An answer the expert ended itself (its EOS within ``max_tokens``) ends with ``stop``; the same request with
    ``max_tokens`` below its length ends with ``length``, over gRPC, in the reply and in the stream's finish chunk."""
    g = srv["grpc"]
    found = [(x, e, a) for e in ("RS", "Med") for x in srv["samples"]["RS"][:4] + srv["samples"]["Med"][:4]
             if 1 < (a := g.predict(x.images, x.question, expert=e, max_new_tokens=16)).usage.completion_tokens < 16]
    assert found, "no answer of the tiny run ends within 16 tokens"
    s, expert, whole = found[0]
    assert whole.finish_reason == "stop"  # ended by its EOS, which completion_tokens counts
    n = whole.usage.completion_tokens - 1  # one token short: the EOS does not fit
    cut = g.predict(s.images, s.question, expert=expert, max_new_tokens=n)
    assert (cut.finish_reason, cut.usage.completion_tokens, cut.answer) == ("length", n, whole.answer), cut
    for tokens, reason in ((n, "length"), (16, "stop")):
        c = srv["openai"].chat.completions.create(model=expert, messages=_messages(s), max_tokens=tokens)
        assert c.choices[0].finish_reason == reason
        chunks = list(srv["openai"].chat.completions.create(model=expert, messages=_messages(s), max_tokens=tokens,
                                                            stream=True))
        assert chunks[-1].choices[0].finish_reason == reason


def test_streaming_sends_the_answer_as_it_is_decoded(srv):
    """``stream=True`` with the real client: a role chunk, the answer in pieces (one per decoded token here),
    a finish chunk and the usage chunk; the pieces add up to the non-streamed answer, for every test request."""
    most = 0
    for t in ("RS", "Med"):
        for s in srv["samples"][t][:3]:
            whole = srv["openai"].chat.completions.create(model="auto", messages=_messages(s))
            chunks = list(srv["openai"].chat.completions.create(model="auto", messages=_messages(s), stream=True,
                                                                stream_options={"include_usage": True}))
            pieces = [c.choices[0].delta.content for c in chunks[1:-2]]
            assert chunks[0].choices[0].delta.role == "assistant" and all(pieces)
            assert "".join(pieces) == whole.choices[0].message.content
            assert len(pieces) <= whole.usage.completion_tokens  # at most a piece per decoded token
            most = max(most, len(pieces))
            assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
            assert {c.model for c in chunks} == {whole.model}
            assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert most >= 2  # answers came in several pieces
    s = srv["samples"]["Med"][0]
    bare = srv["openai"].chat.completions.create(
        model="auto", messages=_messages(s, base64.b64encode(s.images[0]).decode()))
    whole = srv["openai"].chat.completions.create(model="auto", messages=_messages(s))
    assert bare.choices[0].message.content == whole.choices[0].message.content


def test_stream_pieces_are_sent_as_each_token_is_decoded(srv, tiny_engine):
    """The pieces leave the server while the answer is still being decoded: the first arrives before the decode
    has finished (a slowed decode step makes the gap measurable)."""
    import time as _time

    s = srv["samples"]["RS"][0]
    model = tiny_engine.mllm.model
    real = model.forward

    def slow(*a, **kw):
        _time.sleep(0.3)
        return real(*a, **kw)

    model.forward = slow
    try:
        t0 = _time.monotonic()
        arrivals = [(_time.monotonic() - t0, c.choices[0].delta.content) for c in srv["openai"].chat.completions.create(
            model="RS", messages=_messages(s), stream=True, max_tokens=3) if c.choices and c.choices[0].delta.content]
    finally:
        model.forward = real
    assert len(arrivals) >= 2, arrivals
    assert arrivals[-1][0] - arrivals[0][0] >= 0.25, arrivals  # a decode step apart, not one burst at the end


def test_a_stream_that_fails_after_its_first_piece_ends_with_an_error_event(srv, monkeypatch):
    """Once the status line is out, a failure (here: a final answer the pieces sent do not start) is an error
    event in OpenAI's shape and the stream ends without ``[DONE]``, so no client takes it for a whole answer."""
    from cl_service.serve.streaming import StreamMismatch, TextStream

    def mismatch(self, answer):
        raise StreamMismatch("streamed characters that do not start the answer")

    monkeypatch.setattr(TextStream, "end", mismatch)
    s = srv["samples"]["RS"][0]
    req = urllib.request.Request(srv["base"] + "/chat/completions", method="POST", data=json.dumps(
        {"model": "RS", "messages": _messages(s), "stream": True}).encode(), headers={
        "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        events = [line[6:] for line in r.read().decode().split("\n\n") if line.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
    last = json.loads(events[-1])
    assert "[DONE]" not in events and last["error"]["code"] == "internal" and "StreamMismatch" in last["error"][
        "message"], events


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
    ("deeply nested JSON", 400, "invalid_argument", "nested too deeply"),
    ("bad base64", 400, "invalid_argument", "not valid base64"),
    ("corrupt image", 400, "invalid_argument", "not a decodable image"),
    ("http url", 400, "invalid_argument", "fetches no URL"),
    ("no image", 400, "invalid_argument", "at least one image"),
    ("empty question", 400, "invalid_argument", "question: must not be empty"),
    ("assistant turn", 400, "invalid_argument", "user messages only"),
    ("system message", 400, "invalid_argument", "messages[0].role: 'system' messages are not supported"),
    ("max_tokens", 400, "invalid_argument", "max_tokens: 100000 is outside [1, 256]"),
    ("max_tokens differ", 400, "invalid_argument", "max_tokens and max_completion_tokens differ"),
    ("n", 400, "invalid_argument", "n: 2 is not supported; only 1"),
    ("temperature", 400, "invalid_argument", "temperature: 0.7 is not supported; only 0: answers are greedy"),
    ("top_p", 400, "invalid_argument", "top_p: 0.9 is not supported"),
    ("stop", 400, "invalid_argument", "stop: [\"\\n\"] is not supported; stop sequences"),
    ("logprobs", 400, "invalid_argument", "logprobs: true is not supported"),
    ("presence_penalty", 400, "invalid_argument", "presence_penalty: 0.5 is not supported"),
    ("tools", 400, "invalid_argument", "tools: "),
    ("response_format", 400, "invalid_argument", "response_format: "),
    ("unknown field", 400, "invalid_argument", "frobnicate: unknown field"),
    ("stream_options alone", 400, "invalid_argument", "stream_options: only with stream: true"),
    ("image detail", 400, "invalid_argument", "detail 'auto'"),
    ("unknown expert", 404, "not_found", "unknown expert 'Nope'; known experts: RS, Med"),
    ("oversized image", 413, "request_too_large", "over the limit of 200000"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(srv, case, status, code, needle):
    """Every field is honoured or refused with a 400 naming it; bad input of every kind gets OpenAI's error shape."""
    s0 = srv["samples"]["RS"][0]
    body = {
        "malformed JSON": b'{"model": "auto", "messages": [',
        "not an object": b"[1, 2]",
        "deeply nested JSON": b'{"model": "auto", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "bad base64": _body(srv, url="data:image/png;base64,@@@not-base64@@@"),
        "corrupt image": _body(srv, url=_data_url(b"definitely not an image")),
        "http url": _body(srv, url="https://example.com/chart.png"),
        "no image": _body(srv, content="what is shown?"),
        "empty question": _body(srv, content=[{"type": "image_url", "image_url": {"url": _data_url(s0.images[0])}}]),
        "assistant turn": {"model": "auto", "messages": [*_body(srv)["messages"],
                                                         {"role": "assistant", "content": "hi"}]},
        "system message": {"model": "auto", "messages": [{"role": "system", "content": "answer in French"},
                                                         *_body(srv)["messages"]]},
        "max_tokens": _body(srv, max_tokens=100_000),
        "max_tokens differ": _body(srv, max_tokens=2, max_completion_tokens=3),
        "n": _body(srv, n=2),
        "temperature": _body(srv, temperature=0.7),
        "top_p": _body(srv, top_p=0.9),
        "stop": _body(srv, stop=["\n"]),
        "logprobs": _body(srv, logprobs=True),
        "presence_penalty": _body(srv, presence_penalty=0.5),
        "tools": _body(srv, tools=[{"type": "function", "function": {"name": "f"}}]),
        "response_format": _body(srv, response_format={"type": "json_object"}),
        "unknown field": _body(srv, frobnicate=1),
        "stream_options alone": _body(srv, stream_options={"include_usage": True}),
        "image detail": {"model": "auto", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(s0.images[0]), "detail": "high"}},
            {"type": "text", "text": s0.question}]}]},
        "unknown expert": _body(srv, model="Nope"),
        "oversized image": _body(srv, url=_data_url(_noise_png(300))),  # ~270 kB > the 200 kB limit
    }[case]
    got, reply = _post(srv, body)
    assert got == status, reply
    err = reply["error"]
    assert err["code"] == code and needle in err["message"] and "Traceback" not in err["message"], err
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert _post(srv, {"model": "RS", "messages": _messages(s0)})[1]["model"] == "RS"


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


def test_slow_and_surplus_clients_are_bounded_and_the_server_keeps_answering(srv):
    """Two threads, one waiting place, one second to send a request: a client that trickles its headers in (a
    byte every 0.2 s) is cut off at the deadline, a connection past threads and waiting places gets 503 at once,
    the one that waited is answered, and afterwards the server answers as before."""
    import socket
    import threading
    import time as _time

    from cl_service.serve.http_server import serve_http

    httpd = serve_http(srv["servicer"], 0, max_threads=2, max_pending=1, timeout_s=1.0)
    s = srv["samples"]["RS"][0]
    body = json.dumps({"model": "RS", "messages": _messages(s)}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body

    def connect():
        return socket.create_connection(("127.0.0.1", httpd.port), timeout=10)

    def reply(sock) -> bytes:
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
            if b"\r\n\r\n" in out:
                head, _, rest = out.partition(b"\r\n\r\n")
                n = [int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")]
                if n and len(rest) >= n[0]:
                    break
        return out

    try:
        loris_done: list[float] = []

        def loris(sock) -> None:  # a header byte every 0.2 s, never the end of the request
            t0 = _time.monotonic()
            try:
                for b in b"POST /v1/chat/completions HTTP/1.1\r\nX-Slow: " + b"a" * 100:
                    sock.send(bytes([b]))
                    _time.sleep(0.2)
            except OSError:  # the server closed it
                loris_done.append(_time.monotonic() - t0)

        slow = [connect(), connect()]  # both threads taken
        threads = [threading.Thread(target=loris, args=(c,)) for c in slow]
        for t in threads:
            t.start()
        _time.sleep(0.2)
        waiting = connect()  # the one waiting place
        waiting.sendall(request)
        _time.sleep(0.2)
        extra = connect()  # nothing left: refused at once
        assert reply(extra).startswith(b"HTTP/1.1 503") and httpd.refused == 1
        extra.close()
        answered = reply(waiting)  # served once a slow client was cut off
        assert answered.startswith(b"HTTP/1.1 200") and b'"model":"RS"' in answered, answered[:300]
        for t in threads:
            t.join(15)
        assert len(loris_done) == 2 and all(0.8 < d < 5 for d in loris_done), loris_done
        for c in slow + [waiting]:
            c.close()
        again = connect()
        again.sendall(request)
        assert reply(again).startswith(b"HTTP/1.1 200")
        again.close()
    finally:
        httpd.stop()


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
