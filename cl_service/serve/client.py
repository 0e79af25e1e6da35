"""A small cl.v1 client (used by ``clsvc predict``, the load test and the tests).

``Predict`` and ``ListExperts`` are idempotent (greedy decoding: the same request gets the same answer), so
the client retries them, as gRPC recommends, when the call fails with a status that says "not now" rather than
"no": ``UNAVAILABLE`` by default (the server, or a replica behind Serve's proxy, is down or restarting).
Retries back off exponentially with full jitter (gRPC's retry design, A6: the n-th retry waits
``random(0, min(initial * multiplier**(n-1), max))``), stop after ``retries`` retries or once ``retry_deadline_s``
has passed since the first attempt, and are counted (:attr:`Client.retried`). ``retries=0`` turns them off.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import grpc

from cl_service.serve.proto import load

pb2, pb2_grpc = load()


@dataclass
class Client:
    """A channel to ``address`` with the metadata every call carries (shared token, Serve app name).

    ``tls_ca``: connect with TLS, trusting this PEM bundle (e.g. the server's self-signed certificate);
    ``tls_server_name``: the name to check the certificate against when ``address`` differs from it.
    ``retries`` / ``retry_deadline_s`` / ``retry_codes``: retry ``Predict``/``ListExperts`` failing with one of
    ``retry_codes`` (status names) at most ``retries`` times, while less than ``retry_deadline_s`` seconds have
    passed since the first attempt (each attempt has the call's own ``timeout``); ``retries=0``: never."""

    address: str = "127.0.0.1:9000"
    token: str | None = None
    application: str | None = None
    max_message_bytes: int = 256 * 1024 * 1024
    tls_ca: str | None = None
    tls_server_name: str | None = None
    retries: int = 6
    retry_deadline_s: float = 30.0
    retry_codes: tuple[str, ...] = ("UNAVAILABLE",)
    retry_initial_backoff_s: float = 0.2
    retry_max_backoff_s: float = 5.0
    retry_multiplier: float = 2.0
    channel: grpc.Channel = field(init=False)
    retried: int = field(init=False, default=0)
    """Retries made so far (all threads; a call answered at its third attempt counts 2)."""
    retried_calls: int = field(init=False, default=0)
    """Calls that needed at least one retry (whether they then succeeded or not)."""

    def __post_init__(self) -> None:
        options = [("grpc.max_send_message_length", self.max_message_bytes),
                   ("grpc.max_receive_message_length", self.max_message_bytes)]
        if self.tls_ca is None:
            self.channel = grpc.insecure_channel(self.address, options=options)
        else:
            from cl_service.serve.security import channel_credentials

            if self.tls_server_name:
                options.append(("grpc.ssl_target_name_override", self.tls_server_name))
            self.channel = grpc.secure_channel(self.address, channel_credentials(self.tls_ca), options=options)
        self.stub = pb2_grpc.ContinualLearningStub(self.channel)
        self._codes = frozenset(grpc.StatusCode[c] for c in self.retry_codes)
        self._count_lock = threading.Lock()

    def wait_ready(self, timeout: float) -> None:
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise TimeoutError(f"no gRPC server at {self.address} within {timeout:.0f} s") from None

    @property
    def metadata(self) -> list[tuple[str, str]]:
        md = []
        if self.token:
            md.append(("authorization", f"Bearer {self.token}"))
        if self.application:
            md.append(("application", self.application))
        return md

    def predict(self, images: Sequence[bytes], question: str, expert: str | None = None,
                max_new_tokens: int | None = None, timeout: float = 60.0) -> Any:
        req = pb2.PredictRequest(images=list(images), question=question)
        if expert is not None:
            req.expert = expert
        if max_new_tokens is not None:
            req.max_new_tokens = max_new_tokens
        return self._call(self.stub.Predict, req, timeout)

    def list_experts(self, timeout: float = 30.0) -> Any:
        return self._call(self.stub.ListExperts, pb2.ListExpertsRequest(), timeout)

    def _call(self, method: Callable[..., Any], request: Any, timeout: float) -> Any:
        """``method(request)``, retried on :attr:`retry_codes` with jittered exponential backoff (module doc);
        the last error is raised when retries are spent or the next wait would end past ``retry_deadline_s``."""
        start = time.monotonic()
        attempt = 0
        while True:
            try:
                return method(request, timeout=timeout, metadata=self.metadata)
            except grpc.RpcError as e:
                if e.code() not in self._codes or attempt >= self.retries:
                    raise
                backoff = min(self.retry_initial_backoff_s * self.retry_multiplier ** attempt,
                              self.retry_max_backoff_s)
                wait = random.uniform(0, backoff)
                if time.monotonic() - start + wait >= self.retry_deadline_s:
                    raise
            with self._count_lock:
                self.retried += 1
                self.retried_calls += attempt == 0
            attempt += 1
            time.sleep(wait)

    def health(self, service: str = "", timeout: float = 10.0) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        r = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                           timeout=timeout, metadata=self.metadata)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
