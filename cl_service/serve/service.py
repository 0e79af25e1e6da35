"""A plain (no Ray) gRPC servicer over an :class:`Engine` and a finished run folder.

Two-stage inference: route with the run's latest MLLM router (pool = experts in stream order, descriptions
from their ``adapter.json``), then answer with base + the chosen expert. Bad requests get
``INVALID_ARGUMENT`` / ``NOT_FOUND`` with a clear message; unexpected failures get ``INTERNAL`` with a
one-line message, never a traceback.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from cl_service.adapters.registry import AdapterError
from cl_service.data.schema import Sample
from cl_service.serve.catalog import Catalog, ExpertEntry, Limits, RequestError, parse_predict
from cl_service.serve.proto import load as load_proto

log = logging.getLogger(__name__)
pb2, pb2_grpc = load_proto()

MAX_IMAGE_BYTES = 8 * 1024 * 1024
MAX_IMAGES = 16
MAX_NEW_TOKENS_LIMIT = 256

__all__ = ["ContinualLearningServicer", "ExpertEntry", "RequestError", "RunModel", "build_server", "serve_local"]


class RunModel:
    """What a run offers for serving (a :class:`Catalog` snapshot, swapped by :meth:`reload`) and the engine."""

    def __init__(self, run_dir: str | Path, engine: Any = None) -> None:
        self.run_dir = Path(run_dir)
        self.catalog = Catalog.load(self.run_dir)
        if engine is None:
            from cl_service.engine.engine import Engine

            engine = Engine(self.catalog.resolved["base"])
            engine.max_new_tokens = int(self.catalog.run_setting("eval", "max_new_tokens", engine.max_new_tokens))
            engine.router_max_new_tokens = int(self.catalog.run_setting("router", "max_new_tokens",
                                                                        engine.router_max_new_tokens))
        self.engine = engine
        self.lock = threading.Lock()  # one generate at a time on the shared model

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
        """Swap in the run's newly published experts/router; True when anything changed."""
        new = Catalog.load(self.run_dir)
        changed = new.fingerprint != self.catalog.fingerprint
        self.catalog = new
        return changed


class ContinualLearningServicer(pb2_grpc.ContinualLearningServicer):
    def __init__(self, run_dir: str | Path, engine: Any = None, *, max_image_bytes: int = MAX_IMAGE_BYTES,
                 max_images: int = MAX_IMAGES, max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT) -> None:
        self.model = RunModel(run_dir, engine)
        self.limits = Limits(max_image_bytes=max_image_bytes, max_images=max_images,
                             max_new_tokens=max_new_tokens_limit)
        self.max_image_bytes = max_image_bytes
        self.max_images = max_images

    def _sample(self, request) -> Sample:
        return parse_predict(request, self.limits)[0]

    # ------------------------------------------------------------------ handlers
    def predict(self, request) -> "pb2.PredictResponse":
        """The Predict logic without gRPC plumbing; raises :class:`RequestError`."""
        t0 = time.perf_counter()
        sample, n = parse_predict(request, self.limits)  # shared with the Ray Serve ingress
        m = self.model
        route_ms = 0.0
        with m.lock:
            if request.HasField("expert"):
                expert = m.find(request.expert)
                decision = pb2.RouterDecision(kind="request")
            elif m.router_dir is None or m.pool is None:
                if len(m.experts) > 1:
                    raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                       "the run has no usable MLLM router; name an expert: "
                                       + ", ".join(e.task for e in m.experts))
                expert = m.experts[0]
                decision = pb2.RouterDecision(kind="single")
            else:
                t1 = time.perf_counter()
                route = m.engine.route_mllm([sample], str(m.router_dir), m.pool)[0]
                route_ms = (time.perf_counter() - t1) * 1000
                expert = m.find(route.expert)
                decision = pb2.RouterDecision(kind="mllm", raw_output=route.raw, fallback_used=bool(route.fallback))
            t2 = time.perf_counter()
            answer = m.engine.answer([sample], str(expert.path), n)[0]
            answer_ms = (time.perf_counter() - t2) * 1000
        return pb2.PredictResponse(
            answer=answer, expert=expert.task, router=decision,
            latency=pb2.Latency(route_ms=route_ms, answer_ms=answer_ms, total_ms=(time.perf_counter() - t0) * 1000))

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
                 max_workers: int = 4) -> tuple[grpc.Server, int]:
    """A server (not yet started) with the servicer, health and reflection; returns ``(server, bound_port)``."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    limit = servicer.max_image_bytes * servicer.max_images + 1024 * 1024
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
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
