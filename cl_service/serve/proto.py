"""The cl.v1 gRPC stubs for the serving code: ``pb2`` (messages) and ``pb2_grpc`` (stub, servicer).

They are generated once and committed inside the package (:mod:`cl_service.proto`), so a plain
``pip install`` imports them; regenerate with ``python -m cl_service.proto`` after editing ``cl.proto``.
"""

from __future__ import annotations

from types import ModuleType

from cl_service.proto import PROTO_FILE, generate  # noqa: F401  (re-exported)
from cl_service.proto.cl.v1 import cl_pb2 as pb2
from cl_service.proto.cl.v1 import cl_pb2_grpc as pb2_grpc


def load() -> tuple[ModuleType, ModuleType]:
    """``(cl_pb2, cl_pb2_grpc)``."""
    return pb2, pb2_grpc
