"""Ray tier: one local Ray instance on loopback per session, 2 CPUs."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")  # read when ray is imported: clients of token-auth clusters

pytestmark = pytest.mark.ray


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if ray.is_initialized():
        yield ray
        return
    # A short temp dir: Ray's unix sockets must fit in ~107 characters.
    tmp = tempfile.mkdtemp(prefix="clsvc-ray-", dir="/tmp")
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, _temp_dir=tmp,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
    yield ray
    ray.shutdown()
