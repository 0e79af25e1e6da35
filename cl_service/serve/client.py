"""A small cl.v1 client (used by ``clsvc predict``, the load test and the tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import grpc

from cl_service.serve.proto import load

pb2, pb2_grpc = load()


@dataclass
class Client:
    """A channel to ``address`` with the metadata every call carries (shared token, Serve app name).

    ``tls_ca``: connect with TLS, trusting this PEM bundle (e.g. the server's self-signed certificate);
    ``tls_server_name``: the name to check the certificate against when ``address`` differs from it."""

    address: str = "127.0.0.1:9000"
    token: str | None = None
    application: str | None = None
    max_message_bytes: int = 256 * 1024 * 1024
    tls_ca: str | None = None
    tls_server_name: str | None = None
    channel: grpc.Channel = field(init=False)

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
        return self.stub.Predict(req, timeout=timeout, metadata=self.metadata)

    def list_experts(self, timeout: float = 30.0) -> Any:
        return self.stub.ListExperts(pb2.ListExpertsRequest(), timeout=timeout, metadata=self.metadata)

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
