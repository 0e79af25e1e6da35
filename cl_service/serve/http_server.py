"""OpenAI-compatible HTTP for ``clsvc serve --local``: a stdlib threading server over the plain servicer.

Each HTTP request runs in its own thread and calls the servicer's ``Predict`` / ``ListExperts`` like a gRPC
call would (:mod:`cl_service.serve.openai_api`), so concurrent HTTP and gRPC clients share batches.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cl_service.serve.auth import token_sha256
from cl_service.serve.openai_api import Exchange, Reply, error

log = logging.getLogger(__name__)


class _Handler(BaseHTTPRequestHandler):
    server: "OpenAIHTTPServer"
    protocol_version = "HTTP/1.1"
    server_version, sys_version = "clsvc", ""  # no Python version in the Server header

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    do_PUT = do_PATCH = do_DELETE = do_POST  # answered 405 in OpenAI's error shape

    def _handle(self) -> None:
        try:
            reply = self._reply()
        except Exception:  # noqa: BLE001 - logged here; the client gets one line, never a traceback
            log.exception("HTTP %s %s failed", self.command, self.path)
            reply, self.close_connection = error(500, "internal error", "internal"), True
        self._send(reply)

    def _reply(self) -> Reply:
        s = self.server
        ex = Exchange(self.command, self.path, dict(self.headers.items()), s.limits, s.token_sha256)
        reply = ex.reply
        if reply is None:
            n = self.headers.get("Content-Length")
            if self.command == "POST" and (n is None or not n.strip().isdigit()):
                reply, self.close_connection = error(411, "a Content-Length header is required",
                                                     "length_required"), True
            else:
                body = self.rfile.read(int(n)) if n and n.strip().isdigit() else b""
                reply = self._call(ex, body)
        else:
            self.close_connection = True  # the unread body must not be taken for the next request
        return reply

    def _call(self, ex: Exchange, body: bytes) -> Reply:
        call = ex.call(body)
        if isinstance(call, Reply):
            return call
        rpc, request, ctx = call
        try:
            return ex.finish(getattr(self.server.servicer, rpc)(request, ctx))
        except Exception as e:  # noqa: BLE001 - mapped to a one-line error reply
            return ex.failed(e)

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", f"{reply.content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(reply.body)))
        for k, v in reply.headers:
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        log.debug("%s %s", self.address_string(), format % args)


class OpenAIHTTPServer(ThreadingHTTPServer):
    """``POST /v1/chat/completions`` and ``GET /v1/models`` over ``servicer`` (a
    :class:`~cl_service.serve.service.ContinualLearningServicer`); ``token``: require ``Authorization: Bearer``."""

    daemon_threads = True

    def __init__(self, servicer: Any, port: int = 0, host: str = "127.0.0.1", token: str | None = None) -> None:
        super().__init__((host, port), _Handler)
        self.servicer = servicer
        self.limits = servicer.limits
        self.token_sha256 = token_sha256(token)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> "OpenAIHTTPServer":
        """Serve in a background thread; returns self."""
        self._thread = threading.Thread(target=self.serve_forever, name="clsvc-openai-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting requests and close the socket (requests in flight finish in their threads)."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(10)
        self.server_close()


def serve_http(servicer: Any, port: int = 0, host: str = "127.0.0.1", token: str | None = None) -> OpenAIHTTPServer:
    """Start OpenAI-compatible HTTP for ``servicer`` on ``host:port`` (0 = ephemeral); ``.port`` says which."""
    server = OpenAIHTTPServer(servicer, port, host, token).start()
    log.info("OpenAI-compatible HTTP on http://%s:%d/v1", host, server.port)
    return server


def serve_http_cli(servicer: Any, port: int, token_env: str = "CLSVC_TOKEN") -> OpenAIHTTPServer:
    """``clsvc serve --local --http-port N``: on 127.0.0.1, requiring ``$token_env`` when it is set; prints where."""
    import os

    token = os.environ.get(token_env) or None
    server = serve_http(servicer, port, token=token)
    print(f"OpenAI-compatible HTTP on http://127.0.0.1:{server.port}/v1 "
          f"({'token: $' + token_env if token else 'no token'})", flush=True)
    return server
