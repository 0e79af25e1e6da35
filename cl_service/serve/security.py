"""Safe defaults of the gRPC transport: message size, who may call (shared token), TLS, where to listen.

- **Message size**: gRPC reads a whole message before any handler (or interceptor) sees it, so the receive
  limit is what bounds the memory one call can take: ``max_images`` images of ``max_image_bytes`` plus the
  question (UTF-8, at most 4 bytes a character) and slack for the framing (:func:`grpc_message_limit`).
- **Token**: :class:`TokenInterceptor` refuses a call without the shared token from its metadata, before
  the request message is deserialized or handled (health and reflection stay open); on Ray Serve's gRPC proxy
  :mod:`cl_service.serve.grpc_api` does the same with the token of :data:`PROXY_TOKEN_ENV`.
- **Where**: serving on anything but loopback without a token needs an explicit ``insecure=True``
  (:func:`require_safe_exposure`; the CLIs' ``--insecure``).
- **Malformed messages**: :class:`DecodeGuard` answers a request that does not parse ``INVALID_ARGUMENT``.
- **TLS**: :func:`server_credentials` (PEM certificate chain + key) for the plain server,
  :func:`channel_credentials` (a PEM CA bundle; None = the system roots) for clients.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import grpc

from cl_service.serve.auth import UNAUTHENTICATED_MESSAGE, check_token
from cl_service.serve.catalog import RequestError

#: Methods open without a token: load balancers probe health, tools discover the API by reflection.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_FRAMING = 64 * 1024


class InsecureExposure(ValueError):
    """A server would listen beyond loopback without a token, and ``insecure`` was not given."""


def grpc_message_limit(limits: Any) -> int:
    """Largest request message (bytes) a server accepts under ``limits`` (``max_image_bytes``, ``max_images``,
    ``max_question_chars``: a :class:`~cl_service.serve.catalog.Limits` or the serve config's): every image at
    its limit, the longest question in UTF-8, and framing slack; capped at gRPC's 2 GiB - 1."""
    return min(limits.max_images * (limits.max_image_bytes + 16) + 4 * limits.max_question_chars + _FRAMING,
               2 ** 31 - 1)


#: The sha256 of the shared token in Serve's proxies' environment: the gRPC proxy checks it before it parses a
#: request (:mod:`cl_service.serve.grpc_api`).
PROXY_TOKEN_ENV = "CLSVC_PROXY_TOKEN_SHA256"


def serve_proxy_env(limits: Any, token_sha256: str | None = None) -> dict[str, str]:
    """Environment for Ray Serve's controller, which its proxies inherit: Serve 2.60 takes the gRPC proxy's
    message limit from ``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE`` (default 2 GiB; ``gRPCOptions`` has no field), and
    the proxy's token check reads :data:`PROXY_TOKEN_ENV` (empty: no token, whatever else the env holds)."""
    return {"RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(grpc_message_limit(limits)), PROXY_TOKEN_ENV: token_sha256 or ""}


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (``127.0.0.0/8``, ``::1``); ``0.0.0.0``, ``::`` and names are not."""
    h = host.strip().strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def require_safe_exposure(host: str, token: str | None, insecure: bool, token_env: str = "CLSVC_TOKEN") -> None:
    """Refuse to serve on a non-loopback ``host`` without a token unless ``insecure``."""
    if token or insecure or is_loopback(host):
        return
    raise InsecureExposure(
        f"refusing to serve on {host} without a token: anyone who reaches the port could call the API. "
        f"Set {token_env} (clients then send it), or pass --insecure to accept unauthenticated calls")


class TokenInterceptor(grpc.ServerInterceptor):
    """Calls without the shared token (``sha256``: its :func:`~cl_service.serve.auth.token_sha256`) end with
    ``UNAUTHENTICATED`` before their handler runs (the request is never deserialized); :data:`OPEN_PREFIXES`
    stay open."""

    def __init__(self, sha256: str) -> None:
        if not sha256:
            raise ValueError("TokenInterceptor needs the sha256 of a non-empty token")
        self.sha256 = sha256

        def deny(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

        self._deny = grpc.unary_unary_rpc_method_handler(deny)  # no deserializer: the bytes stay unread

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        if handler_call_details.method.startswith(OPEN_PREFIXES):
            return continuation(handler_call_details)
        try:
            check_token(handler_call_details.invocation_metadata or (), self.sha256)
        except RequestError:
            return self._deny
        return continuation(handler_call_details)


class _Malformed:
    def __init__(self, reason: str) -> None:
        self.reason = reason


class DecodeGuard(grpc.ServerInterceptor):
    """A request that does not parse as its message (corrupt wire format, invalid UTF-8 in a string field)
    gets ``INVALID_ARGUMENT`` naming the problem, instead of gRPC's own ``INTERNAL`` ("Exception
    deserializing request!"). Unary-unary methods only (all of cl.v1 and health)."""

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        parse, behavior = handler.request_deserializer, handler.unary_unary

        def safe_parse(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends: a bad request
                return _Malformed(str(e)[:300] or type(e).__name__)

        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.reason}")
            return behavior(request, context)

        return handler._replace(request_deserializer=safe_parse, unary_unary=guarded)


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the TLS {what} {path}: {e.strerror or e}") from None


def server_credentials(cert: str | Path, key: str | Path) -> grpc.ServerCredentials:
    """TLS for a plain gRPC server from PEM files: the certificate (chain) and its private key."""
    return grpc.ssl_server_credentials([(_read(key, "key"), _read(cert, "certificate"))])


def channel_credentials(ca: str | Path | None = None) -> grpc.ChannelCredentials:
    """TLS for a client: trust the PEM bundle ``ca`` (e.g. a self-signed server certificate); None = the
    system's roots."""
    return grpc.ssl_channel_credentials(root_certificates=_read(ca, "CA bundle") if ca else None)
