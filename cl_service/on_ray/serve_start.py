"""Starting the Serve application of :mod:`cl_service.on_ray.serve`: Serve's gRPC and HTTP proxies, the deploy,
the wait until it is RUNNING, and ``clsvc serve`` / ``workloads/serve_experts.py`` (Ray connected or started,
served until Ctrl-C / SIGTERM). The application itself (deployments, :func:`~cl_service.on_ray.serve.build`,
:func:`~cl_service.on_ray.serve.build_app`) stays in :mod:`cl_service.on_ray.serve`, which re-exports these
names.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions

from cl_service.on_ray.local import driver_node_ip, init_local
from cl_service.on_ray.serve import build
from cl_service.serve import grpc_api
from cl_service.serve.catalog import Catalog
from cl_service.serve.auth import token_sha256
from cl_service.serve.config import ServeCfg, changed, load_serve_cfg
from cl_service.serve.security import require_safe_exposure, serve_proxy_env

__all__ = ["grpc_options", "override", "parse_args", "serve_main", "start", "wait_running"]


def grpc_options(cfg: ServeCfg) -> gRPCOptions:
    """Serve's gRPC proxy options: cl.v1 + health servicers, reflection on. The proxy binds ``[::]:port``."""
    return gRPCOptions(port=cfg.grpc_port, grpc_servicer_functions=list(grpc_api.SERVICER_FUNCTIONS),
                       request_timeout_s=cfg.request_timeout_s, enable_reflection=True)


def start(cfg: ServeCfg, token: str | None = None, timeout_s: float = 300.0) -> None:
    """Start Serve (gRPC proxy on ``cfg.grpc_port``, HTTP proxy on ``cfg.http_host:http_port``) on the connected
    Ray and deploy the app; returns once it is RUNNING, raises ``TimeoutError``/``RuntimeError`` otherwise."""
    http = HTTPOptions(host=cfg.http_host, port=cfg.http_port, request_timeout_s=cfg.request_timeout_s)
    app = build(cfg, token)  # refused here, before Serve starts, when it would be open to the network
    # the proxies inherit the controller's env: their message limit follows cfg.limits, and the gRPC proxy
    # checks the token before it parses a request (cl_service.serve.grpc_api)
    serve.start(http_options=http, grpc_options=grpc_options(cfg),
                controller_options={"runtime_env": {"env_vars": serve_proxy_env(cfg.limits, token_sha256(token))}})
    serve.run_many([serve.RunTarget(target=app, name=cfg.app_name, route_prefix=cfg.route_prefix)],
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
    """``cfg`` with top-level or dotted (``router__replicas`` for ``router.replicas``) keys changed, strictly
    checked."""
    return changed(cfg, **changes)


def parse_args(argv: Sequence[str] | None = None) -> tuple[ServeCfg, argparse.Namespace]:
    p = argparse.ArgumentParser(description="Serve a continual-learning run (Router + Expert replicas on Ray Serve).")
    p.add_argument("--config", default=None, help="ServeCfg YAML (workloads/configs/serve_*.yaml)")
    p.add_argument("--results", default=None, help="the run's results folder (default: the config's)")
    p.add_argument("--port", type=int, default=None, help="gRPC port (default 9000; the proxy binds all interfaces)")
    p.add_argument("--http-port", type=int, default=None, help="OpenAI-compatible HTTP port (default 8000)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the app to be RUNNING")
    p.add_argument("--detach", action="store_true", help="return once RUNNING (the app stays on the Ray cluster)")
    p.add_argument("--insecure", action="store_true",
                   help="serve without a token (the proxy binds all interfaces); the config key insecure=true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)
    extra = [f"results={Path(a.results).resolve()}"] if a.results else []
    extra += [f"grpc_port={a.port}"] if a.port is not None else []
    extra += [f"http_port={a.http_port}"] if a.http_port is not None else []
    extra += ["insecure=true"] if a.insecure else []
    cfg = load_serve_cfg(a.config, list(a.overrides) + extra)
    if not Path(cfg.results).is_absolute():
        cfg = override(cfg, results=str(Path(cfg.results).resolve()))
    return cfg, a


def serve_main(argv: Sequence[str] | None = None, log=print) -> int:
    """``clsvc serve`` / ``workloads/serve_experts.py``: connect to ``RAY_ADDRESS`` or start a local Ray on
    loopback, deploy, and serve until Ctrl-C / SIGTERM (then shut Serve down, bounded)."""
    import ray

    cfg, a = parse_args(argv)
    Catalog.load(cfg.results, method=cfg.method, stage=cfg.stage)  # a wrong folder fails here, before Ray starts
    token = os.environ.get(cfg.auth_token_env) or None
    require_safe_exposure("all interfaces (Serve's gRPC proxy)", token, cfg.insecure, cfg.auth_token_env)
    started = False
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            address = os.environ["RAY_ADDRESS"]
            ray.init(address=address, _node_ip_address=driver_node_ip(address), log_to_driver=False)
        else:
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            init_local(log, log_to_driver=False)  # with its dashboard on 127.0.0.1
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
        cat = Catalog.load(cfg.results, verify=False, method=cfg.method, stage=cfg.stage)
        what = (f"{cfg.method}'s stage adapter {cat.experts[0].id} for every request" if cfg.method else
                f"experts {', '.join(e.task for e in cat.experts)}, router {cfg.router_kind}")
        log(f"serving {cfg.results}: {what} "
            f"(ready in {time.perf_counter() - t0:.1f} s)")
        log(f"gRPC cl.v1.ContinualLearning on port {cfg.grpc_port} (Serve's gRPC proxy listens on all interfaces; "
            f"{'a shared token is required' if token else f'no token: set {cfg.auth_token_env} to require one'})")
        log(f"  clsvc predict --address 127.0.0.1:{cfg.grpc_port} --image IMG.png --question '...'")
        log(f"OpenAI-compatible HTTP on http://{cfg.http_host}:{cfg.http_port}{cfg.route_prefix.rstrip('/')}/v1 "
            "(POST /chat/completions, GET /models; the same token as 'Authorization: Bearer')")
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
