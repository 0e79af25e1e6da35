"""OpenAI-compatible HTTP for ``clsvc serve --local``: a stdlib HTTP/1.1 server over the plain servicer.

A request is answered by the servicer's request core (:mod:`cl_service.serve.openai_api`), like a gRPC call, so
concurrent HTTP and gRPC clients share batches. Bounded, so that slow or many clients cannot take the server:

- **Threads**: at most ``max_threads`` connections are served at once; up to ``max_pending`` more wait for a
  thread; a connection beyond those gets ``503`` at once and is closed.
- **Time**: a request (line, headers and body) must arrive within ``timeout_s`` of the connection being ready
  for it (the same bound for an idle keep-alive connection), however slowly its bytes trickle in; a client that
  does not read its reply is dropped after ``timeout_s`` per write. Computing the answer is not bounded by it
  (``request_timeout_s`` of the config is).

``stream: true`` replies go out as chunked server-sent events, each as the answer is decoded.
"""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from cl_service.serve.catalog import RequestError
from cl_service.serve.openai_api import Exchange, Reply, Streamed, error, grpc_error, respond
from cl_service.serve.security import require_safe_exposure

log = logging.getLogger(__name__)


class _DeadlineReader(io.RawIOBase):
    """The connection's bytes, each ``recv`` bounded by what is left of the handler's deadline: a request that
    trickles in byte by byte still ends at the deadline."""

    def __init__(self, sock: socket.socket, handler: "_Handler") -> None:
        self.sock, self.handler = sock, handler

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        left = self.handler.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.sock.settimeout(left)
        return self.sock.recv_into(buf)


class _Handler(BaseHTTPRequestHandler):
    server: "OpenAIHTTPServer"
    protocol_version = "HTTP/1.1"
    server_version, sys_version = "clsvc", ""  # no Python version in the Server header

    def setup(self) -> None:
        super().setup()
        self.deadline = time.monotonic() + self.server.timeout_s
        self.rfile.close()  # the plain socket file: reads go through the deadline instead
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self), 64 * 1024)

    def handle_one_request(self) -> None:
        self.deadline = time.monotonic() + self.server.timeout_s  # for this request, idle wait included
        super().handle_one_request()  # a TimeoutError there closes the connection without a reply

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    do_PUT = do_PATCH = do_DELETE = do_POST  # answered 405 in OpenAI's error shape

    def _handle(self) -> None:
        s = self.server
        ex = Exchange(self.command, self.path, dict(self.headers.items()), s.limits, s.token_sha256)
        if ex.reply is not None:
            self.close_connection = True  # the unread body must not be taken for the next request
            return self._send(ex.reply)
        n = self.headers.get("Content-Length")
        if self.command == "POST" and (n is None or not n.strip().isdigit()):
            self.close_connection = True
            return self._send(error(411, "a Content-Length header is required", "length_required"))
        body = self.rfile.read(int(n)) if n and n.strip().isdigit() else b""
        if n and n.strip().isdigit() and len(body) < int(n):
            self.close_connection = True  # the client closed before sending its body
            return
        try:
            reply = s.servicer.run(respond(s.servicer.core, ex, body))
        except RequestError as e:  # no answer in time
            reply = grpc_error(e.code, e.message)
        except Exception as e:  # noqa: BLE001 - logged; the client gets one line, never a traceback
            log.exception("HTTP %s failed", self.command)
            reply, self.close_connection = error(500, f"internal error: {type(e).__name__}", "internal"), True
        if isinstance(reply, Streamed):
            self._stream(reply)
        else:
            self._send(reply)

    def _head(self, status: int, content_type: str, headers: tuple[tuple[str, str], ...], length: int | None) -> None:
        self.connection.settimeout(self.server.timeout_s)  # a client that does not read is dropped
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        if length is None:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(length))
        for k, v in headers:
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _send(self, reply: Reply) -> None:
        self._head(reply.status, reply.content_type, reply.headers, len(reply.body))
        self.wfile.write(reply.body)

    def _stream(self, reply: Streamed) -> None:
        self._head(200, reply.content_type, reply.headers, None)
        events = self.server.servicer.iterate(reply.events)
        try:
            for event in events:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.write(b"0\r\n\r\n")
        finally:
            events.close()  # a client gone: the answer still waiting is cancelled

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        log.debug("%s %s", self.address_string(), format % args)


class OpenAIHTTPServer(HTTPServer):
    """``POST /v1/chat/completions`` and ``GET /v1/models`` over ``servicer`` (a
    :class:`~cl_service.serve.service.ContinualLearningServicer`, whose token it requires), with at most
    ``max_threads`` connections served and ``max_pending`` waiting, and ``timeout_s`` for a request to arrive."""

    daemon_threads = True

    def __init__(self, servicer: Any, port: int = 0, host: str = "127.0.0.1", *, max_threads: int = 16,
                 max_pending: int = 64, timeout_s: float = 30.0) -> None:
        if max_threads < 1 or max_pending < 0 or timeout_s <= 0:
            raise ValueError("max_threads >= 1, max_pending >= 0 and timeout_s > 0 are required")
        require_safe_exposure(host, servicer.token_sha256, servicer.cfg.insecure, servicer.cfg.auth_token_env)
        self.servicer = servicer
        self.limits = servicer.limits
        self.token_sha256 = servicer.token_sha256
        self.max_threads, self.max_pending, self.timeout_s = max_threads, max_pending, float(timeout_s)
        self.request_queue_size = max(5, max_pending)
        super().__init__((host, port), _Handler)
        self._pool = ThreadPoolExecutor(max_threads, thread_name_prefix="clsvc-http")
        self._lock = threading.Lock()
        self.active = 0   # connections being served or waiting for a thread
        self.refused = 0  # connections answered 503 because both were full
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        with self._lock:
            full = self.active >= self.max_threads + self.max_pending
            if not full:
                self.active += 1
        if full:
            self.refused += 1
            self._refuse(request)
            return
        self._pool.submit(self._serve, request, client_address)

    def _serve(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - a connection's failure ends that connection only
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._lock:
                self.active -= 1

    def _refuse(self, request: socket.socket) -> None:
        body = error(503, f"the server is busy: {self.max_threads} connections served and {self.max_pending} "
                          "waiting; retry later", "unavailable").body
        try:
            request.settimeout(0.5)
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
                            b"Connection: close\r\nRetry-After: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass
        finally:
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("HTTP connection from %s ended with an error", client_address, exc_info=True)

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
        self._pool.shutdown(wait=False)


def serve_http(servicer: Any, port: int = 0, host: str = "127.0.0.1", **bounds: Any) -> OpenAIHTTPServer:
    """Start OpenAI-compatible HTTP for ``servicer`` on ``host:port`` (0 = ephemeral); ``.port`` says which.
    ``bounds``: ``max_threads``, ``max_pending``, ``timeout_s`` of :class:`OpenAIHTTPServer`."""
    server = OpenAIHTTPServer(servicer, port, host, **bounds).start()
    log.info("OpenAI-compatible HTTP on http://%s:%d/v1", host, server.port)
    return server


def serve_http_cli(servicer: Any, port: int, host: str = "127.0.0.1") -> OpenAIHTTPServer:
    """``clsvc serve --local --http-port N``: prints where, and whether the token is required."""
    server = serve_http(servicer, port, host)
    print(f"OpenAI-compatible HTTP on http://{host}:{server.port}/v1 "
          f"({'token: $' + servicer.cfg.auth_token_env if servicer.token_sha256 else 'no token'})", flush=True)
    return server
