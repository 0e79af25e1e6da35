"""Typed config of the served application (``workloads/configs/serve_*.yaml``); loaded strictly like RunCfg."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from cl_service import _cfgload


@dataclass(frozen=True)
class StageCfg:
    """One model-holding deployment (Router or Expert): replicas, resources and request batching."""

    replicas: int = 1
    """Replica count; each holds its own copy of the base model."""
    num_cpus: float = 0.5
    """CPUs reserved per replica (fractional, so the app fits next to other work on small machines)."""
    num_gpus: float = 0.0
    """GPUs reserved per replica; > 0 puts the replica's model on its GPU (fractional: Router and Expert
    replicas can share one GPU, e.g. 0.5 each). 0 = CPU."""
    max_batch_size: int = 8
    """Requests (for any mix of experts) gathered into one call (also the engine's batch
    size; on a GPU, 64 or more keeps it busy)."""
    batch_wait_ms: float = 5.0
    """How long a request that finds the model free waits for more requests before its batch runs (requests
    that arrive while the model is busy join the next batch without waiting)."""
    torch_threads: int = 1
    """``torch.set_num_threads`` inside each replica."""

    def __post_init__(self) -> None:
        _cfgload.check_ranges(self, replicas=(1, None), num_cpus=(0, None), num_gpus=(0, None), max_batch_size=(1, None),
                               batch_wait_ms=(0, None), torch_threads=(1, None))


@dataclass(frozen=True)
class LimitsCfg:
    """Request validation limits (a request over them gets ``INVALID_ARGUMENT``).

    They also size what a server reads before it knows whether a request is valid: the gRPC message limit
    (plain server and Serve's gRPC proxy) is ``max_images`` x (``max_image_bytes`` + 16) + 4 x
    ``max_question_chars`` + 64 KiB (about 16.1 MiB with the defaults), and the HTTP body limit the same in
    base64. Raise ``max_images`` / ``max_image_bytes`` to take more or larger images: both limits follow."""

    max_image_bytes: int = 4 * 1024 * 1024
    """Largest accepted encoded image (a 12-megapixel JPEG is about 3-5 MB; the model sees it at its own
    resolution, e.g. 336 x 336 for LLaVA-1.5)."""
    max_images: int = 4
    """Most images in one request (images x image tokens + question + answer must also fit the model's
    ``max_length``, else ``INVALID_ARGUMENT``: LLaVA-1.5's 576 tokens per image fill 2048 positions with 3)."""
    max_new_tokens: int = 256
    """Largest accepted ``max_new_tokens``."""
    max_question_chars: int = 4096
    """Longest accepted question."""

    def __post_init__(self) -> None:
        _cfgload.check_ranges(self, max_image_bytes=(1, None), max_images=(1, None), max_new_tokens=(1, None),
                               max_question_chars=(1, None))


@dataclass(frozen=True)
class ServeCfg:
    """A finished (or still running) continual-learning run served as Router + Expert deployments."""

    results: str = "runs/dcl-mini"
    """The run's results folder (config.resolved.json, adapters/)."""
    app_name: str = "clsvc"
    """Serve application name (gRPC metadata ``application`` when several apps run)."""
    route_prefix: str = "/clsvc"
    """Serve needs a route prefix for gRPC apps too."""
    grpc_port: int = 9000
    """Serve's gRPC proxy port. The proxy binds all interfaces (Ray has no host option): set ``auth_token_env``
    or firewall the port on shared hosts."""
    http_port: int = 8000
    """Serve's HTTP proxy port: OpenAI-compatible ``<route_prefix>/v1/chat/completions`` and ``/v1/models``
    (same token, limits and errors as gRPC)."""
    http_host: str = "127.0.0.1"
    """Interface Serve's HTTP proxy binds (loopback by default; ``0.0.0.0`` exposes it: set ``auth_token_env``)."""
    router_kind: Literal["mllm", "prototype", "ridge", "knn"] = "mllm"
    """``mllm``: the run's latest MLLM router (base + router LoRA); ``prototype`` / ``ridge`` / ``knn``: the feature router
    the run saved under ``routers/<kind>/`` (a prototype router is fitted on the run's training data when the
    run saved none, with ``prototype_samples_per_task`` samples per task)."""
    method: str | None = None
    """Serve one method's adapter of the latest finished stage as the single expert that answers every request,
    instead of the run's per-task experts behind its router: for methods that answer every task with one
    adapter per stage, the model merged so far: ``sefe``, ``keeplora`` and their replay variants. The response's
    ``expert`` is the method's name; new stages are picked up like new experts."""
    stage: int | None = None
    """With ``method``: serve that stage's adapter (0 = after the stream's first task) instead of the latest one;
    refused while that stage is not complete. Only with ``method``."""
    prototype_samples_per_task: int | None = None
    """Training samples per task for the prototype router's means; None = the run's ``router.samples_per_task``
    (the same samples the offline evaluation used, so live routes equal offline routes)."""
    router: StageCfg = field(default_factory=StageCfg)
    expert: StageCfg = field(default_factory=StageCfg)
    ingress_num_cpus: float = 0.1
    """CPUs reserved by the gRPC ingress (validation, catalog, health)."""
    colocate: bool = False
    """Run both stages in one replica (``expert.replicas`` of them, each with the Router's and the Expert's
    resources together) on one copy of the base, on two CUDA streams, instead of a Router and an Expert
    deployment. On one GPU this avoids two processes time-slicing it (and a second copy of the base); separate
    deployments scale the stages apart on several GPUs."""
    continuous: bool = False
    """Stage two with continuous batching (:mod:`cl_service.engine.continuous`): a request joins the Expert's
    running decode between two decode steps (up to ``expert.max_batch_size`` rows decode at once; a row leaves
    as soon as its answer is done) instead of waiting for the batch in flight to finish. ``expert.batch_wait_ms``
    is then how long a request that finds nothing decoding waits for company."""
    max_queued: int = 256
    """Requests that may wait for stage two in one Expert (or Stages) replica, to join the decode or the next
    batch; one more gets ``RESOURCE_EXHAUSTED`` at once (clients retry later) instead of an unbounded wait."""
    share_vision_states: bool = True
    """The Router computes base CLIP states once per request and the Expert reuses them (experts without
    vision LoRA skip the CLIP pass; experts with vision LoRA recompute their own)."""
    max_loaded_adapters: int = 16
    """Adapters a replica keeps on its device (LRU); a batch naming more experts holds them all while it runs."""
    max_host_adapters: int = 32
    """Adapters that left a replica's device kept in host memory (pinned on a GPU machine, LRU), so an expert
    needed again is paged back in without reading and verifying its files; 0 = dropped."""
    watch_s: float = 2.0
    """Poll the results folder this often for newly published experts/routers (hot add); 0 = never."""
    auth_token_env: str = "CLSVC_TOKEN"
    """Environment variable holding a shared token; when set where the app is built, every Predict/ListExperts
    call needs metadata ``authorization: Bearer <token>`` or ``x-clsvc-token: <token>`` (HTTP: the
    ``Authorization: Bearer`` header)."""
    insecure: bool = False
    """Serve without a token although the API is reachable from the network. Serve's gRPC proxy always binds all
    interfaces, so a Ray Serve app (``clsvc serve``, ``serve deploy``, :func:`~cl_service.on_ray.serve.build_app`)
    built without ``$auth_token_env`` is refused unless this is true; ``clsvc serve --local`` needs it (or a
    token) to listen on anything but loopback. ``--insecure`` on the command line sets it."""
    limits: LimitsCfg = field(default_factory=LimitsCfg)
    request_timeout_s: float = 120.0
    """gRPC proxy end-to-end timeout per request."""
    health_check_period_s: float = 2.0
    """How often Serve's controller checks each replica (every deployment). A replica that died is replaced only
    once a check notices, so this bounds that part of the recovery (with Serve's default, 10 s, a killed replica
    of the tiny run on a 2-core CPU answered again after 12 s; with 2 s, after 7 s: ``bench/serve_faults.py``).
    Meanwhile new requests wait for the new replica; those in flight on the lost one get ``UNAVAILABLE``, which
    the client retries."""

    def __post_init__(self) -> None:
        _cfgload.check_ranges(self, health_check_period_s=(0, None, "open"), max_queued=(1, None), stage=(0, None))
        if self.stage is not None and self.method is None:
            raise ValueError("stage: used only with method= (a merging method's stage adapter)")


def load_serve_cfg(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ServeCfg:
    return _cfgload.load(ServeCfg, path, overrides)


def changed(cfg: ServeCfg, **changes: Any) -> ServeCfg:
    """``cfg`` with top-level or dotted keys changed (``limits__max_images=2`` for ``limits.max_images``),
    strictly checked."""
    return _cfgload.from_dict(ServeCfg, _cfgload.apply_overrides(
        _cfgload.to_dict(cfg), [f"{k.replace('__', '.')}={v}" for k, v in changes.items()]))


#: Keys that only shape a Ray Serve deployment (replicas, resources, proxies, the app's name and prefix):
#: ``clsvc serve --local`` runs one process without Ray and refuses them when set to anything but the default.
RAY_ONLY = ("app_name", "route_prefix", "http_port", "http_host", "ingress_num_cpus", "colocate",
            "health_check_period_s", "router.replicas", "router.num_cpus", "router.num_gpus", "expert.replicas",
            "expert.num_cpus", "expert.num_gpus")


def ray_only_settings(cfg: ServeCfg) -> list[str]:
    """The :data:`RAY_ONLY` keys ``cfg`` sets to something other than the default (``key=value``)."""
    mine, default = _cfgload.to_dict(cfg), _cfgload.to_dict(ServeCfg())
    out = []
    for key in RAY_ONLY:
        a, b = mine, default
        for part in key.split("."):
            a, b = a[part], b[part]
        if a != b:
            out.append(f"{key}={a}")
    return out
