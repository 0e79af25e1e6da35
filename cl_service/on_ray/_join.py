"""``ray start`` for an extra node of a loopback-only cluster (see :func:`cl_service.on_ray.local.add_node`).

Runs Ray's own ``ray start`` command with one change: the CLI's "multi-node clusters are disabled"
refusal is lifted, while the setting behind it (clustering disabled -> every address resolves to
127.0.0.1) stays in force for the rest of Ray.
"""

import sys

import ray._private.ray_constants as _constants
import ray.scripts.scripts as _scripts


class _ClusterCheckLifted:
    ENABLE_RAY_CLUSTER = True

    def __getattr__(self, name):
        return getattr(_constants, name)


if __name__ == "__main__":
    _scripts.ray_constants = _ClusterCheckLifted()  # only the CLI module sees the lifted check
    sys.argv = ["ray", "start", *sys.argv[1:]]
    _scripts.main()
