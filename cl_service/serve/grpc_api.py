"""Importable names for Ray Serve's ``grpc_options.grpc_servicer_functions``, and the token check in its proxy.

One module that names both servicer adders (cl.v1 from the committed stubs, :mod:`cl_service.proto`, and
the standard health service). Importing it also registers ``cl.v1`` in the default protobuf descriptor
pool, which is what lets the proxy's server reflection describe the service.

- ``cl_service.serve.grpc_api.add_ContinualLearningServicer_to_server``
- ``cl_service.serve.grpc_api.add_HealthServicer_to_server``: standard ``grpc.health.v1.Health``; Serve's
  proxy routes ``/grpc.health.v1.Health/Check`` to the ingress deployment's ``Check`` method.

**The token in the proxy.** Serve's gRPC proxy (Ray 2.60) deserializes a request (up to its message limit) and
ships it to the ingress replica before any code of the app sees the call, and ``gRPCOptions`` takes no server
interceptor. The servicer adder runs inside the proxy, with the proxy's server, before it starts: when the
proxy's environment holds the token (:data:`~cl_service.serve.security.PROXY_TOKEN_ENV`, which
:func:`~cl_service.on_ray.serve_start.start` puts there, or ``CLSVC_TOKEN`` itself, e.g. a cluster started with
it), it registers cl.v1 without a request deserializer and wraps the handlers the proxy makes
(``service_handler_factory``): a call's metadata is checked first, and only a call with the token is parsed and
forwarded. Without the token in the proxy, or on a Serve whose server lacks that factory, the ingress checks it
(after the proxy has read the message; a warning says so).
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Callable

import grpc
from grpc_health.v1 import health_pb2_grpc

from cl_service.serve.auth import check_token
from cl_service.serve.catalog import RequestError
from cl_service.serve.proto import load
from cl_service.serve.security import PROXY_TOKEN_ENV

log = logging.getLogger(__name__)
pb2, pb2_grpc = load()

SERVICE = pb2.DESCRIPTOR.services_by_name["ContinualLearning"].full_name
SERVICER_FUNCTIONS = [
    "cl_service.serve.grpc_api.add_ContinualLearningServicer_to_server",
    "cl_service.serve.grpc_api.add_HealthServicer_to_server",
]
#: cl.v1's methods: their request parsers and response serializers.
METHODS: dict[str, tuple[Callable[[bytes], Any], Callable[[Any], bytes]]] = {
    "Predict": (pb2.PredictRequest.FromString, pb2.PredictResponse.SerializeToString),
    "ListExperts": (pb2.ListExpertsRequest.FromString, pb2.ListExpertsResponse.SerializeToString),
}


def proxy_token_sha256() -> str | None:
    """The token's sha256 this process (a Serve proxy) checks: :data:`PROXY_TOKEN_ENV` when set (empty: none),
    else ``$CLSVC_TOKEN``'s (a cluster started with it)."""
    if PROXY_TOKEN_ENV in os.environ:
        return os.environ[PROXY_TOKEN_ENV] or None
    token = os.environ.get("CLSVC_TOKEN")
    return hashlib.sha256(token.encode()).hexdigest() if token else None


def add_ContinualLearningServicer_to_server(servicer: Any, server: Any) -> None:
    sha = proxy_token_sha256()
    factory = getattr(server, "service_handler_factory", None)
    if sha is None or factory is None:
        if sha is not None:
            log.warning("this gRPC server takes no token check before parsing; the ingress checks the token")
        pb2_grpc.add_ContinualLearningServicer_to_server(servicer, server)
        return
    server.service_handler_factory = token_first(factory, sha)
    try:  # the server replaces each unary handler by the factory's, keeping the (absent) deserializer
        handlers = {name: grpc.unary_unary_rpc_method_handler(getattr(servicer, name), request_deserializer=None,
                                                              response_serializer=ser)
                    for name, (_, ser) in METHODS.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    finally:
        server.service_handler_factory = factory


def token_first(factory: Callable[..., Any], sha256: str) -> Callable[..., Any]:
    """``factory`` (Serve's proxy: ``(service_method, streaming_type) -> handler``) whose cl.v1 unary handlers
    take the request's raw bytes, refuse a call without the token before parsing them (``UNAUTHENTICATED``),
    refuse bytes that do not parse (``INVALID_ARGUMENT``), and hand the parsed request on."""
    def make(service_method: str, streaming_type: Any) -> Any:
        inner = factory(service_method=service_method, streaming_type=streaming_type)
        service, _, method = service_method.strip("/").partition("/")
        if service != SERVICE or method not in METHODS or getattr(streaming_type, "name", "") != "UNARY_UNARY":
            return inner
        parse = METHODS[method][0]

        async def unary_unary(raw: bytes, context: Any) -> Any:
            try:
                check_token(context.invocation_metadata() or (), sha256)
            except RequestError as e:
                await context.abort(e.code, e.message)
            try:
                request = parse(raw)
            except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends: a bad request
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {str(e)[:300]}")
            return await inner(request, context)

        return unary_unary

    return make


def add_HealthServicer_to_server(servicer: Any, server: Any) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
