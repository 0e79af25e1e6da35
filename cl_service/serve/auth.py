"""The shared-token check of the served API, one for every transport (gRPC metadata, HTTP headers).

A client sends ``authorization: Bearer <token>`` (or ``x-clsvc-token: <token>``); the server keeps only the
token's sha256 and compares in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Iterable

import grpc

from cl_service.serve.catalog import RequestError

UNAUTHENTICATED_MESSAGE = ("missing or wrong token: send metadata 'authorization: Bearer <token>' "
                           "or 'x-clsvc-token: <token>'")


def token_sha256(token: str | None) -> str | None:
    """What a server keeps of the shared token (None: no token required)."""
    return hashlib.sha256(token.encode()).hexdigest() if token else None


def presented_token(metadata: Iterable[tuple[str, str]]) -> str | None:
    """The token a call carries: ``x-clsvc-token``, else an ``authorization: Bearer`` value (keys any case)."""
    md = {k.lower(): v for k, v in metadata}
    token = md.get("x-clsvc-token")
    if token is None and md.get("authorization", "").lower().startswith("bearer "):
        token = md["authorization"][7:].strip()
    return token


def check_token(metadata: Iterable[tuple[str, str]], sha256: str | None) -> None:
    """Raise ``UNAUTHENTICATED`` unless the call carries the token whose sha256 is ``sha256`` (None: open)."""
    if sha256 is None:
        return
    token = presented_token(metadata)
    if token is None or not hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), sha256):
        raise RequestError(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
