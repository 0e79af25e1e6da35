"""OpenAI-compatible HTTP on top of the cl.v1 gRPC handlers, free of any HTTP server.

``POST /v1/chat/completions`` becomes a ``cl.v1.PredictRequest`` and ``GET /v1/models`` a ``ListExpertsRequest``;
both are answered by the very ``Predict`` / ``ListExperts`` methods the gRPC transport calls (the plain
servicer's or the Ray Serve ingress's), through :class:`HttpCallContext`, a gRPC servicer context made from
the HTTP headers. So validation, the shared token, routing, limits and errors are those of gRPC; this module
only translates. Two transports use it: ``serve/http_server.py`` (stdlib, ``clsvc serve --local``) and
``on_ray/serve_http.py`` (Serve's HTTP proxy).

Request: ``model`` = ``auto`` (route) or an expert's task name / adapter id; ``messages``: user messages whose
content is a string or OpenAI content parts (``{"type": "text", "text": ...}``, ``{"type": "image_url",
"image_url": {"url": "data:image/png;base64,..."}}``; bare base64 works too; the server fetches no URL).
The user messages' images, in order, are the request's images; their texts, joined by newlines, the question.
System/developer messages are ignored (the run fixes the prompt); assistant/tool turns are refused.
``max_tokens`` / ``max_completion_tokens`` = ``max_new_tokens``; ``n`` must be 1; sampling knobs
(``temperature``, ``top_p``, ...) are ignored: answers are greedy, as in the run's evaluation. ``stream: true``
sends the whole answer as one server-sent-events burst. The reply is a ``chat.completion`` whose ``model`` is
the expert that answered, plus ``clsvc`` (expert, router decision, latency); no ``usage`` (not counted).

Errors are OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``), ``code`` the gRPC status name:
400 invalid argument / failed precondition, 401 unauthenticated, 404 unknown expert or path, 413 an image
over ``limits.max_image_bytes`` or a body over :func:`max_body_bytes`, 429 resource exhausted, 503
unavailable, 504 deadline exceeded, 500 anything else (one line, never a traceback).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

import grpc

from cl_service.serve.auth import check_token
from cl_service.serve.catalog import Limits, RequestError
from cl_service.serve.proto import load as load_proto

log = logging.getLogger(__name__)
pb2, _ = load_proto()

AUTO = "auto"
OWNER = "clsvc"

_C = grpc.StatusCode
_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    _C.INVALID_ARGUMENT: (400, "invalid_request_error"), _C.FAILED_PRECONDITION: (400, "invalid_request_error"),
    _C.OUT_OF_RANGE: (400, "invalid_request_error"), _C.UNAUTHENTICATED: (401, "authentication_error"),
    _C.PERMISSION_DENIED: (403, "permission_error"), _C.NOT_FOUND: (404, "not_found_error"),
    _C.ALREADY_EXISTS: (409, "invalid_request_error"), _C.ABORTED: (409, "server_error"),
    _C.RESOURCE_EXHAUSTED: (429, "rate_limit_error"), _C.UNIMPLEMENTED: (501, "server_error"),
    _C.UNAVAILABLE: (503, "server_error"), _C.DEADLINE_EXCEEDED: (504, "timeout"),
}


@dataclass(frozen=True)
class Reply:
    """An HTTP response, transport-free."""
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    def json(self) -> Any:
        return json.loads(self.body)


class HttpError(Exception):
    """A request refused before it reaches the gRPC handler."""

    def __init__(self, status: int, message: str, code: str = "invalid_argument", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error(status: int, message: str, code: str, kind: str | None = None, param: str | None = None) -> Reply:
    """An OpenAI-shaped error reply."""
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    headers = (("WWW-Authenticate", "Bearer"),) if status == 401 else ()
    return Reply(status, _dumps(body), headers=headers)


def grpc_error(code: grpc.StatusCode, message: str) -> Reply:
    """The HTTP form of a gRPC status (see the module docstring for the table)."""
    status, kind = _HTTP.get(code, (500, "server_error"))
    return error(status, message, code.name.lower(), kind)


def max_body_bytes(limits: Limits) -> int:
    """The largest request body accepted: every image at the limit, base64-encoded, plus the question."""
    b64 = (limits.max_image_bytes + 2) // 3 * 4 + 64  # + the data-URL header
    return limits.max_images * b64 + 6 * limits.max_question_chars + 64 * 1024


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class HttpCallContext:
    """What a gRPC handler sees of its call (``grpc.ServicerContext``'s commonly used part), made from an HTTP
    request: metadata = the headers with lower-case names, ``abort`` raises, ``set_code``/``set_details``
    are recorded for :meth:`Exchange.finish`."""

    def __init__(self, headers: Mapping[str, str], peer: str = "http") -> None:
        self._metadata = tuple((k.lower(), v) for k, v in headers.items())
        self._peer = peer
        self.status: grpc.StatusCode | None = None
        self.message = ""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.status = code

    def set_details(self, details: str) -> None:
        self.message = details

    def code(self) -> grpc.StatusCode | None:
        return self.status

    def details(self) -> str:
        return self.message

    def is_active(self) -> bool:
        return True

    def time_remaining(self) -> float | None:
        return None

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    def send_initial_metadata(self, metadata: Any) -> None:
        pass


@dataclass
class Exchange:
    """One HTTP request on its way to a gRPC handler and back.

    A transport makes one from the request line and headers; when :attr:`reply` is set the request is already
    answered (unknown path 404, wrong method 405, token 401, ``Content-Length`` over :attr:`body_limit` 413).
    Otherwise it reads at most :attr:`body_limit` bytes and calls :meth:`call`: a :class:`Reply`, or
    ``(rpc, request, context)`` with ``rpc`` = ``"Predict"`` / ``"ListExperts"`` for it to invoke (sync or
    async), then :meth:`finish` with the response or :meth:`failed` with the exception it raised.
    """

    method: str
    path: str
    headers: Mapping[str, str]
    limits: Limits
    token_sha256: str | None = None
    reply: Reply | None = None
    body_limit: int = 0
    _op: str = ""
    _model: str = ""
    _stream: bool = False
    _ctx: HttpCallContext = field(init=False)

    def __post_init__(self) -> None:
        self._ctx = HttpCallContext(self.headers)
        self.body_limit = max_body_bytes(self.limits)
        path = "/" + self.path.split("?", 1)[0].strip("/")
        if path == "/v1/chat/completions":
            self._op, want = "chat", "POST"
        elif path == "/v1/models":
            self._op, want = "models", "GET"
        elif path.startswith("/v1/models/"):
            self._op, self._model, want = "model", path[len("/v1/models/"):], "GET"
        else:
            self.reply = error(404, f"no route {path!r}: POST /v1/chat/completions, GET /v1/models", "not_found")
            return
        if self.method.upper() != want:
            self.reply = error(405, f"{path} takes {want}, not {self.method.upper()}", "method_not_allowed")
            return
        try:
            check_token(self._ctx.invocation_metadata(), self.token_sha256)
        except RequestError as e:
            self.reply = grpc_error(e.code, e.message.replace("metadata", "header"))
            return
        n = {k.lower(): v for k, v in self.headers.items()}.get("content-length")
        if n is not None and n.strip().isdigit() and int(n) > self.body_limit:
            self.reply = too_large(int(n), self.body_limit)

    def call(self, body: bytes) -> Reply | tuple[str, Any, HttpCallContext]:
        if self._op != "chat":
            return "ListExperts", pb2.ListExpertsRequest(), self._ctx
        if len(body) > self.body_limit:
            return too_large(len(body), self.body_limit)
        try:
            request, self._stream = parse_chat(body, self.limits)
        except HttpError as e:
            return error(e.status, e.message, e.code, param=e.param)
        return "Predict", request, self._ctx

    def finish(self, response: Any) -> Reply:
        """The reply for what the handler returned (an error when it set a non-OK code on the context)."""
        if self._ctx.status not in (None, grpc.StatusCode.OK):
            return grpc_error(self._ctx.status, self._ctx.message)
        if self._op == "chat":
            return chat_reply(response, self._stream)
        return models_reply(response, self._model if self._op == "model" else None)

    def failed(self, exc: BaseException) -> Reply:
        """The reply for an exception the handler raised (``context.abort`` included)."""
        if isinstance(exc, _Aborted):
            return grpc_error(exc.code, exc.details)
        if isinstance(exc, RequestError):
            return grpc_error(exc.code, exc.message)
        log.error("HTTP %s %s failed", self.method, self.path, exc_info=exc)
        return error(500, f"internal error: {type(exc).__name__}", "internal")


def too_large(n: int, limit: int) -> Reply:
    return error(413, f"request body: {n} bytes, over the limit of {limit}", "request_too_large")


# ---------------------------------------------------------------------------------------------- requests
def parse_chat(body: bytes, limits: Limits) -> tuple[Any, bool]:
    """A chat-completions body as ``(cl.v1.PredictRequest, stream)``; raises :class:`HttpError` naming the field.
    Image bytes, question and ``max_new_tokens`` are validated further by the gRPC handler."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise HttpError(400, f"request body: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise HttpError(400, "request body: must be a JSON object")
    model = obj.get("model", AUTO)
    if not isinstance(model, str) or not model.strip():
        raise HttpError(400, "model: must be 'auto' or an expert's name (GET /v1/models lists them)", param="model")
    stream = obj.get("stream", False)
    if not isinstance(stream, bool):
        raise HttpError(400, "stream: must be true or false", param="stream")
    if obj.get("n", 1) not in (1, None):
        raise HttpError(400, "n: only 1 choice per request", param="n")
    key = "max_completion_tokens" if obj.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = obj.get(key)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or not 1 <= max_tokens <= limits.max_new_tokens):
        raise HttpError(400, f"{key}: {max_tokens!r} is outside [1, {limits.max_new_tokens}]", param=key)
    images, question = _messages(obj.get("messages"), limits)
    request = pb2.PredictRequest(images=images, question=question)
    if model.strip() != AUTO:
        request.expert = model.strip()
    if max_tokens is not None:
        request.max_new_tokens = max_tokens
    return request, stream


def _messages(messages: Any, limits: Limits) -> tuple[list[bytes], str]:
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "messages: a non-empty list of messages is required", param="messages")
    images: list[bytes] = []
    texts: list[str] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role in ("system", "developer"):
            continue  # the run fixes the prompt format
        if role != "user":
            raise HttpError(400, f"{where}.role: {role!r} is not supported; send user messages only (one question "
                                 "about the images, no multi-turn conversation)", param=f"{where}.role")
        content = m.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        if not isinstance(content, list):
            raise HttpError(400, f"{where}.content: a string or a list of content parts", param=f"{where}.content")
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise HttpError(400, f"{at}.image_url.url: a data URL string is required", param=at)
                images.append(_image(url, f"{at}.image_url.url", limits))
            else:
                raise HttpError(400, f"{at}: unsupported content part {kind!r} (use 'text' or 'image_url')", param=at)
    return images, "\n".join(t for t in texts if t.strip())


def _image(url: str, where: str, limits: Limits) -> bytes:
    """The bytes of a ``data:<mime>;base64,<data>`` URL or of bare base64 (no URL is fetched)."""
    data = url
    if url[:5].lower() == "data:":
        head, sep, data = url.partition(",")
        if not sep or not head.lower().endswith(";base64"):
            raise HttpError(400, f"{where}: a data URL must be base64 (data:image/png;base64,...)", param=where)
    elif url.split(":", 1)[0].lower() in ("http", "https", "file", "ftp", "s3", "gs"):
        raise HttpError(400, f"{where}: the server fetches no URL; send the image inline as "
                             "data:image/png;base64,...", param=where)
    data = "".join(data.split())
    if len(data) // 4 * 3 - 2 > limits.max_image_bytes:  # refused before decoding
        raise HttpError(413, f"{where}: about {len(data) // 4 * 3} bytes, over the limit of "
                             f"{limits.max_image_bytes}", "request_too_large", where)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, f"{where}: not valid base64", param=where) from None
    if len(raw) > limits.max_image_bytes:
        raise HttpError(413, f"{where}: {len(raw)} bytes, over the limit of {limits.max_image_bytes}",
                        "request_too_large", where)
    return raw


# ---------------------------------------------------------------------------------------------- replies
def chat_reply(response: Any, stream: bool = False) -> Reply:
    """A ``cl.v1.PredictResponse`` as a ``chat.completion`` (or, streamed, its ``chat.completion.chunk``s)."""
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    extra = {"expert": response.expert,
             "router": {"kind": response.router.kind, "raw_output": response.router.raw_output,
                        "fallback_used": response.router.fallback_used},
             "latency_ms": {"route": response.latency.route_ms, "answer": response.latency.answer_ms,
                            "total": response.latency.total_ms}}
    head = {"id": rid, "created": created, "model": response.expert}
    if not stream:
        return Reply(200, _dumps({**head, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": response.answer}, "finish_reason": "stop",
            "logprobs": None}], "clsvc": extra}))
    chunk = {**head, "object": "chat.completion.chunk"}
    events = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": response.answer},
                                     "finish_reason": None}]},
              {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "clsvc": extra}]
    body = b"".join(b"data: " + _dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    return Reply(200, body, "text/event-stream", (("Cache-Control", "no-cache"),))


def models_reply(response: Any, one: str | None = None) -> Reply:
    """A ``cl.v1.ListExpertsResponse`` as OpenAI's model list (``auto`` first, then the experts in stream
    order), or the one model ``one`` names (404 when none)."""
    models = [{"id": AUTO, "object": "model", "created": 0, "owned_by": OWNER,
               "description": "route each request to an expert with the run's router"}]
    models += [{"id": e.task, "object": "model", "created": 0, "owned_by": OWNER, "adapter_id": e.id,
                "description": e.description, "adapter_version": e.adapter_version} for e in response.experts]
    if one is None:
        return Reply(200, _dumps({"object": "list", "data": models}))
    for m in models:
        if one in (m["id"], m.get("adapter_id")):
            return Reply(200, _dumps(m))
    return error(404, f"unknown model {one!r}; known: {', '.join(m['id'] for m in models)}", "not_found",
                 "not_found_error")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
