"""CL methods; importing this package registers them all in ``METHODS``."""

from cl_service.methods.base import METHODS, Answer, Method, StageContext
from cl_service.methods import joint as _joint  # noqa: F401
from cl_service.methods import lora_ft as _lora_ft  # noqa: F401
from cl_service.methods import moelora as _moelora  # noqa: F401
from cl_service.methods import mrlora as _mrlora  # noqa: F401
from cl_service.methods import olora as _olora  # noqa: F401
from cl_service.methods import oracle as _oracle  # noqa: F401
from cl_service.methods import zero_shot as _zero_shot  # noqa: F401

__all__ = ["METHODS", "Answer", "Method", "StageContext"]
