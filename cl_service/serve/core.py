"""The whole decision for one request, the same in both serving stacks.

:class:`ServeCore` is what the plain gRPC servicer (``clsvc serve --local``, :mod:`cl_service.serve.service`) and
the Ray Serve ingress (:mod:`cl_service.on_ray.serve`) both run for ``Predict`` (gRPC and OpenAI HTTP alike):

1. the shared token, before any work (:mod:`cl_service.serve.auth`);
2. validation against ``ServeCfg.limits``: images decoded and checked, the question, ``max_new_tokens``; the
   decoding runs in a small thread pool, off the event loop that takes the requests;
3. the route: the expert the request names, the run's only expert, or the router ``router_kind`` names
   (``mllm``: the run's latest MLLM router and its pool; ``prototype`` / ``ridge`` / ``knn``: the feature router
   the run saved, a prototype router fitted on the run's data when it saved none), from the catalog snapshot
   the request started with (hot add swaps in new snapshots, :class:`~cl_service.serve.hotadd.CatalogWatch`);
4. stage one and stage two through a :class:`Stages` (in process: :class:`~cl_service.serve.stages.TwoStages`;
   on Ray: deployment handles), the answer whole or streamed;
5. errors: every failure becomes a :class:`~cl_service.serve.catalog.RequestError` with a status and a
   one-line message for the client that names no server path (the full error goes to the log).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Protocol

import grpc

from cl_service.adapters.registry import AdapterError
from cl_service.serve.auth import check_token
from cl_service.serve.catalog import DECODED, Catalog, ExpertEntry, RequestError, parse_predict
from cl_service.serve.config import ServeCfg
from cl_service.serve.hotadd import CatalogWatch
from cl_service.serve.proto import load as load_proto

log = logging.getLogger(__name__)
pb2, _ = load_proto()

__all__ = ["Routed", "ServeCore", "Stages"]


class Stages(Protocol):
    """Stage one and stage two as the core calls them (awaitables; any process)."""

    def route(self, sample: Any, router_dir: str | None, experts: tuple[str, ...],
              descriptions: tuple[str, ...]) -> Awaitable[tuple[Any, Any]]: ...

    def answer(self, sample: Any, adapter: str, max_new_tokens: int | None, vision_states: Any) -> Awaitable[Any]: ...

    def answer_stream(self, sample: Any, adapter: str, max_new_tokens: int | None,
                      vision_states: Any) -> AsyncIterator[Any]: ...


@dataclass(frozen=True)
class Routed:
    """The first item of a streamed answer: the expert that answers (task name) and how it was chosen."""
    expert: str
    decision: Any  # cl.v1.RouterDecision


@dataclass(frozen=True)
class RowPlan:
    """Where a request goes: a named (or the only) expert, or stage one with these arguments."""
    kind: str
    expert: ExpertEntry | None
    route_args: tuple | None


class ServeCore:
    """One served run: the catalog (hot add), the limits and token, and the request decision over ``stages``.

    ``lost(exc)``: whether an exception means the stage's process was lost (``UNAVAILABLE``, the client retries;
    on Ray a replica that died). ``decode_workers``: threads that decode images, base64 and JSON off the event
    loop. ``stats`` counts the calls that reached it (``calls``) and those that passed the token check
    (``requests``)."""

    def __init__(self, cfg: ServeCfg, stages: Stages, token_sha256: str | None, *,
                 lost: Callable[[BaseException], bool] = lambda e: False, decode_workers: int = 4) -> None:
        self.cfg, self.stages, self.token_sha256, self.lost = cfg, stages, token_sha256, lost
        self.limits = cfg.limits
        self.watch = CatalogWatch(cfg.results, retry_s=max(cfg.watch_s, 1.0), method=cfg.method, stage=cfg.stage)
        self.stats: Counter[str] = Counter()
        self._pool = ThreadPoolExecutor(decode_workers, thread_name_prefix="clsvc-decode")
        self._watch_s = cfg.watch_s
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="clsvc-catalog-watch", daemon=True)
        self._watcher.start()

    # ------------------------------------------------------------------ catalog (hot add)
    @property
    def catalog(self) -> Catalog:
        return self.watch.catalog  # one reference: a request keeps the snapshot it took

    def reload(self) -> bool:
        """Swap in a new catalog if the run published anything that verifies; True when it changed."""
        return self.watch.poll()

    def set_watch(self, every_s: float) -> None:
        """Poll the results folder every ``every_s`` seconds (0 = never)."""
        self._watch_s = float(every_s)

    def _watch(self) -> None:
        while not self._stop.wait(self._watch_s if self._watch_s > 0 else 1.0):
            if self._watch_s <= 0:
                continue
            try:
                self.reload()
            except Exception as e:  # noqa: BLE001 - a half-written run must not stop the watcher
                log.warning("catalog reload skipped: %s", e)

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ plumbing
    def authorize(self, metadata: Iterable[tuple[str, str]]) -> None:
        """``UNAUTHENTICATED`` unless the call carries the shared token (when one is set)."""
        check_token(metadata, self.token_sha256)

    async def off_loop(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` in the decode pool: image, base64 and JSON decoding leave the event loop free."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def info(self) -> dict:
        cat = self.catalog
        return {"experts": [e.task for e in cat.experts], "router_dir": str(cat.router_dir or ""),
                "fingerprint": cat.fingerprint, "reloads": self.watch.reloads,
                "calls": self.stats["calls"], "requests": self.stats["requests"],
                "images_decoded": DECODED["images"]}

    # ------------------------------------------------------------------ cl.v1
    def list_experts(self, metadata: Iterable[tuple[str, str]]) -> Any:
        self.stats["calls"] += 1
        self.authorize(metadata)
        return pb2.ListExpertsResponse(experts=[
            pb2.Expert(id=e.id, task=e.task, description=e.description, adapter_version=e.version)
            for e in self.catalog.experts])

    async def predict(self, request: Any, metadata: Iterable[tuple[str, str]]) -> Any:
        """A ``cl.v1.PredictResponse``; raises :class:`RequestError`."""
        response = None
        async for item in self._predict(request, metadata, stream=False):
            response = item
        return response

    async def predict_stream(self, request: Any, metadata: Iterable[tuple[str, str]]) -> AsyncIterator[Any]:
        """:class:`Routed` once the expert is chosen, the answer's text in pieces (``str``) as it is decoded, then
        the ``cl.v1.PredictResponse`` (whose ``answer`` is their concatenation); raises :class:`RequestError`."""
        async for item in self._predict(request, metadata, stream=True):
            yield item

    def plan(self, request: Any, cat: Catalog) -> RowPlan:
        """The expert the request names, the run's only expert, or stage one's arguments for ``router_kind``."""
        if request.HasField("expert"):
            return RowPlan("request", cat.find(request.expert), None)
        if len(cat.experts) == 1:
            return RowPlan("single", cat.experts[0], None)
        kind, names = self.cfg.router_kind, ", ".join(e.task for e in cat.experts)
        if kind == "mllm":
            if cat.pool is None or cat.router_dir is None:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"the run has no usable MLLM router yet; name an expert: {names}")
            return RowPlan(kind, None, (str(cat.router_dir), cat.pool.experts, cat.pool.descriptions))
        saved = cat.feature_routers.get(kind)
        if saved is None and kind != "prototype":
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"the run saved no {kind} router; name an expert: {names}")
        experts = saved[1] if saved else tuple(e.task for e in cat.experts)
        return RowPlan(kind, None, (str(saved[0]) if saved else None, experts,
                                  tuple(cat.find(t).description for t in experts)))

    async def _predict(self, request: Any, metadata: Iterable[tuple[str, str]], stream: bool) -> AsyncIterator[Any]:
        t0 = time.perf_counter()
        self.stats["calls"] += 1
        self.authorize(metadata)  # before any work: nothing is decoded for a caller without the token
        self.stats["requests"] += 1
        stage, expert = "Router", None
        try:
            sample, n = await self.off_loop(parse_predict, request, self.limits)
            cat = self.catalog
            plan = self.plan(request, cat)
            expert, route_ms, states = plan.expert, 0.0, None
            decision = pb2.RouterDecision(kind=plan.kind)
            if plan.route_args is not None:
                t1 = time.perf_counter()
                route, states = await self.stages.route(sample, *plan.route_args)
                route_ms = (time.perf_counter() - t1) * 1000
                expert = cat.find(route.expert)
                decision = pb2.RouterDecision(kind=plan.kind, raw_output=route.raw, fallback_used=bool(route.fallback))
            t2, stage = time.perf_counter(), "Expert"
            if stream:
                yield Routed(expert.task, decision)
                answer = None
                async for piece in self.stages.answer_stream(sample, str(expert.path), n, states):
                    if isinstance(piece, str):
                        yield piece
                    else:
                        answer = piece
            else:
                answer = await self.stages.answer(sample, str(expert.path), n, states)
            now = time.perf_counter()
            yield pb2.PredictResponse(
                answer=answer.text, expert=expert.task, router=decision,
                latency=pb2.Latency(route_ms=route_ms, answer_ms=(now - t2) * 1000, total_ms=(now - t0) * 1000),
                usage=pb2.Usage(prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens,
                                total_tokens=answer.prompt_tokens + answer.completion_tokens),
                finish_reason=answer.finish_reason)
        except Exception as e:  # noqa: BLE001 - every failure reaches the client as one public line
            raise self.public_error(e, stage, expert) from None

    # ------------------------------------------------------------------ errors
    def public_error(self, e: BaseException, stage: str = "", expert: ExpertEntry | None = None) -> RequestError:
        """What the client learns of ``e``: its status and a one-line message without server paths (adapter and
        router folders stay in the server's log)."""
        if isinstance(e, RequestError):
            return RequestError(e.code, self.scrub(e.message))
        if isinstance(e, AdapterError) or _is_router_file_error(e):
            log.error("%s stage: %s", stage or "serving", e)
            what = (f"the adapter of expert {expert.task!r}" if stage == "Expert" and expert is not None
                    else f"the run's {self.cfg.router_kind} router")
            return RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{what} cannot be loaded (missing, incomplete or failing its checksums); the "
                                "server log names the file")
        if self.lost(e):  # a new process is being started; the request is idempotent: clients retry
            log.warning("Predict: the %s replica was lost (%s)", stage, type(e).__name__)
            return RequestError(grpc.StatusCode.UNAVAILABLE,
                                f"the {stage} replica serving this request was lost ({type(e).__name__}); Serve "
                                "is starting a new one: retry")
        log.error("Predict failed in the %s stage", stage or "serving", exc_info=e)
        return RequestError(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")

    def scrub(self, message: str) -> str:
        """``message`` with the run's folder (and the base's) replaced: a second line of defence, the messages
        this package writes name experts, never files."""
        for folder, name in ((self.catalog.run_dir, "<run>"), (self.catalog.resolved.get("base"), "<base>")):
            if folder:
                message = message.replace(str(folder), name)
        return message


def _is_router_file_error(e: BaseException) -> bool:
    from cl_service.routers.store import RouterFileError

    return isinstance(e, RouterFileError)
