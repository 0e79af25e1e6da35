"""Ray Serve application: an ingress, a Router deployment and Expert replicas over one frozen base.

    Ingress (cl.v1 + grpc.health.v1 through Serve's gRPC proxy; OpenAI-compatible HTTP through its HTTP proxy)
      -> Router.route    batched: requests of many clients routed in one pass (any router kind)
      -> Expert.answer   batched: rows for different experts answered in one call (engine LRU of adapters),
                         or joining the running decode (``continuous``); ``answer_stream`` streams it

The deployments are thin: what a request means (token, validation, routing, limits, errors, hot add) is
:class:`~cl_service.serve.core.ServeCore`'s and the model work is :mod:`cl_service.serve.stages`', the very code
``clsvc serve --local`` runs in one process. With ``colocate`` one ``Stages`` replica
(:mod:`cl_service.on_ray.serve_stages`) holds both stages on one copy of the base.

Experts are addressed by id through the adapter registry (:class:`~cl_service.serve.catalog.Catalog`); the
ingress turns ids into adapter folders, Router/Expert replicas load them into their engine's adapter cache
(so any replica serves any expert, and one batch mixes experts; Serve's model multiplexing would pin a
batch to one adapter). Hot add: the ingress polls the results folder (``watch_s``) and swaps in a new
catalog when the run publishes an expert or a retrained router; requests in flight keep their snapshot.

Build with :func:`build_app` (``serve deploy`` / ``serve run cl_service.on_ray.serve:build_app``) or start
locally with :func:`cl_service.on_ray.serve_start.start` (that module builds the app with this one's
:func:`build`; this one does not import it). With that module, the only one that imports Ray Serve.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import grpc
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError

from cl_service._cfgload import from_dict, to_dict
from cl_service.serve.auth import token_sha256
from cl_service.serve.catalog import Catalog, RequestError
from cl_service.serve.config import ServeCfg, StageCfg, load_serve_cfg
from cl_service.serve.core import ServeCore
from cl_service.serve.security import require_safe_exposure
from cl_service.serve.stages import Answer, AnswerStage, RouteStage, load_engine
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


@serve.deployment(name="Router")
class Router:
    """Stage one (:class:`~cl_service.serve.stages.RouteStage`): kind ``mllm`` (base + the run's router LoRA,
    lettered pool prompt), or ``prototype`` / ``ridge`` / ``knn`` (the feature router the run saved)."""

    def __init__(self, cfg: dict) -> None:
        c = from_dict(ServeCfg, cfg)
        run = Catalog.load(c.results, verify=False, method=c.method, stage=c.stage)
        self.stage = RouteStage(c, load_engine(run, c.router, c.max_loaded_adapters, c.max_host_adapters), run)

    async def route(self, sample, router_dir: str | None, experts: tuple[str, ...], descriptions: tuple[str, ...]):
        return await self.stage.route(sample, router_dir, experts, descriptions)

    def batch_log(self) -> list[tuple[float, float, int]]:
        """``(start, end, size)`` of the last 1000 batches (``time.time()``)."""
        return self.stage.batch_log()


@serve.deployment(name="Expert")
class Expert:
    """Stage two (:class:`~cl_service.serve.stages.AnswerStage`): base + the chosen expert, rows for any mix of
    experts in one batch, or with ``continuous`` joining the running decode; ``answer_stream`` yields the text
    as it is decoded."""

    def __init__(self, cfg: dict) -> None:
        c = from_dict(ServeCfg, cfg)
        run = Catalog.load(c.results, verify=False, method=c.method, stage=c.stage)
        self.stage = AnswerStage(c, load_engine(run, c.expert, c.max_loaded_adapters, c.max_host_adapters))

    async def answer(self, sample, adapter: str, max_new_tokens: int | None, vision_states: Any = None) -> Answer:
        return await self.stage.answer(sample, adapter, max_new_tokens, vision_states)

    async def answer_stream(self, sample, adapter: str, max_new_tokens: int | None, vision_states: Any = None):
        async for item in self.stage.answer_stream(sample, adapter, max_new_tokens, vision_states):
            yield item

    def batch_sizes(self) -> list[int]:
        return self.stage.batch_sizes()

    def batch_log(self) -> list[tuple[float, float, int]]:
        """``(start, end, size)`` of the last 1000 batches (``time.time()``); with ``continuous``, of the last
        prefills of requests joining the decode."""
        return self.stage.batch_log()

    def step_log(self) -> list[tuple[float, float, int]]:
        """With ``continuous``: ``(start, end, rows decoding)`` of the last decode steps (``time.time()``)."""
        return self.stage.step_log()


class _Handles:
    """The Router/Expert (or Stages) deployments as the request core calls its stages."""

    def __init__(self, router: Any, expert: Any) -> None:
        self.router, self.expert = router, expert

    def route(self, *args: Any) -> Any:
        return self.router.route.remote(*args)

    def answer(self, *args: Any) -> Any:
        return self.expert.answer.remote(*args)

    def answer_stream(self, *args: Any) -> Any:
        return self.expert.options(stream=True).answer_stream.remote(*args)


def _metadata(ctx: Any) -> tuple:
    return tuple(ctx.invocation_metadata()) if ctx is not None else ()


@serve.deployment(name="Ingress")
class Ingress:
    """The ingress: cl.v1 (gRPC), OpenAI-compatible HTTP and health. Every request is the request core's
    (:class:`~cl_service.serve.core.ServeCore`: token, validation off the event loop, routing by any router
    kind, hot add, errors), over the Router/Expert (or Stages) deployments."""

    def __init__(self, router: Any, expert: Any, cfg: dict, token_sha256: str | None) -> None:
        self.cfg = from_dict(ServeCfg, cfg)
        self.core = ServeCore(self.cfg, _Handles(router, expert), token_sha256, lost=replica_lost)
        self.limits, self.token_sha256 = self.cfg.limits, token_sha256

    # ------------------------------------------------------------------ hot add
    @property
    def catalog(self) -> Catalog:
        return self.core.catalog

    def reload(self) -> bool:
        """Swap in a new catalog if the run published anything that verifies (what does not is verified again
        on a later poll: :class:`~cl_service.serve.hotadd.CatalogWatch`); True when it changed."""
        return self.core.reload()

    def reconfigure(self, user_config: dict) -> None:
        """``user_config: {watch_s: float, reload: any}``: change the poll period; a changed value reloads now."""
        self.core.set_watch(float(user_config.get("watch_s", self.core._watch_s)))
        if "reload" in user_config:
            self.reload()

    def __del__(self) -> None:
        if getattr(self, "core", None) is not None:
            self.core.close()

    @staticmethod
    def _fail(ctx: Any, code: grpc.StatusCode, message: str, empty: Any) -> Any:
        ctx.set_code(code)
        ctx.set_details(message)
        return empty

    # ------------------------------------------------------------------ cl.v1.ContinualLearning
    async def Predict(self, request: Any, grpc_context: Any = None) -> Any:
        try:
            return await self.core.predict(request, _metadata(grpc_context))
        except RequestError as e:
            return self._fail(grpc_context, e.code, e.message, grpc_api.pb2.PredictResponse())

    async def ListExperts(self, request: Any, grpc_context: Any = None) -> Any:
        try:
            return self.core.list_experts(_metadata(grpc_context))
        except RequestError as e:
            return self._fail(grpc_context, e.code, e.message, grpc_api.pb2.ListExpertsResponse())

    # ------------------------------------------------------------------ OpenAI-compatible HTTP
    async def __call__(self, request: Any) -> Any:
        """``POST /v1/chat/completions``, ``GET /v1/models`` under the route prefix, through Serve's HTTP proxy:
        the same request core as gRPC (:mod:`cl_service.on_ray.serve_http`)."""
        from cl_service.on_ray.serve_http import respond

        return await respond(self.core, request)

    # ------------------------------------------------------------------ grpc.health.v1.Health
    async def Check(self, request: Any, grpc_context: Any = None) -> Any:
        from grpc_health.v1 import health_pb2

        if request.service not in ("", SERVICE_NAME):
            return self._fail(grpc_context, grpc.StatusCode.NOT_FOUND, f"unknown service {request.service[:80]!r}",
                              health_pb2.HealthCheckResponse())
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def List(self, request: Any, grpc_context: Any = None) -> Any:
        from grpc_health.v1 import health_pb2

        ok = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        return health_pb2.HealthListResponse(statuses={"": ok, SERVICE_NAME: ok})

    # ------------------------------------------------------------------ for tests and tools
    async def info(self) -> dict:
        """Catalog, hot-add count, requests past the token check and images decoded in this replica."""
        return self.core.info()


def build(cfg: ServeCfg, token: str | None = None) -> Any:
    """The application graph for ``cfg`` (not yet running). ``token``: the shared secret (only its sha256
    reaches the replicas). Without one, refused (:class:`~cl_service.serve.security.InsecureExposure`) unless
    ``cfg.insecure``: Serve's gRPC proxy listens on all interfaces."""
    require_safe_exposure("all interfaces (Serve's gRPC proxy)", token, cfg.insecure, cfg.auth_token_env)
    d = to_dict(cfg)
    # fail here, with a clear message, rather than in a replica
    Catalog.load(cfg.results, method=cfg.method, stage=cfg.stage)
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
    """Serve builder (``import_path: cl_service.on_ray.serve:build_app``, e.g. ``serve deploy
    workloads/configs/serve_deploy.yaml``).

    ``args``: ``config`` (a serve YAML, optional), ``overrides`` (list of ``key=value``), and/or any ServeCfg
    keys directly (``results: runs/dcl-mini``). The token is read from ``auth_token_env`` in this process (the
    cluster's environment); without it the app is refused unless the config says ``insecure: true``.
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
