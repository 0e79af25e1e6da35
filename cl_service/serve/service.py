"""A plain (no Ray) gRPC servicer over an :class:`Engine` and a finished run folder.

Two-stage inference: route with the run's latest MLLM router (pool = experts in stream order, descriptions
from their ``adapter.json``), then answer with base + the chosen expert. Bad requests get
``INVALID_ARGUMENT`` / ``NOT_FOUND`` with a clear message; unexpected failures get ``INTERNAL`` with a
one-line message, never a traceback.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cl_service.adapters.registry import AdapterError, AdapterRegistry, read_adapter
from cl_service.data.images import BadImage, validate_image
from cl_service.data.schema import Sample
from cl_service.routers.prompt import Pool
from cl_service.serve.proto import load as load_proto

log = logging.getLogger(__name__)
pb2, pb2_grpc = load_proto()

MAX_IMAGE_BYTES = 8 * 1024 * 1024
MAX_IMAGES = 16
MAX_NEW_TOKENS_LIMIT = 256


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ExpertEntry:
    id: str
    task: str
    description: str
    version: int
    path: Path


class RunModel:
    """What a finished run offers for serving: experts in stream order, the latest MLLM router, the engine."""

    def __init__(self, run_dir: str | Path, engine: Any = None) -> None:
        self.run_dir = Path(run_dir)
        resolved = json.loads((self.run_dir / "config.resolved.json").read_text())
        self.tasks: list[str] = list(resolved["tasks"])
        cfg = resolved.get("config", {})
        adapters = AdapterRegistry(self.run_dir / "adapters").scan()
        self.experts: list[ExpertEntry] = []
        for t in self.tasks:
            info = adapters.get(f"expert:{t}")
            if info is not None:
                read_adapter(info.path)  # checksums verified once at start
                self.experts.append(ExpertEntry(info.id, info.task, info.description, info.version, info.path))
        if not self.experts:
            raise AdapterError(f"run {self.run_dir} holds no complete expert adapter")
        self.router_dir: Path | None = None
        self.pool: Pool | None = None
        known = [e.task for e in self.experts]
        for i in range(len(self.tasks) - 1, 0, -1):
            d = self.run_dir / "adapters" / "router" / f"stage-{i}-{self.tasks[i]}"
            seen = self.tasks[: i + 1]
            if (d / "adapter.json").is_file() and all(t in known for t in seen):
                read_adapter(d)
                self.router_dir = d
                by = {e.task: e for e in self.experts}
                self.pool = Pool(tuple(seen), tuple(by[t].description for t in seen))
                break
        if engine is None:
            from cl_service.engine.engine import Engine

            engine = Engine(resolved["base"])
            engine.max_new_tokens = int(cfg.get("eval", {}).get("max_new_tokens", engine.max_new_tokens))
            engine.router_max_new_tokens = int(cfg.get("router", {}).get("max_new_tokens",
                                                                          engine.router_max_new_tokens))
        self.engine = engine
        self.lock = threading.Lock()  # one generate at a time on the shared model

    def find(self, name: str) -> ExpertEntry:
        for e in self.experts:
            if name in (e.task, e.id):
                return e
        raise RequestError(grpc.StatusCode.NOT_FOUND,
                           f"unknown expert {name!r}; known experts: {', '.join(e.task for e in self.experts)}")


class ContinualLearningServicer(pb2_grpc.ContinualLearningServicer):
    def __init__(self, run_dir: str | Path, engine: Any = None, *, max_image_bytes: int = MAX_IMAGE_BYTES,
                 max_images: int = MAX_IMAGES, max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT) -> None:
        self.model = RunModel(run_dir, engine)
        self.max_image_bytes = max_image_bytes
        self.max_images = max_images
        self.max_new_tokens_limit = max_new_tokens_limit

    # ------------------------------------------------------------------ validation
    def _sample(self, request) -> Sample:
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if not request.images:
            raise RequestError(bad, "images: at least one image (PNG or JPEG bytes) is required")
        if len(request.images) > self.max_images:
            raise RequestError(bad, f"images: {len(request.images)} given, at most {self.max_images} allowed")
        images = []
        for i, data in enumerate(request.images):
            if not data:
                raise RequestError(bad, f"images[{i}]: empty bytes")
            if len(data) > self.max_image_bytes:
                raise RequestError(bad, f"images[{i}]: {len(data)} bytes, over the limit of {self.max_image_bytes}")
            try:
                images.append(validate_image(bytes(data)))
            except BadImage as e:
                raise RequestError(bad, f"images[{i}]: not a decodable image ({e})") from None
            except Exception as e:  # noqa: BLE001 - PIL raises many kinds
                raise RequestError(bad, f"images[{i}]: not a decodable image ({type(e).__name__})") from None
        if not request.question.strip():
            raise RequestError(bad, "question: must not be empty")
        return Sample(task="serve", split="test", id="request", images=images, question=request.question,
                      answers=[""], scorer="exact")

    def _max_new_tokens(self, request) -> int | None:
        if not request.HasField("max_new_tokens"):
            return None
        n = request.max_new_tokens
        if not 1 <= n <= self.max_new_tokens_limit:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"max_new_tokens: {n} is outside [1, {self.max_new_tokens_limit}]")
        return n

    # ------------------------------------------------------------------ handlers
    def predict(self, request) -> "pb2.PredictResponse":
        """The Predict logic without gRPC plumbing; raises :class:`RequestError`."""
        t0 = time.perf_counter()
        sample = self._sample(request)
        n = self._max_new_tokens(request)
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
