"""Ray Serve application: a gRPC ingress, a Router deployment and Expert replicas over one frozen base.

    Ingress (cl.v1 + grpc.health.v1 through Serve's gRPC proxy)
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
locally with :func:`start`. The only module that imports Ray Serve.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import logging
import os
import signal
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import grpc
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions

from cl_service._cfgload import apply_overrides, from_dict, to_dict
from cl_service.adapters.registry import AdapterError
from cl_service.serve.batcher import Batcher
from cl_service.serve.catalog import Catalog, Limits, RequestError, parse_predict
from cl_service.serve.config import ServeCfg, StageCfg, load_serve_cfg
from cl_service.serve.states import pack_states, unpack_states
from cl_service.serve.twostage import answer_grouped, per_sample_states, route_grouped
from cl_service.serve import grpc_api  # module reference: cloudpickle re-imports it (and the stubs) in replicas

log = logging.getLogger("cl_service.serve")
SERVICE_NAME = grpc_api.pb2.DESCRIPTOR.services_by_name["ContinualLearning"].full_name


def _engine(base: str, run: Catalog, stage: StageCfg, max_loaded: int = 16):
    # Batches of varying size and length fragment a fixed-segment CUDA cache (two 7B replicas sharing an
    # H100 ran out with 15 GB reserved but unallocated); read when CUDA is first used in this process.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch

    from cl_service.engine.engine import Engine

    torch.set_num_threads(max(1, stage.torch_threads))
    # Ray sets CUDA_VISIBLE_DEVICES to the replica's (possibly shared) GPU.
    device = "cuda" if stage.num_gpus > 0 and torch.cuda.is_available() else None
    engine = Engine(base, max_loaded=max_loaded, device=device, **run.base_settings())
    engine.batch_size = max(engine.batch_size, stage.max_batch_size)  # a Serve batch is one engine pass
    engine.max_new_tokens = int(run.run_setting("eval", "max_new_tokens", engine.max_new_tokens))
    engine.router_max_new_tokens = int(run.run_setting("router", "max_new_tokens", engine.router_max_new_tokens))
    return engine


def _batcher(fn: Any, stage: StageCfg) -> Batcher:
    """Batches gathered when the model is free (not ``@serve.batch``: see :mod:`cl_service.serve.batcher`);
    the model runs in a worker thread so the replica keeps accepting requests meanwhile."""
    async def run(items: list) -> list:
        return await asyncio.to_thread(fn, items)

    return Batcher(run, stage.max_batch_size, stage.batch_wait_ms / 1000.0)


@serve.deployment(name="Router")
class Router:
    """Stage one: choose an expert for each request. Kind ``mllm`` (base + the run's router LoRA, lettered
    pool prompt), or ``prototype`` / ``ridge`` / ``knn`` (the feature router the run saved under ``routers/<kind>/``)."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = from_dict(ServeCfg, cfg)
        run = Catalog.load(self.cfg.results, verify=False)
        self.run = run
        self.engine = _engine(run.resolved["base"], run, self.cfg.router, self.cfg.max_loaded_adapters)
        self._prototypes: dict[tuple[str, ...], Any] = {}
        self.batcher = _batcher(self._route, self.cfg.router)

    async def route(self, sample, router_dir: str | None, experts: tuple[str, ...], descriptions: tuple[str, ...]):
        return await self.batcher.submit((sample, router_dir, experts, descriptions))

    def batch_log(self) -> list[tuple[float, float, int]]:
        """``(start, end, size)`` of the last 1000 batches (``time.time()``)."""
        return list(self.batcher.log)

    def _route(self, items: list[tuple]) -> list[tuple]:
        """``[(sample, router_dir, experts, descriptions)] -> [(Route, vision_states of the sample or None)]``."""
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
            router = self._feature_router(router_dir, experts)
            if vs is not None and router.kind == "prototype":  # pooled features over the shared states
                router = type(router)(router.experts, router.means, _SharedVision(self.engine, vs))
            return router.route(group)

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


class _SharedVision:
    """The engine as a feature router sees it, with the batch's CLIP states already computed."""

    def __init__(self, engine: Any, vision_states: Any) -> None:
        self.engine, self.vision_states = engine, vision_states

    def features(self, samples):
        return self.engine.features(samples, self.vision_states)


@serve.deployment(name="Expert")
class Expert:
    """Stage two: answer with base + the chosen expert. One batch holds rows for any mix of experts."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = from_dict(ServeCfg, cfg)
        run = Catalog.load(self.cfg.results, verify=False)
        self.engine = _engine(run.resolved["base"], run, self.cfg.expert, self.cfg.max_loaded_adapters)
        self.batcher = _batcher(self._answer, self.cfg.expert)

    async def answer(self, sample, adapter: str, max_new_tokens: int | None, vision_states: Any = None) -> str:
        return await self.batcher.submit((sample, adapter, max_new_tokens, vision_states))

    def _answer(self, items: list[tuple]) -> list[str]:
        """Rows for different experts share each forward pass (``Engine.answer_mixed``); one call per
        distinct ``max_new_tokens``."""
        samples = [it[0] for it in items]
        vs = unpack_states([it[3] for it in items], self.engine.mllm.device)  # one transfer for the batch
        return answer_grouped(self.engine, samples, [it[1] for it in items], [it[2] for it in items],
                              None if vs is None else per_sample_states(vs, samples))

    def batch_sizes(self) -> list[int]:
        return [n for _, _, n in self.batcher.log]

    def batch_log(self) -> list[tuple[float, float, int]]:
        """``(start, end, size)`` of the last 1000 batches (``time.time()``)."""
        return list(self.batcher.log)


@serve.deployment(name="Ingress")
class Ingress:
    """The gRPC ingress: validation, shared-token check, the catalog (hot add), health; calls Router/Expert."""

    def __init__(self, router: Any, expert: Any, cfg: dict, token_sha256: str | None) -> None:
        self.cfg = from_dict(ServeCfg, cfg)
        self.router = router
        self.expert = expert
        self.limits = Limits(**asdict(self.cfg.limits))
        self.token_sha256 = token_sha256
        self.catalog = Catalog.load(self.cfg.results)
        self._last_seen = Catalog.load(self.cfg.results, verify=False).fingerprint
        self.reloads = 0
        self._watch_s = self.cfg.watch_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._watcher = threading.Thread(target=self._watch, name="clsvc-catalog-watch", daemon=True)
        self._watcher.start()

    # ------------------------------------------------------------------ hot add
    def reload(self) -> bool:
        """Swap in a new catalog if the run published anything; True when it changed."""
        with self._lock:
            cheap = Catalog.load(self.cfg.results, verify=False).fingerprint  # adapter.json files only
            if cheap == self._last_seen:
                return False
            self._last_seen = cheap
            new = Catalog.load(self.cfg.results)  # checksums verified before anyone is routed to it
            if new.fingerprint == self.catalog.fingerprint:
                return False
            old = self.catalog
            self.catalog = new  # one reference swap: requests in flight keep the old snapshot
            self.reloads += 1
            log.info("catalog reloaded: experts %s -> %s, router %s -> %s",
                     [e.task for e in old.experts], [e.task for e in new.experts], old.router_dir, new.router_dir)
            return True

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
        if self.token_sha256 is None:
            return
        md = {k.lower(): v for k, v in (ctx.invocation_metadata() if ctx is not None else [])}
        token = md.get("x-clsvc-token")
        if token is None and md.get("authorization", "").lower().startswith("bearer "):
            token = md["authorization"][7:].strip()
        if token is None or not hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), self.token_sha256):
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED,
                               "missing or wrong token: send metadata 'authorization: Bearer <token>' "
                               "or 'x-clsvc-token: <token>'")

    @staticmethod
    def _fail(ctx: Any, code: grpc.StatusCode, message: str, empty: Any) -> Any:
        ctx.set_code(code)
        ctx.set_details(message)
        return empty

    # ------------------------------------------------------------------ cl.v1.ContinualLearning
    async def Predict(self, request: Any, grpc_context: Any = None) -> Any:
        t0 = time.perf_counter()
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
            t2 = time.perf_counter()
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
                "fingerprint": cat.fingerprint, "reloads": self.reloads}


def build(cfg: ServeCfg, token: str | None = None) -> Any:
    """The application graph for ``cfg`` (not yet running). ``token``: the shared secret (only its sha256
    reaches the replicas)."""
    d = to_dict(cfg)
    Catalog.load(cfg.results)  # fail here, with a clear message, rather than in a replica
    router = Router.options(num_replicas=cfg.router.replicas, ray_actor_options=_resources(cfg.router),
                            max_ongoing_requests=max(16, 4 * cfg.router.max_batch_size)).bind(d)
    expert = Expert.options(num_replicas=cfg.expert.replicas, ray_actor_options=_resources(cfg.expert),
                            max_ongoing_requests=max(16, 4 * cfg.expert.max_batch_size)).bind(d)
    sha = hashlib.sha256(token.encode()).hexdigest() if token else None
    return Ingress.options(ray_actor_options={"num_cpus": cfg.ingress_num_cpus}, max_ongoing_requests=256,
                           user_config={"watch_s": cfg.watch_s}).bind(router, expert, d, sha)


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


def grpc_options(cfg: ServeCfg) -> gRPCOptions:
    """Serve's gRPC proxy options: cl.v1 + health servicers, reflection on. The proxy binds ``[::]:port``."""
    return gRPCOptions(port=cfg.grpc_port, grpc_servicer_functions=list(grpc_api.SERVICER_FUNCTIONS),
                       request_timeout_s=cfg.request_timeout_s, enable_reflection=True)


def start(cfg: ServeCfg, token: str | None = None, timeout_s: float = 300.0) -> None:
    """Start Serve (gRPC proxy on ``cfg.grpc_port``, HTTP proxy on 127.0.0.1) on the connected Ray and deploy
    the app; returns once it is RUNNING, raises ``TimeoutError``/``RuntimeError`` otherwise."""
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=cfg.http_port), grpc_options=grpc_options(cfg))
    serve.run_many([serve.RunTarget(target=build(cfg, token), name=cfg.app_name, route_prefix=cfg.route_prefix)],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    wait_running(cfg.app_name, timeout_s)


def wait_running(app_name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        status = app.status if app else None
        if status == "RUNNING":
            return
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"Serve app {app_name!r} is {status}: {app.message}")
        time.sleep(0.5)
    raise TimeoutError(f"Serve app {app_name!r} not RUNNING within {timeout_s:.0f} s (last status {status}); "
                       "with few CPUs lower router.num_cpus / expert.num_cpus")


def override(cfg: ServeCfg, **changes: Any) -> ServeCfg:
    """``cfg`` with top-level or dotted (``router.replicas``) keys changed, strictly checked."""
    return from_dict(ServeCfg, apply_overrides(to_dict(cfg), [f"{k.replace('__', '.')}={v}"
                                                              for k, v in changes.items()]))


def parse_args(argv: Sequence[str] | None = None) -> tuple[ServeCfg, argparse.Namespace]:
    p = argparse.ArgumentParser(description="Serve a continual-learning run (Router + Expert replicas on Ray Serve).")
    p.add_argument("--config", default=None, help="ServeCfg YAML (workloads/configs/serve_*.yaml)")
    p.add_argument("--results", default=None, help="the run's results folder (default: the config's)")
    p.add_argument("--port", type=int, default=None, help="gRPC port (default 9000; the proxy binds all interfaces)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the app to be RUNNING")
    p.add_argument("--detach", action="store_true", help="return once RUNNING (the app stays on the Ray cluster)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)
    extra = [f"results={Path(a.results).resolve()}"] if a.results else []
    extra += [f"grpc_port={a.port}"] if a.port is not None else []
    cfg = load_serve_cfg(a.config, list(a.overrides) + extra)
    if not Path(cfg.results).is_absolute():
        cfg = override(cfg, results=str(Path(cfg.results).resolve()))
    return cfg, a


def serve_main(argv: Sequence[str] | None = None, log=print) -> int:
    """``clsvc serve`` / ``workloads/serve_experts.py``: connect to ``RAY_ADDRESS`` or start a local Ray on
    loopback, deploy, and serve until Ctrl-C / SIGTERM (then shut Serve down, bounded)."""
    import ray

    cfg, a = parse_args(argv)
    Catalog.load(cfg.results)  # a wrong folder fails here, before Ray starts
    token = os.environ.get(cfg.auth_token_env) or None
    started = False
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], _node_ip_address="127.0.0.1", log_to_driver=False)
        else:
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
                     _temp_dir=tempfile.mkdtemp(prefix="clsvc-ray-", dir="/tmp"))
            started = True
    if a.detach and started:
        ray.shutdown()
        raise ValueError("--detach needs a running cluster (RAY_ADDRESS); a local Ray ends with this process")
    stop = threading.Event()
    main_thread = threading.current_thread() is threading.main_thread()
    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Ctrl-C should stop us anyway.
    old = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)} \
        if main_thread else {}
    try:
        t0 = time.perf_counter()
        start(cfg, token, timeout_s=a.ready_timeout)
        cat = Catalog.load(cfg.results, verify=False)
        log(f"serving {cfg.results}: experts {', '.join(e.task for e in cat.experts)}, router {cfg.router_kind} "
            f"(ready in {time.perf_counter() - t0:.1f} s)")
        log(f"gRPC cl.v1.ContinualLearning on port {cfg.grpc_port} (Serve's gRPC proxy listens on all interfaces; "
            f"{'a shared token is required' if token else f'no token: set {cfg.auth_token_env} to require one'})")
        log(f"  clsvc predict --address 127.0.0.1:{cfg.grpc_port} --image IMG.png --question '...'")
        if a.detach:
            return 0
        log("Ctrl-C stops it")
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if not a.detach:
            log("stopping Serve ...")
            _bounded(serve.shutdown, 60)
            if started:
                _bounded(ray.shutdown, 60)
    return 0


def _bounded(fn: Any, timeout: float) -> None:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(timeout)
