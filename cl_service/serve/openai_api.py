"""OpenAI-compatible HTTP on top of the request core, free of any HTTP server.

``POST /v1/chat/completions`` becomes a ``cl.v1.PredictRequest`` (:mod:`cl_service.serve.openai_request`, which
says which fields are honoured and which refused) and is answered by the same
:class:`~cl_service.serve.core.ServeCore` as gRPC; ``GET /v1/models`` lists its catalog. So validation, the
shared token, routing, limits and errors are those of gRPC; this module only translates. Two transports use
it: ``serve/http_server.py`` (stdlib, ``clsvc serve --local``) and ``on_ray/serve_http.py`` (Serve's HTTP proxy).

The reply is a ``chat.completion`` whose ``model`` is the expert that answered, with ``usage`` (the expert's
prompt and generated tokens) and ``clsvc`` (expert, router decision, latency). With ``stream: true`` the answer
is sent as it is decoded: server-sent events of ``chat.completion.chunk`` (a first chunk with the role, one per
piece of text, a last one with ``finish_reason``, with ``stream_options.include_usage`` one more with ``usage``
and no choices), then ``data: [DONE]``. An error before the first piece is an ordinary error reply; one after
it (rare: the decode failed) is an ``error`` event, and the stream ends without ``[DONE]``.

Errors are OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``), ``code`` the gRPC status name:
400 invalid argument / failed precondition, 401 unauthenticated, 404 unknown expert or path, 413 an image
over ``limits.max_image_bytes`` or a body over :func:`max_body_bytes`, 429 resource exhausted, 503
unavailable, 504 deadline exceeded, 500 anything else (one line, never a traceback).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping

import grpc

from cl_service.serve.auth import check_token
from cl_service.serve.catalog import Limits, RequestError
from cl_service.serve.core import Routed, ServeCore
from cl_service.serve.openai_request import AUTO, Chat, HttpError, parse_chat

log = logging.getLogger(__name__)

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
SSE_HEADERS = (("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no"))


@dataclass(frozen=True)
class Reply:
    """An HTTP response, transport-free."""
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Streamed:
    """A 200 ``text/event-stream`` reply whose body is ``events`` (each an encoded server-sent event)."""
    events: AsyncIterator[bytes]
    content_type: str = "text/event-stream"
    headers: tuple[tuple[str, str], ...] = SSE_HEADERS


def error(status: int, message: str, code: str, kind: str | None = None, param: str | None = None) -> Reply:
    """An OpenAI-shaped error reply."""
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    headers = (("WWW-Authenticate", "Bearer"),) if status == 401 else ()
    return Reply(status, _dumps(_error_body(message, code, kind, param)), headers=headers)


def _error_body(message: str, code: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def grpc_error(code: grpc.StatusCode, message: str) -> Reply:
    """The HTTP form of a gRPC status (see the module docstring for the table)."""
    status, kind = _HTTP.get(code, (500, "server_error"))
    return error(status, message, code.name.lower(), kind)


def max_body_bytes(limits: Limits) -> int:
    """The largest request body accepted: every image at the limit, base64-encoded, plus the question."""
    b64 = (limits.max_image_bytes + 2) // 3 * 4 + 64  # + the data-URL header
    return limits.max_images * b64 + 6 * limits.max_question_chars + 64 * 1024


def too_large(n: int, limit: int) -> Reply:
    return error(413, f"request body: {n} bytes, over the limit of {limit}", "request_too_large")


@dataclass
class Exchange:
    """One HTTP request on its way to the request core and back.

    A transport makes one from the request line and headers; when :attr:`reply` is set the request is already
    answered (unknown path 404, wrong method 405, token 401, ``Content-Length`` over :attr:`body_limit` 413),
    before any body is read. Otherwise it reads at most :attr:`body_limit` bytes and awaits :func:`respond`.
    """

    method: str
    path: str
    headers: Mapping[str, str]
    limits: Limits
    token_sha256: str | None = None
    reply: Reply | None = None
    body_limit: int = 0
    op: str = ""
    model: str = ""
    metadata: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        self.metadata = tuple((k.lower(), v) for k, v in self.headers.items())
        self.body_limit = max_body_bytes(self.limits)
        path = "/" + self.path.split("?", 1)[0].strip("/")
        if path == "/v1/chat/completions":
            self.op, want = "chat", "POST"
        elif path == "/v1/models":
            self.op, want = "models", "GET"
        elif path.startswith("/v1/models/"):
            self.op, self.model, want = "model", path[len("/v1/models/"):], "GET"
        else:
            self.reply = error(404, f"no route {path[:100]!r}: POST /v1/chat/completions, GET /v1/models",
                               "not_found")
            return
        if self.method.upper() != want:
            self.reply = error(405, f"{path} takes {want}, not {self.method.upper()[:20]}", "method_not_allowed")
            return
        try:
            check_token(self.metadata, self.token_sha256)
        except RequestError as e:
            self.reply = grpc_error(e.code, e.message.replace("metadata", "header"))
            return
        n = dict(self.metadata).get("content-length")
        if n is not None and n.strip().isdigit() and int(n) > self.body_limit:
            self.reply = too_large(int(n), self.body_limit)

    def parse(self, body: bytes) -> Chat | Reply | None:
        """The chat request in ``body`` (JSON and base64 decoding: run it off the event loop), an error reply, or
        None for the model listings."""
        if self.op != "chat":
            return None
        if len(body) > self.body_limit:
            return too_large(len(body), self.body_limit)
        try:
            return parse_chat(body, self.limits)
        except HttpError as e:
            return error(e.status, e.message, e.code, param=e.param)

    def failed(self, exc: BaseException) -> Reply:
        """The reply for an exception on the way (a :class:`RequestError` keeps its status)."""
        if isinstance(exc, RequestError):
            return grpc_error(exc.code, exc.message)
        log.error("HTTP %s %s failed", self.method, self.path[:100], exc_info=exc)
        return error(500, f"internal error: {type(exc).__name__}", "internal")


async def respond(core: ServeCore, ex: Exchange, body: bytes) -> Reply | Streamed:
    """The reply to ``ex`` with ``body``: a whole :class:`Reply`, or a :class:`Streamed` one for ``stream: true``
    once the first piece of the answer is there (errors before it are ordinary error replies)."""
    if ex.reply is not None:
        return ex.reply
    try:
        chat = await core.off_loop(ex.parse, body)
        if isinstance(chat, Reply):
            return chat
        if chat is None:
            return models_reply(core.list_experts(ex.metadata), ex.model if ex.op == "model" else None)
        if not chat.stream:
            return chat_reply(await core.predict(chat.request, ex.metadata))
        items = core.predict_stream(chat.request, ex.metadata)
        first = await items.__anext__()
    except Exception as e:  # noqa: BLE001 - mapped to a one-line error reply
        return ex.failed(e)
    return Streamed(_events(first, items, chat.include_usage))


# ---------------------------------------------------------------------------------------------- replies
def _extra(response: Any) -> dict:
    return {"expert": response.expert,
            "router": {"kind": response.router.kind, "raw_output": response.router.raw_output,
                       "fallback_used": response.router.fallback_used},
            "latency_ms": {"route": response.latency.route_ms, "answer": response.latency.answer_ms,
                           "total": response.latency.total_ms}}


def _usage(response: Any) -> dict:
    u = response.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens}


def chat_reply(response: Any) -> Reply:
    """A ``cl.v1.PredictResponse`` as a ``chat.completion``."""
    return Reply(200, _dumps({
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": response.expert, "choices": [{"index": 0, "message": {"role": "assistant", "content": response.answer},
                                               "finish_reason": response.finish_reason, "logprobs": None}],
        "usage": _usage(response), "clsvc": _extra(response)}))


async def _events(first: Routed, items: AsyncIterator[Any], include_usage: bool) -> AsyncIterator[bytes]:
    """``chat.completion.chunk`` events: the role, each piece of text as it comes, the finish, the usage."""
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": first.expert}

    def chunk(delta: dict, finish: str | None = None, **more: Any) -> bytes:
        return _event({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                       **more})

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for item in items:
            if isinstance(item, str):
                yield chunk({"content": item})
                continue
            yield chunk({}, item.finish_reason, clsvc=_extra(item))
            if include_usage:
                yield _event({**head, "choices": [], "usage": _usage(item)})
        yield b"data: [DONE]\n\n"
    except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes as an event
        if isinstance(e, RequestError):
            body = _error_body(e.message, e.code.name.lower(), _HTTP.get(e.code, (500, "server_error"))[1])
        else:
            log.error("streamed answer failed", exc_info=e)
            body = _error_body(f"internal error: {type(e).__name__}", "internal", "server_error")
        yield _event(body)
    finally:
        await items.aclose()


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
    return error(404, f"unknown model {one[:80]!r}; known: {', '.join(m['id'] for m in models)}", "not_found",
                 "not_found_error")


def _event(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
