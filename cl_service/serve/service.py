"""A plain (no Ray) gRPC servicer over an :class:`Engine` and a finished run folder.

Two-stage inference: route with the run's latest MLLM router (pool = experts in stream order, descriptions
from their ``adapter.json``), then answer with base + the chosen expert. Concurrent requests are batched
and the two stages overlap (:class:`cl_service.engine.Pipeline`): the router works on the next batch while
the experts answer the last, every expert of a batch in one pass (:meth:`Engine.answer_mixed`). Bad
requests get ``INVALID_ARGUMENT`` / ``NOT_FOUND`` with a clear message; unexpected failures get
``INTERNAL`` with a one-line message, never a traceback.
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
from cl_service.serve.catalog import Catalog, ExpertEntry, Limits, RequestError, parse_predict
from cl_service.serve.proto import load as load_proto
from cl_service.serve.twostage import answer_grouped, per_sample_states, route_grouped

log = logging.getLogger(__name__)
pb2, pb2_grpc = load_proto()

MAX_IMAGE_BYTES = 8 * 1024 * 1024
MAX_IMAGES = 16
MAX_NEW_TOKENS_LIMIT = 256
MAX_BATCH = 16          # requests per routing/answering batch
REQUEST_TIMEOUT_S = 600.0

__all__ = ["ContinualLearningServicer", "ExpertEntry", "RequestError", "RunModel", "build_server", "serve_local"]


class RunModel:
    """What a run offers for serving (a :class:`Catalog` snapshot, swapped by :meth:`reload`) and the engine."""

    def __init__(self, run_dir: str | Path, engine: Any = None, device: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.catalog = Catalog.load(self.run_dir)
        if engine is None:
            from cl_service.engine.engine import Engine

            engine = Engine(self.catalog.resolved["base"], device=device, **self.catalog.base_settings())
            engine.max_new_tokens = int(self.catalog.run_setting("eval", "max_new_tokens", engine.max_new_tokens))
            engine.router_max_new_tokens = int(self.catalog.run_setting("router", "max_new_tokens",
                                                                        engine.router_max_new_tokens))
        self.engine = engine
        self.lock = threading.Lock()  # guards the catalog swap in reload()

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
        """Swap in the run's newly published experts/router; True when anything changed. Requests in
        flight finish with the catalog they started with."""
        new = Catalog.load(self.run_dir)
        with self.lock:
            changed = new.fingerprint != self.catalog.fingerprint
            self.catalog = new
        return changed


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
                 request_timeout_s: float = REQUEST_TIMEOUT_S, device: str | None = None) -> None:
        self.model = RunModel(run_dir, engine, device)
        self.limits = Limits(max_image_bytes=max_image_bytes, max_images=max_images,
                             max_new_tokens=max_new_tokens_limit)
        self.max_image_bytes = max_image_bytes
        self.max_images = max_images
        self.max_batch = max_batch
        self.request_timeout_s = request_timeout_s
        self.pipeline = Pipeline(self._route, self._answer, device=self.model.engine.mllm.device,
                                 max_batch=max_batch, wait_s=batch_wait_ms / 1000, merge=_merge,
                                 name="clsvc-grpc")

    def close(self, timeout_s: float = 60.0) -> None:
        """Finish the requests in flight and stop the batching threads."""
        self.pipeline.close(timeout_s)

    def _sample(self, request) -> Sample:
        return parse_predict(request, self.limits)[0]

    # ------------------------------------------------------------------ the two stages (batched)
    def _route(self, jobs: list[_Job]) -> tuple[Any, list]:
        """Stage one: CLIP once per request, then the MLLM router for the requests that name no expert
        (one call per catalog snapshot). Returns (per-request CLIP states, per-request route or error)."""
        engine = self.model.engine
        samples = [j.sample for j in jobs]
        states = per_sample_states(engine.vision_states(samples), samples)
        todo = [i for i, j in enumerate(jobs) if j.expert is None]
        routed: list = [None] * len(jobs)
        if todo:
            t0 = time.perf_counter()

            catalogs = {id(jobs[i].catalog): jobs[i].catalog for i in todo}

            def route(group: list, key: int, vs: Any) -> list:
                catalog = catalogs[key]
                return engine.route_mllm(group, str(catalog.router_dir), catalog.pool, vision_states=vs)

            routes = route_grouped([samples[i] for i in todo], [id(jobs[i].catalog) for i in todo],
                                   [states[i] for i in todo], route)
            ms = (time.perf_counter() - t0) * 1000
            for i, r in zip(todo, routes):
                try:
                    routed[i] = (jobs[i].catalog.find(r.expert), r.raw, bool(r.fallback), ms)
                except RequestError as e:  # the router named an expert this catalog lacks
                    routed[i] = e
        for i, j in enumerate(jobs):
            if j.expert is not None:
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
            texts = answer_grouped(self.model.engine, [jobs[i].sample for i in ok],
                                   [str(routed[i][0].path) for i in ok], [jobs[i].max_new_tokens for i in ok],
                                   [states[i] for i in ok])
            ms = (time.perf_counter() - t0) * 1000
            for i, t in zip(ok, texts):
                expert, raw, fallback, route_ms = routed[i]
                out[i] = _Done(t, expert, raw, fallback, route_ms, ms)
        return out

    # ------------------------------------------------------------------ handlers
    def predict(self, request) -> "pb2.PredictResponse":
        """The Predict logic without gRPC plumbing; raises :class:`RequestError`."""
        t0 = time.perf_counter()
        sample, n = parse_predict(request, self.limits)  # shared with the Ray Serve ingress
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
                 max_workers: int | None = None) -> tuple[grpc.Server, int]:
    """A server (not yet started) with the servicer, health and reflection; returns ``(server, bound_port)``."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    limit = servicer.max_image_bytes * servicer.max_images + 1024 * 1024
    # Enough handler threads to fill a batch: each waits on its request's future while the stages run.
    workers = max_workers or servicer.max_batch * 2
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         options=[("grpc.max_receive_message_length", limit)])
    pb2_grpc.add_ContinualLearningServicer_to_server(servicer, server)
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    service_name = pb2.DESCRIPTOR.services_by_name["ContinualLearning"].full_name
    for name in ("", service_name):
        hs.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    return server, bound


def serve_local(run_dir: str | Path, port: int, host: str = "127.0.0.1", engine: Any = None,
                wait: bool = True, **limits: Any) -> tuple[grpc.Server, int]:
    """Serve ``run_dir`` on ``host:port`` (0 = ephemeral); blocks unless ``wait=False``."""
    server, bound = build_server(ContinualLearningServicer(run_dir, engine, **limits), port, host)
    server.start()
    log.info("cl.v1.ContinualLearning serving %s on %s:%d", run_dir, host, bound)
    if wait:
        server.wait_for_termination()
    return server, bound


def _merge(mids: list[tuple[Any, list]]) -> tuple[Any, list]:
    """Routed batches that wait for stage two together become one answer batch."""
    return [v for states, _ in mids for v in states], [r for _, routed in mids for r in routed]
