"""The test switch that makes Ray workers and evaluator actors behave as if they ran on another node than the
driver's: they then read adapters only from copies the driver shipped (:mod:`cl_service.adapters.transfer`)."""

from __future__ import annotations

import os

FORCE_MIRROR_ENV = "CLSVC_FORCE_MIRROR"


def force_mirror() -> bool:
    """Whether ``CLSVC_FORCE_MIRROR`` is set (to anything but ``0``) in this process."""
    return os.environ.get(FORCE_MIRROR_ENV, "") not in ("", "0")
