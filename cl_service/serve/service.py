"""A plain (no Ray) gRPC servicer over a finished run folder: ``clsvc serve --local``.

The request decision is :class:`~cl_service.serve.core.ServeCore`'s, the one the Ray Serve ingress runs: any
``router_kind`` (``mllm`` / ``prototype`` / ``ridge`` / ``knn``), the limits, the token, hot add and the errors.
The model is :class:`~cl_service.serve.stages.TwoStages`: both stages over one engine, batched (requests of many
clients share each batch, any mix of experts in one pass) and overlapped (stage one of the next batch runs next
to stage two of the last, two CUDA streams on a GPU), with ``continuous=true`` stage two by continuous batching.
Both run on an event loop in a thread of their own; gRPC's handler threads (and the OpenAI-compatible HTTP
server's, :mod:`cl_service.serve.http_server`) hand it their requests. Transport defaults (message size, token
before the request is read, TLS, loopback) are :mod:`cl_service.serve.security`'s.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent import futures
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, AsyncIterator, Coroutine, Iterator

import grpc

from cl_service.serve.auth import token_sha256
from cl_service.serve.catalog import Catalog, RequestError
from cl_service.serve.config import ServeCfg, changed
from cl_service.serve.core import ServeCore
from cl_service.serve.proto import load as load_proto
from cl_service.serve.security import (DecodeGuard, TokenInterceptor, grpc_message_limit, require_safe_exposure,
                                       server_credentials)
from cl_service.serve.stages import TwoStages

log = logging.getLogger(__name__)
pb2, pb2_grpc = load_proto()

__all__ = ["ContinualLearningServicer", "build_server", "local_server", "serve_local"]


def serve_cfg(run: str | Path | ServeCfg, **changes: Any) -> ServeCfg:
    """A :class:`ServeCfg` for ``run`` (a results folder, or a config) with ``changes`` (``limits__max_images=2``
    for ``limits.max_images``)."""
    cfg = run if isinstance(run, ServeCfg) else ServeCfg(results=str(Path(run).resolve()))
    return changed(cfg, **changes) if changes else cfg


class ContinualLearningServicer(pb2_grpc.ContinualLearningServicer):
    """``cl.v1.ContinualLearning`` in this process. ``run``: a results folder or a :class:`ServeCfg`; ``engine``:
    the run's base already loaded (None: loaded on ``device``); ``token``: the shared token every call needs
    (gRPC and HTTP); ``changes``: :class:`ServeCfg` keys (``continuous=True``, ``limits__max_image_bytes=...``)."""

    def __init__(self, run: str | Path | ServeCfg, engine: Any = None, *, token: str | None = None,
                 device: str | None = None, **changes: Any) -> None:
        self.cfg = serve_cfg(run, **changes)
        self.limits = self.cfg.limits
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="clsvc-serve-loop", daemon=True)
        self._thread.start()
        try:
            self.stages = TwoStages(self.cfg, engine, device)
            self.core = ServeCore(self.cfg, self.stages, token_sha256(token))
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise

    @property
    def token_sha256(self) -> str | None:
        return self.core.token_sha256

    @property
    def catalog(self) -> Catalog:
        return self.core.catalog

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop taking work, finish continuous decoding, stop the loop."""
        self.core.close()
        self.stages.close()

        async def stop() -> None:  # the batchers' idle workers end with the loop
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout_s)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout_s)

    # ------------------------------------------------------------------ the loop, from other threads
    def run(self, coro: Coroutine, timeout_s: float | None = None) -> Any:
        """``coro``'s result, run on the servicer's loop (``DEADLINE_EXCEEDED`` after ``timeout_s``, default the
        config's ``request_timeout_s``)."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        timeout_s = self.cfg.request_timeout_s if timeout_s is None else timeout_s
        try:
            return fut.result(timeout=timeout_s)
        except FutureTimeout:
            fut.cancel()
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"no answer within {timeout_s:.0f} s (server overloaded)") from None

    def iterate(self, items: AsyncIterator[Any], timeout_s: float | None = None) -> Iterator[Any]:
        """``items`` (an async iterator of the loop) as a plain iterator; closing it early closes ``items``."""
        try:
            while True:
                try:
                    yield self.run(items.__anext__(), timeout_s)
                except StopAsyncIteration:
                    return
        finally:
            asyncio.run_coroutine_threadsafe(items.aclose(), self.loop)

    # ------------------------------------------------------------------ handlers
    def Predict(self, request, context):
        try:
            return self.run(self.core.predict(request, context.invocation_metadata()))
        except RequestError as e:
            context.abort(e.code, e.message)

    def ListExperts(self, request, context):
        try:
            return self.core.list_experts(context.invocation_metadata())
        except RequestError as e:
            context.abort(e.code, e.message)


def build_server(servicer: ContinualLearningServicer, port: int, host: str = "127.0.0.1",
                 max_workers: int | None = None, *, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None) -> tuple[grpc.Server, int]:
    """A server (not yet started) with the servicer, health and reflection; returns ``(server, bound_port)``.

    Safe by default (:mod:`cl_service.serve.security`): messages larger than the request limits allow are
    refused before any handler runs; with the servicer's token every cl.v1 call needs it (checked before the
    request is deserialized); ``tls_cert`` + ``tls_key`` (PEM) serve TLS; a non-loopback ``host`` without a
    token raises :class:`~cl_service.serve.security.InsecureExposure` unless the config says ``insecure``."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    sha = servicer.token_sha256
    require_safe_exposure(host, sha, servicer.cfg.insecure)
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both a certificate and its key (--tls-cert and --tls-key)")
    creds = server_credentials(tls_cert, tls_key) if tls_cert is not None else None
    limit = grpc_message_limit(servicer.limits)
    # Enough handler threads to fill both stages' batches: each waits on its request while the stages run.
    workers = max_workers or 2 * (servicer.cfg.router.max_batch_size + servicer.cfg.expert.max_batch_size)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         interceptors=([TokenInterceptor(sha)] if sha else []) + [DecodeGuard()],
                         options=[("grpc.max_receive_message_length", limit)])
    pb2_grpc.add_ContinualLearningServicer_to_server(servicer, server)
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    service_name = pb2.DESCRIPTOR.services_by_name["ContinualLearning"].full_name
    for name in ("", service_name):
        hs.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind {address}")
    return server, bound


def serve_local(run: str | Path | ServeCfg, port: int, host: str = "127.0.0.1", engine: Any = None,
                wait: bool = True, *, token: str | None = None, tls_cert: str | Path | None = None,
                tls_key: str | Path | None = None, **changes: Any) -> tuple[grpc.Server, int]:
    """Serve ``run`` on ``host:port`` (0 = ephemeral); blocks unless ``wait=False``. ``token`` and TLS as in
    :func:`build_server`; ``changes``: :class:`ServeCfg` keys as in :class:`ContinualLearningServicer`."""
    cfg = serve_cfg(run, **changes)
    require_safe_exposure(host, token, cfg.insecure)  # before the model loads
    servicer = ContinualLearningServicer(cfg, engine, token=token)
    server, bound = build_server(servicer, port, host, tls_cert=tls_cert, tls_key=tls_key)
    server.start()
    log.info("cl.v1.ContinualLearning serving %s on %s:%d", cfg.results, host, bound)
    if wait:
        server.wait_for_termination()
    return server, bound


def local_server(cfg: ServeCfg, port: int | None = None, host: str | None = None, *, tls_cert: str | None = None,
                 tls_key: str | None = None, device: str | None = None
                 ) -> tuple[ContinualLearningServicer, grpc.Server, int]:
    """``clsvc serve --local``: servicer and (not started) server on ``host`` (default 127.0.0.1) and ``port``
    (default ``cfg.grpc_port``), requiring ``$auth_token_env`` when it is set; the exposure check runs before
    the model loads."""
    import os

    host, token = host or "127.0.0.1", os.environ.get(cfg.auth_token_env) or None
    require_safe_exposure(host, token, cfg.insecure, cfg.auth_token_env)
    servicer = ContinualLearningServicer(cfg, token=token, device=device)
    try:
        server, bound = build_server(servicer, cfg.grpc_port if port is None else port, host, tls_cert=tls_cert,
                                     tls_key=tls_key)
    except BaseException:
        servicer.close()
        raise
    return servicer, server, bound
