"""A plain (no Ray) gRPC servicer over an :class:`Engine` and a finished run folder.

Two-stage inference: route with the run's latest MLLM router (pool = experts in stream order, descriptions
from their ``adapter.json``), then answer with base + the chosen expert. Concurrent requests are batched
and the two stages overlap (:class:`cl_service.engine.Pipeline`): the router works on the next batch while
the experts answer the last, every expert of a batch in one pass (:meth:`Engine.answer_mixed`). Bad
requests (the model's token budget included) get ``INVALID_ARGUMENT`` / ``NOT_FOUND`` with a clear message
before they join a batch; a request that still fails inside a batch fails alone (``INTERNAL`` with a
one-line message, never a traceback) and its batch mates are answered. Transport defaults (message size,
token, TLS, loopback) are :mod:`cl_service.serve.security`'s; hot add is :mod:`cl_service.serve.hotadd`'s.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cl_service.adapters.registry import AdapterError
from cl_service.data.schema import Sample
from cl_service.engine.pipeline import Pipeline
from cl_service.serve.catalog import Catalog, ExpertEntry, Limits, RequestError, check_budget, parse_predict
from cl_service.serve.hotadd import CatalogWatch
from cl_service.serve.proto import load as load_proto
from cl_service.serve.security import (DecodeGuard, TokenInterceptor, grpc_message_limit, require_safe_exposure,
                                       server_credentials)
from cl_service.serve.twostage import answer_grouped, isolated, per_sample_states, route_grouped

log = logging.getLogger(__name__)
pb2, pb2_grpc = load_proto()

MAX_IMAGE_BYTES = 8 * 1024 * 1024
MAX_IMAGES = 16
MAX_NEW_TOKENS_LIMIT = 256
MAX_BATCH = 16          # requests per routing/answering batch
REQUEST_TIMEOUT_S = 600.0

__all__ = ["ContinualLearningServicer", "ExpertEntry", "RequestError", "RunModel", "build_server", "local_server",
           "serve_local"]


class RunModel:
    """What a run offers for serving (a :class:`Catalog` snapshot, swapped by :meth:`reload`) and the engine."""

    def __init__(self, run_dir: str | Path, engine: Any = None, device: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.watch = CatalogWatch(self.run_dir)
        if engine is None:
            from cl_service.engine.engine import Engine

            engine = Engine(self.catalog.resolved["base"], device=device, **self.catalog.base_settings())
            engine.max_new_tokens = int(self.catalog.run_setting("eval", "max_new_tokens", engine.max_new_tokens))
            engine.router_max_new_tokens = int(self.catalog.run_setting("router", "max_new_tokens",
                                                                        engine.router_max_new_tokens))
        self.engine = engine

    @property
    def catalog(self) -> Catalog:
        return self.watch.catalog

    @property
    def experts(self) -> tuple[ExpertEntry, ...]:
        return self.catalog.experts

    @property
    def router_dir(self) -> Path | None:
        return self.catalog.router_dir

    @property
    def pool(self):
        return self.catalog.pool

    def find(self, name: str) -> ExpertEntry:
        return self.catalog.find(name)

    def reload(self) -> bool:
        """Swap in the run's newly published experts/router (:meth:`CatalogWatch.poll`: what fails
        verification is retried later); True when anything changed. Requests in flight finish with the
        catalog they started with."""
        return self.watch.poll()


@dataclass
class _Job:
    """One Predict request on its way through the two stages."""
    sample: Sample
    max_new_tokens: int | None
    catalog: Catalog
    expert: ExpertEntry | None      # named by the request (or the run's only expert): no routing
    kind: str                       # router decision kind: request | single | mllm


@dataclass
class _Done:
    answer: str
    expert: ExpertEntry
    raw: str
    fallback: bool
    route_ms: float
    answer_ms: float


class ContinualLearningServicer(pb2_grpc.ContinualLearningServicer):
    def __init__(self, run_dir: str | Path, engine: Any = None, *, max_image_bytes: int = MAX_IMAGE_BYTES,
                 max_images: int = MAX_IMAGES, max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT,
                 max_batch: int = MAX_BATCH, batch_wait_ms: float = 2.0,
                 request_timeout_s: float = REQUEST_TIMEOUT_S, device: str | None = None,
                 max_question_chars: int = Limits.max_question_chars, watch_s: float = 2.0) -> None:
        self.model = RunModel(run_dir, engine, device)
        self.limits = Limits(max_image_bytes=max_image_bytes, max_images=max_images,
                             max_new_tokens=max_new_tokens_limit, max_question_chars=max_question_chars)
        self.max_image_bytes = max_image_bytes
        self.max_images = max_images
        self.max_batch = max_batch
        self.request_timeout_s = request_timeout_s
        self.pipeline = Pipeline(self._route, self._answer, device=self.model.engine.mllm.device,
                                 max_batch=max_batch, wait_s=batch_wait_ms / 1000, merge=_merge,
                                 name="clsvc-grpc")
        self._stop = threading.Event()
        if watch_s > 0:  # hot add: poll the run for newly published (or retrained) experts and routers
            threading.Thread(target=self._watch, args=(watch_s,), name="clsvc-catalog-watch", daemon=True).start()

    def close(self, timeout_s: float = 60.0) -> None:
        """Finish the requests in flight and stop the batching threads."""
        self._stop.set()
        self.pipeline.close(timeout_s)

    def _watch(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.model.reload()
            except Exception as e:  # noqa: BLE001 - a half-written run must not stop the watcher
                log.warning("catalog reload skipped: %s", e)

    def validate(self, request) -> tuple[Sample, int | None]:
        """A ``cl.v1.PredictRequest`` checked against the limits and the model's token budget (images x image
        tokens + question + answer within ``max_length``): ``(sample, max_new_tokens or None)``; raises
        :class:`RequestError` (``INVALID_ARGUMENT``) before the request reaches a batch."""
        sample, n = parse_predict(request, self.limits)
        engine = self.model.engine
        check_budget(engine.mllm, sample, n or engine.max_new_tokens)
        return sample, n

    def _sample(self, request) -> Sample:
        return self.validate(request)[0]

    # ------------------------------------------------------------------ the two stages (batched)
    def _route(self, jobs: list[_Job]) -> tuple[Any, list]:
        """Stage one: CLIP once per request, then the MLLM router for the requests that name no expert
        (one call per catalog snapshot). Returns (per-request CLIP states, per-request route or error). A
        request that fails a step fails alone, with its own error; the others go on."""
        engine = self.model.engine
        samples = [j.sample for j in jobs]

        def clip(idx: list[int]) -> list:
            return per_sample_states(engine.vision_states([samples[i] for i in idx]), [samples[i] for i in idx])

        states = isolated(clip, list(range(len(jobs))))
        routed: list = [s if isinstance(s, Exception) else None for s in states]
        todo = [i for i, j in enumerate(jobs) if j.expert is None and routed[i] is None]
        if todo:
            t0 = time.perf_counter()

            catalogs = {id(jobs[i].catalog): jobs[i].catalog for i in todo}

            def route(group: list, key: int, vs: Any) -> list:
                catalog = catalogs[key]
                return engine.route_mllm(group, str(catalog.router_dir), catalog.pool, vision_states=vs)

            routes = isolated(lambda idx: route_grouped([samples[i] for i in idx], [id(jobs[i].catalog) for i in idx],
                                                        [states[i] for i in idx], route), todo)
            ms = (time.perf_counter() - t0) * 1000
            for i, r in zip(todo, routes):
                if isinstance(r, Exception):
                    routed[i] = r
                    continue
                try:
                    routed[i] = (jobs[i].catalog.find(r.expert), r.raw, bool(r.fallback), ms)
                except RequestError as e:  # the router named an expert this catalog lacks
                    routed[i] = e
        for i, j in enumerate(jobs):
            if j.expert is not None and routed[i] is None:
                routed[i] = (j.expert, "", False, 0.0)
        return states, routed

    def _answer(self, jobs: list[_Job], mid: tuple[Any, list]) -> list:
        """Stage two: every expert of the batch in one pass per answer length; a request whose routing
        failed gets its error back."""
        states, routed = mid
        ok = [i for i, r in enumerate(routed) if not isinstance(r, Exception)]
        out: list = list(routed)
        if ok:
            t0 = time.perf_counter()
            texts = isolated(lambda idx: answer_grouped(  # a failing row fails alone, the others are answered
                self.model.engine, [jobs[i].sample for i in idx], [str(routed[i][0].path) for i in idx],
                [jobs[i].max_new_tokens for i in idx], [states[i] for i in idx]), ok)
            ms = (time.perf_counter() - t0) * 1000
            for i, t in zip(ok, texts):
                expert, raw, fallback, route_ms = routed[i]
                out[i] = t if isinstance(t, Exception) else _Done(t, expert, raw, fallback, route_ms, ms)
        return out

    # ------------------------------------------------------------------ handlers
    def predict(self, request) -> "pb2.PredictResponse":
        """The Predict logic without gRPC plumbing; raises :class:`RequestError`."""
        t0 = time.perf_counter()
        sample, n = self.validate(request)  # parse_predict is shared with the Ray Serve ingress
        catalog = self.model.catalog  # this request's snapshot (a hot add swaps in a new one)
        if request.HasField("expert"):
            job = _Job(sample, n, catalog, catalog.find(request.expert), "request")
        elif catalog.router_dir is None or catalog.pool is None:
            if len(catalog.experts) > 1:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                   "the run has no usable MLLM router; name an expert: "
                                   + ", ".join(e.task for e in catalog.experts))
            job = _Job(sample, n, catalog, catalog.experts[0], "single")
        else:
            job = _Job(sample, n, catalog, None, "mllm")
        try:
            done = self.pipeline.submit(job).result(timeout=self.request_timeout_s)
        except FutureTimeout:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"no answer within {self.request_timeout_s:.0f} s (server overloaded)") from None
        if isinstance(done, Exception):
            raise done
        decision = pb2.RouterDecision(kind=job.kind, raw_output=done.raw, fallback_used=done.fallback)
        return pb2.PredictResponse(
            answer=done.answer, expert=done.expert.task, router=decision,
            latency=pb2.Latency(route_ms=done.route_ms, answer_ms=done.answer_ms,
                                total_ms=(time.perf_counter() - t0) * 1000))

    def Predict(self, request, context):
        try:
            return self.predict(request)
        except RequestError as e:
            context.abort(e.code, e.message)
        except AdapterError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"adapter problem: {e}")
        except Exception as e:  # noqa: BLE001 - logged here, one line to the client
            log.exception("Predict failed")
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")

    def ListExperts(self, request, context):
        return pb2.ListExpertsResponse(experts=[
            pb2.Expert(id=e.id, task=e.task, description=e.description, adapter_version=e.version)
            for e in self.model.experts])


def build_server(servicer: ContinualLearningServicer, port: int, host: str = "127.0.0.1",
                 max_workers: int | None = None, *, token: str | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None, insecure: bool = False) -> tuple[grpc.Server, int]:
    """A server (not yet started) with the servicer, health and reflection; returns ``(server, bound_port)``.

    Safe by default (:mod:`cl_service.serve.security`): messages larger than the request limits allow are
    refused before any handler runs; ``token`` makes every cl.v1 call need it (checked before the request is
    deserialized); ``tls_cert`` + ``tls_key`` (PEM) serve TLS; a non-loopback ``host`` without a token raises
    :class:`~cl_service.serve.security.InsecureExposure` unless ``insecure``."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    require_safe_exposure(host, token, insecure)
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both a certificate and its key (--tls-cert and --tls-key)")
    creds = server_credentials(tls_cert, tls_key) if tls_cert is not None else None
    limit = grpc_message_limit(servicer.limits)
    # Enough handler threads to fill a batch: each waits on its request's future while the stages run.
    workers = max_workers or servicer.max_batch * 2
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         interceptors=([TokenInterceptor(token)] if token else []) + [DecodeGuard()],
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


def serve_local(run_dir: str | Path, port: int, host: str = "127.0.0.1", engine: Any = None,
                wait: bool = True, *, token: str | None = None, tls_cert: str | Path | None = None,
                tls_key: str | Path | None = None, insecure: bool = False, **limits: Any) -> tuple[grpc.Server, int]:
    """Serve ``run_dir`` on ``host:port`` (0 = ephemeral); blocks unless ``wait=False``. ``token``, TLS and
    ``insecure`` as in :func:`build_server`; ``limits``: :class:`ContinualLearningServicer` keywords."""
    require_safe_exposure(host, token, insecure)  # before the model loads
    server, bound = build_server(ContinualLearningServicer(run_dir, engine, **limits), port, host, token=token,
                                 tls_cert=tls_cert, tls_key=tls_key, insecure=insecure)
    server.start()
    log.info("cl.v1.ContinualLearning serving %s on %s:%d", run_dir, host, bound)
    if wait:
        server.wait_for_termination()
    return server, bound


def local_server(results: str | Path, port: int | None, host: str | None = None, *, insecure: bool = False,
                 tls_cert: str | None = None, tls_key: str | None = None, token_env: str = "CLSVC_TOKEN",
                 **kw: Any) -> tuple[ContinualLearningServicer, grpc.Server, int]:
    """``clsvc serve --local``: servicer and (not started) server on ``host`` (default 127.0.0.1) and ``port``
    (default 9000), requiring ``$token_env`` when it is set; the exposure check runs before the model loads."""
    import os

    host, token = host or "127.0.0.1", os.environ.get(token_env) or None
    require_safe_exposure(host, token, insecure)
    servicer = ContinualLearningServicer(results, **kw)
    try:
        server, bound = build_server(servicer, 9000 if port is None else port, host, token=token, tls_cert=tls_cert,
                                     tls_key=tls_key, insecure=insecure)
    except BaseException:
        servicer.close()
        raise
    return servicer, server, bound


def _merge(mids: list[tuple[Any, list]]) -> tuple[Any, list]:
    """Routed batches that wait for stage two together become one answer batch."""
    return [v for states, _ in mids for v in states], [r for _, routed in mids for r in routed]
