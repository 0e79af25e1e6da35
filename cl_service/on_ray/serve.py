"""Ray Serve application: a gRPC ingress, a Router deployment and Expert replicas over one frozen base.

    Ingress (cl.v1 + grpc.health.v1 through Serve's gRPC proxy; OpenAI-compatible HTTP through its HTTP proxy)
      -> Router.route    batched: requests of many clients routed in one generate (MLLM router LoRA)
      -> Expert.answer   batched: rows for different experts answered in one call (engine LRU of adapters)

Both model deployments batch with :class:`~cl_service.serve.batcher.Batcher`, which gathers a batch when the
model is free; Serve's ``@serve.batch`` forms batches while the model is busy, so a loaded replica ran small
batches one after another.

Experts are addressed by id through the adapter registry (:class:`~cl_service.serve.catalog.Catalog`); the
ingress turns ids into adapter folders, Router/Expert replicas load them into their engine's adapter cache
(so any replica serves any expert, and one batch mixes experts; Serve's model multiplexing would pin a
batch to one adapter). Hot add: the ingress polls the results folder (``watch_s``) and swaps in a new
catalog when the run publishes an expert or a retrained router; requests in flight keep their snapshot.

Build with :func:`build_app` (``serve deploy`` / ``serve run cl_service.on_ray.serve:build_app``) or start
locally with :func:`start` (:mod:`cl_service.on_ray.serve_start`, re-exported here with ``serve_main``,
``wait_running``, ``override``, ``parse_args`` and ``grpc_options``). With that module, the only one that
imports Ray Serve.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError

from cl_service._cfgload import from_dict, to_dict
from cl_service.adapters.registry import AdapterError
from cl_service.on_ray.serve_start import (grpc_options, override, parse_args, serve_main, start,  # noqa: F401
                                           wait_running)  # re-exported: they lived here
from cl_service.routers.base import over_states
from cl_service.serve.auth import check_token, token_sha256
from cl_service.serve.batcher import Batcher
from cl_service.serve.catalog import Catalog, Limits, RequestError, budget_error, parse_predict
from cl_service.serve.config import ServeCfg, StageCfg, load_serve_cfg
from cl_service.serve.hotadd import CatalogWatch
from cl_service.serve.states import pack_states, unpack_states
from cl_service.serve.twostage import answer_grouped, per_sample_states, route_grouped, run_rows
from cl_service.serve import grpc_api  # module reference: cloudpickle re-imports it (and the stubs) in replicas

log = logging.getLogger("cl_service.serve")
SERVICE_NAME = grpc_api.pb2.DESCRIPTOR.services_by_name["ContinualLearning"].full_name


def replica_lost(e: BaseException) -> bool:
    """Whether a Router/Expert call failed because its replica died or became unreachable (``ActorDiedError``,
    ``ActorUnavailableError``: both ``RayActorError``; also when wrapped, e.g. in a ``RayTaskError`` or Serve's
    upstream-crash error) or the deployment has no healthy replica: a state Serve repairs by starting a new one,
    so the request may be sent again (``UNAVAILABLE``), unlike an error of the request itself."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, (RayActorError, DeploymentUnavailableError)):
            return True
        seen.add(id(e))
        e = getattr(e, "cause", None) or e.__cause__
    return False


def _engine(base: str, run: Catalog, stage: StageCfg, max_loaded: int = 16, max_host: int = 32):
    # Batches of varying size and length fragment a fixed-segment CUDA cache (two 7B replicas sharing an
    # H100 ran out with 15 GB reserved but unallocated); read when CUDA is first used in this process.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch

    from cl_service.engine.engine import Engine

    torch.set_num_threads(max(1, stage.torch_threads))
    # Ray sets CUDA_VISIBLE_DEVICES to the replica's (possibly shared) GPU.
    device = "cuda" if stage.num_gpus > 0 and torch.cuda.is_available() else None
    engine = Engine(base, max_loaded=max_loaded, device=device, max_host_adapters=max_host, **run.base_settings())
    engine.batch_size = max(engine.batch_size, stage.max_batch_size)  # a Serve batch is one engine pass
    engine.max_new_tokens = int(run.run_setting("eval", "max_new_tokens", engine.max_new_tokens))
    engine.router_max_new_tokens = int(run.run_setting("router", "max_new_tokens", engine.router_max_new_tokens))
    return engine


def _batcher(fn: Any, stage: StageCfg, stream: Any = None) -> Batcher:
    """Batches gathered when the model is free (not ``@serve.batch``: see :mod:`cl_service.serve.batcher`);
    the model runs in a worker thread so the replica keeps accepting requests meanwhile, on ``stream`` (a CUDA
    stream of its own when both stages share one replica) if given."""
    def on_stream(items: list) -> list:
        import torch

        with torch.cuda.stream(stream):
            out = fn(items)
        stream.synchronize()  # results leave the replica: nothing still running on the stream reads them
        return out

    async def run(items: list) -> list:
        return await asyncio.to_thread(fn if stream is None else on_stream, items)

    return Batcher(run, stage.max_batch_size, stage.batch_wait_ms / 1000.0)


@serve.deployment(name="Router")
class Router:
    """Stage one: choose an expert for each request. Kind ``mllm`` (base + the run's router LoRA, lettered
    pool prompt), or ``prototype`` / ``ridge`` / ``knn`` (the feature router the run saved under ``routers/<kind>/``)."""

    def __init__(self, cfg: dict, engine: Any = None, stream: Any = None) -> None:
        self.cfg = from_dict(ServeCfg, cfg)
        run = Catalog.load(self.cfg.results, verify=False)
        self.run = run
        self.engine = engine if engine is not None else _engine(
            run.resolved["base"], run, self.cfg.router, self.cfg.max_loaded_adapters, self.cfg.max_host_adapters)
        self._prototypes: dict[tuple[str, ...], Any] = {}
        self.batcher = _batcher(self._route, self.cfg.router, stream)

    async def route(self, sample, router_dir: str | None, experts: tuple[str, ...], descriptions: tuple[str, ...]):
        return await self.batcher.submit((sample, router_dir, experts, descriptions))

    def batch_log(self) -> list[tuple[float, float, int]]:
        """``(start, end, size)`` of the last 1000 batches (``time.time()``)."""
        return list(self.batcher.log)

    def _route(self, items: list[tuple]) -> list:
        """``[(sample, router_dir, experts, descriptions)] -> [(Route, vision_states of the sample or None)]``; a
        row the model cannot take gets its ``INVALID_ARGUMENT``, a row that fails its own error (only)."""
        return run_rows(self._route_rows, items, [budget_error(self.engine, it[0], 1) for it in items])

    def _route_rows(self, items: list[tuple]) -> list[tuple]:
        from cl_service.routers.prompt import Pool

        samples = [it[0] for it in items]
        packed: list = [None] * len(items)  # what travels to the Expert (through the ingress)
        on_device = None                    # the same states, on the model's device
        if self.cfg.share_vision_states:  # CLIP once per request, for both stages
            on_device = per_sample_states(self.engine.vision_states(samples), samples)
            packed = [pack_states(v) for v in on_device]

        def route(group: list, key: tuple, vs: Any) -> list:
            router_dir, experts, descs = key
            if self.cfg.router_kind == "mllm":
                return self.engine.route_mllm(group, router_dir, Pool(experts, descs), vision_states=vs)
            # prototype / knn features start from the shared CLIP states (knn: one short text-only pass)
            return over_states(self._feature_router(router_dir, experts), self.engine, vs).route(group)

        # a hot add mid-batch: two pools, two calls
        routes = route_grouped(samples, [it[1:4] for it in items], on_device, route)
        return [(r, packed[i]) for i, r in enumerate(routes)]

    def _feature_router(self, router_dir: str | None, experts: tuple[str, ...]):
        """The run's saved feature router (cached per folder content), or a prototype router fitted on the
        samples the offline evaluation would use when the run saved none."""
        key = (router_dir, experts if router_dir is None else (Path(router_dir) / "router.json").stat().st_mtime_ns)
        if key not in self._prototypes:
            if router_dir is not None:
                from cl_service.routers.store import load_router

                self._prototypes[key] = load_router(router_dir, self.engine)
            else:
                from cl_service.data.shards import ShardDataset
                from cl_service.routers.prototype import PrototypeRouter
                from cl_service.train.job import choose_with_copies

                ds = ShardDataset(self.run.resolved["dataset"])
                n = self.cfg.prototype_samples_per_task or int(self.run.run_setting("router", "samples_per_task", 20))
                seed = int(self.run.resolved.get("seed", 0)) + 7  # the seed the feature-routed methods use
                augment = int(self.run.run_setting("router", "augment", 0))
                per_task = {t: choose_with_copies(ds, t, "train", n, seed, augment) for t in experts}
                self._prototypes[key] = PrototypeRouter.fit(self.engine, per_task)
        return self._prototypes[key]


@serve.deployment(name="Expert")
class Expert:
    """Stage two: answer with base + the chosen expert. One batch holds rows for any mix of experts; with
    ``continuous``, requests join the running decode between steps instead (:mod:`cl_service.engine.continuous`)."""

    def __init__(self, cfg: dict, engine: Any = None, stream: Any = None) -> None:
        self.cfg = from_dict(ServeCfg, cfg)
        run = Catalog.load(self.cfg.results, verify=False)
        self.engine = engine if engine is not None else _engine(
            run.resolved["base"], run, self.cfg.expert, self.cfg.max_loaded_adapters, self.cfg.max_host_adapters)
        self.batcher = self.cont = None
        if self.cfg.continuous:
            self.cont = self.engine.continuous(slots=self.cfg.expert.max_batch_size, max_queue=self.cfg.max_queued,
                                               wait_s=self.cfg.expert.batch_wait_ms / 1000.0, stream=stream)
            self._clock = time.time() - time.perf_counter()  # its log is in perf_counter seconds
        else:
            self.batcher = _batcher(self._answer, self.cfg.expert, stream)

    async def answer(self, sample, adapter: str, max_new_tokens: int | None, vision_states: Any = None) -> str:
        if self.cont is None:
            if self.batcher.queued >= self.cfg.max_queued:
                raise _busy(self.batcher.queued, self.cfg.max_queued)
            return await self.batcher.submit((sample, adapter, max_new_tokens, vision_states))
        from cl_service.engine.continuous import QueueFull

        err = budget_error(self.engine, sample, max_new_tokens)
        if err is not None:
            raise err
        vs = None if vision_states is None else unpack_states([vision_states], "cpu")  # the worker moves it
        try:
            fut = self.cont.submit(sample, adapter, max_new_tokens, vs)
        except QueueFull:
            raise _busy(self.cont.queued, self.cfg.max_queued) from None
        return await asyncio.wrap_future(fut)

    def _answer(self, items: list[tuple]) -> list:
        """Rows for different experts share each forward pass (``Engine.answer_mixed``); one call per
        distinct ``max_new_tokens``. A row over the model's token budget gets its ``INVALID_ARGUMENT``, a row
        that fails its own error; the others their answers."""
        return run_rows(self._answer_rows, items, [budget_error(self.engine, it[0], it[2]) for it in items])

    def _answer_rows(self, items: list[tuple]) -> list[str]:
        samples = [it[0] for it in items]
        vs = unpack_states([it[3] for it in items], self.engine.mllm.device)  # one transfer for the batch
        return answer_grouped(self.engine, samples, [it[1] for it in items], [it[2] for it in items],
                              None if vs is None else per_sample_states(vs, samples))

    def batch_sizes(self) -> list[int]:
        return [n for _, _, n in self.batch_log()]

    def batch_log(self) -> list[tuple[float, float, int]]:
        """``(start, end, size)`` of the last 1000 batches (``time.time()``); with ``continuous``, of the last
        prefills of requests joining the decode."""
        if self.cont is None:
            return list(self.batcher.log)
        return self._log("prefill")

    def step_log(self) -> list[tuple[float, float, int]]:
        """With ``continuous``: ``(start, end, rows decoding)`` of the last decode steps (``time.time()``)."""
        return self._log("step") if self.cont is not None else []

    def _log(self, kind: str) -> list[tuple[float, float, int]]:
        return [(a + self._clock, b + self._clock, n) for k, a, b, n in list(self.cont.log) if k == kind]


def _busy(queued: int, limit: int) -> RequestError:
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"the server is busy: {queued} requests already wait for an answer (max_queued={limit}); "
                        "retry later")


@serve.deployment(name="Ingress")
class Ingress:
    """The gRPC ingress: validation, shared-token check, the catalog (hot add), health; calls Router/Expert."""

    def __init__(self, router: Any, expert: Any, cfg: dict, token_sha256: str | None) -> None:
        self.cfg = from_dict(ServeCfg, cfg)
        self.router = router
        self.expert = expert
        self.limits = Limits(**asdict(self.cfg.limits))
        self.token_sha256 = token_sha256
        self.watch = CatalogWatch(self.cfg.results, retry_s=max(self.cfg.watch_s, 1.0))
        self._watch_s = self.cfg.watch_s
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="clsvc-catalog-watch", daemon=True)
        self._watcher.start()

    # ------------------------------------------------------------------ hot add
    @property
    def catalog(self) -> Catalog:
        return self.watch.catalog  # one reference: requests in flight keep the snapshot they took

    def reload(self) -> bool:
        """Swap in a new catalog if the run published anything that verifies (what does not is verified again
        on a later poll: :class:`~cl_service.serve.hotadd.CatalogWatch`); True when it changed."""
        return self.watch.poll()

    def _watch(self) -> None:
        while not self._stop.wait(self._watch_s if self._watch_s > 0 else 1.0):
            if self._watch_s <= 0:
                continue
            try:
                self.reload()
            except Exception as e:  # noqa: BLE001 - a half-written run must not kill the watcher
                log.warning("catalog reload skipped: %s", e)

    def reconfigure(self, user_config: dict) -> None:
        """``user_config: {watch_s: float, reload: any}``: change the poll period; a changed value reloads now."""
        self._watch_s = float(user_config.get("watch_s", self._watch_s))
        if "reload" in user_config:
            self.reload()

    def __del__(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ plumbing
    def _auth(self, ctx: Any) -> None:
        check_token(ctx.invocation_metadata() if ctx is not None else (), self.token_sha256)

    @staticmethod
    def _fail(ctx: Any, code: grpc.StatusCode, message: str, empty: Any) -> Any:
        ctx.set_code(code)
        ctx.set_details(message)
        return empty

    # ------------------------------------------------------------------ cl.v1.ContinualLearning
    async def Predict(self, request: Any, grpc_context: Any = None) -> Any:
        t0 = time.perf_counter()
        stage = "Router"  # the deployment called last, for the message when its replica is lost
        try:
            self._auth(grpc_context)
            sample, n = parse_predict(request, self.limits)
            cat = self.catalog
            route_ms, vision_states = 0.0, None
            if request.HasField("expert"):
                expert = cat.find(request.expert)
                decision = grpc_api.pb2.RouterDecision(kind="request")
            elif len(cat.experts) == 1:
                expert = cat.experts[0]
                decision = grpc_api.pb2.RouterDecision(kind="single")
            else:
                kind = self.cfg.router_kind
                if kind != "mllm":
                    saved = cat.feature_routers.get(kind)
                    if saved is None and kind != "prototype":
                        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                           f"the run saved no {kind} router; name an expert: "
                                           + ", ".join(e.task for e in cat.experts))
                    experts = saved[1] if saved else tuple(e.task for e in cat.experts)
                    args = (str(saved[0]) if saved else None, experts,
                            tuple(cat.find(t).description for t in experts))
                elif cat.pool is None or cat.router_dir is None:
                    raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                       "the run has no usable MLLM router yet; name an expert: "
                                       + ", ".join(e.task for e in cat.experts))
                else:
                    args = (str(cat.router_dir), cat.pool.experts, cat.pool.descriptions)
                t1 = time.perf_counter()
                route, vision_states = await self.router.route.remote(sample, *args)
                route_ms = (time.perf_counter() - t1) * 1000
                expert = cat.find(route.expert)
                decision = grpc_api.pb2.RouterDecision(kind=self.cfg.router_kind, raw_output=route.raw,
                                                       fallback_used=bool(route.fallback))
            t2, stage = time.perf_counter(), "Expert"
            answer = await self.expert.answer.remote(sample, str(expert.path), n, vision_states)
            answer_ms = (time.perf_counter() - t2) * 1000
            latency = grpc_api.pb2.Latency(route_ms=route_ms, answer_ms=answer_ms,
                                           total_ms=(time.perf_counter() - t0) * 1000)
            return grpc_api.pb2.PredictResponse(answer=answer, expert=expert.task, router=decision, latency=latency)
        except RequestError as e:
            return self._fail(grpc_context, e.code, e.message, grpc_api.pb2.PredictResponse())
        except AdapterError as e:
            return self._fail(grpc_context, grpc.StatusCode.FAILED_PRECONDITION, f"adapter problem: {e}",
                              grpc_api.pb2.PredictResponse())
        except Exception as e:  # noqa: BLE001 - logged here; the client gets one line, never a traceback
            if replica_lost(e):  # Serve starts a new replica; the request is idempotent: clients retry
                log.warning("Predict: the %s replica was lost (%s)", stage, type(e).__name__)
                return self._fail(grpc_context, grpc.StatusCode.UNAVAILABLE,
                                  f"the {stage} replica serving this request was lost ({type(e).__name__}); Serve "
                                  "is starting a new one: retry", grpc_api.pb2.PredictResponse())
            log.exception("Predict failed")
            return self._fail(grpc_context, grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}",
                              grpc_api.pb2.PredictResponse())

    async def ListExperts(self, request: Any, grpc_context: Any = None) -> Any:
        try:
            self._auth(grpc_context)
        except RequestError as e:
            return self._fail(grpc_context, e.code, e.message, grpc_api.pb2.ListExpertsResponse())
        return grpc_api.pb2.ListExpertsResponse(experts=[
            grpc_api.pb2.Expert(id=e.id, task=e.task, description=e.description, adapter_version=e.version)
            for e in self.catalog.experts])

    # ------------------------------------------------------------------ OpenAI-compatible HTTP
    async def __call__(self, request: Any) -> Any:
        """``POST /v1/chat/completions``, ``GET /v1/models`` under the route prefix, through Serve's HTTP proxy:
        the same Predict/ListExperts as gRPC (:mod:`cl_service.on_ray.serve_http`)."""
        from cl_service.on_ray.serve_http import respond

        return await respond(self, request)

    # ------------------------------------------------------------------ grpc.health.v1.Health
    async def Check(self, request: Any, grpc_context: Any = None) -> Any:
        from grpc_health.v1 import health_pb2

        if request.service not in ("", SERVICE_NAME):
            return self._fail(grpc_context, grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}",
                              health_pb2.HealthCheckResponse())
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def List(self, request: Any, grpc_context: Any = None) -> Any:
        from grpc_health.v1 import health_pb2

        ok = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        return health_pb2.HealthListResponse(statuses={"": ok, SERVICE_NAME: ok})

    # ------------------------------------------------------------------ for tests and tools
    async def info(self) -> dict:
        cat = self.catalog
        return {"experts": [e.task for e in cat.experts], "router_dir": str(cat.router_dir or ""),
                "fingerprint": cat.fingerprint, "reloads": self.watch.reloads}


def build(cfg: ServeCfg, token: str | None = None) -> Any:
    """The application graph for ``cfg`` (not yet running). ``token``: the shared secret (only its sha256
    reaches the replicas)."""
    d = to_dict(cfg)
    Catalog.load(cfg.results)  # fail here, with a clear message, rather than in a replica
    health = {"health_check_period_s": cfg.health_check_period_s}  # how soon a dead replica is replaced
    if not cfg.colocate:
        router = Router.options(num_replicas=cfg.router.replicas, ray_actor_options=_resources(cfg.router),
                                max_ongoing_requests=max(16, 4 * cfg.router.max_batch_size), **health).bind(d)
        expert = Expert.options(num_replicas=cfg.expert.replicas, ray_actor_options=_resources(cfg.expert),
                                max_ongoing_requests=_ongoing(cfg, cfg.expert.max_batch_size), **health).bind(d)
    else:  # one replica (one copy of the base) runs both stages, on two CUDA streams
        from cl_service.on_ray.serve_stages import Stages

        stages = Stages.options(num_replicas=cfg.expert.replicas, ray_actor_options=_resources(_both(cfg)),
                                max_ongoing_requests=_ongoing(cfg, cfg.router.max_batch_size + cfg.expert.max_batch_size),
                                **health).bind(d)
        router = expert = stages
    sha = token_sha256(token)
    return Ingress.options(ray_actor_options={"num_cpus": cfg.ingress_num_cpus}, max_ongoing_requests=256,
                           user_config={"watch_s": cfg.watch_s}, **health).bind(router, expert, d, sha)


def _ongoing(cfg: ServeCfg, batch: int) -> int:
    """A replica's Serve ``max_ongoing_requests``: room for the requests it computes and the ``max_queued``
    that may wait, so the bound a client meets is the replica's own (``RESOURCE_EXHAUSTED``)."""
    return max(16, 4 * batch, batch + cfg.max_queued + 1)


def _both(cfg: ServeCfg) -> StageCfg:
    """The resources of one replica holding both stages: the Router's and the Expert's together."""
    return StageCfg(num_cpus=cfg.router.num_cpus + cfg.expert.num_cpus, num_gpus=cfg.router.num_gpus + cfg.expert.num_gpus)


def _resources(stage: StageCfg) -> dict:
    return {"num_cpus": stage.num_cpus, **({"num_gpus": stage.num_gpus} if stage.num_gpus > 0 else {})}


def build_app(args: dict) -> Any:
    """Serve builder (``import_path: cl_service.on_ray.serve:build_app``).

    ``args``: ``config`` (a serve YAML, optional), ``overrides`` (list of ``key=value``), and/or any ServeCfg
    keys directly (``results: runs/dcl-mini``). The token is read from ``auth_token_env`` in this process.
    """
    args = dict(args or {})
    path = args.pop("config", None)
    overrides = list(args.pop("overrides", []) or [])
    overrides += _flatten(args)
    cfg = load_serve_cfg(path, overrides)
    if not Path(cfg.results).is_absolute():
        cfg = from_dict(ServeCfg, {**to_dict(cfg), "results": str(Path(cfg.results).resolve())})
    return build(cfg, os.environ.get(cfg.auth_token_env) or None)


def _flatten(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}")
    return out
