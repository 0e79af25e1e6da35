"""A driver joining a cluster pins itself to loopback only when the cluster is on loopback."""

import pytest

from cl_service.on_ray.local import driver_node_ip


@pytest.mark.parametrize("address, ip", [
    ("127.0.0.1:6381", "127.0.0.1"),   # make demo, the Ray tier: Ray would otherwise look at the external interface
    ("localhost:6379", "127.0.0.1"),
    ("auto", "127.0.0.1"),
    ("10.0.0.5:6379", None),           # `ray job submit` on a launcher cluster sets the head's private address
    ("ip-10-0-0-5.ec2.internal:6379", None),
    ("ray://10.1.2.3:10001", None),
])
def test_driver_node_ip(address, ip):
    assert driver_node_ip(address) == ip
