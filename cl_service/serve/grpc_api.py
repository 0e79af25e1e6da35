"""Importable names for Ray Serve's ``grpc_options.grpc_servicer_functions``.

One module that names both servicer adders (cl.v1 from the committed stubs, :mod:`cl_service.proto`, and
the standard health service). Importing it also registers ``cl.v1`` in the default protobuf descriptor
pool, which is what lets the proxy's server reflection describe the service.

- ``cl_service.serve.grpc_api.add_ContinualLearningServicer_to_server``
- ``cl_service.serve.grpc_api.add_HealthServicer_to_server``: standard ``grpc.health.v1.Health``; Serve's
  proxy routes ``/grpc.health.v1.Health/Check`` to the ingress deployment's ``Check`` method.
"""

from __future__ import annotations

from typing import Any

from grpc_health.v1 import health_pb2_grpc

from cl_service.serve.proto import load

pb2, pb2_grpc = load()

SERVICER_FUNCTIONS = [
    "cl_service.serve.grpc_api.add_ContinualLearningServicer_to_server",
    "cl_service.serve.grpc_api.add_HealthServicer_to_server",
]


def add_ContinualLearningServicer_to_server(servicer: Any, server: Any) -> None:
    pb2_grpc.add_ContinualLearningServicer_to_server(servicer, server)


def add_HealthServicer_to_server(servicer: Any, server: Any) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
