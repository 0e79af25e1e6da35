"""CL methods; importing this package registers them all in ``METHODS``, then the replay variant ``<name>_replay``
of every method that trains sequentially (:mod:`cl_service.methods.replay`)."""

from cl_service.methods.base import METHODS, Answer, Method, StageContext, unserved, why_unserved
from cl_service.methods import clmoe as _clmoe  # noqa: F401
from cl_service.methods import disco as _disco  # noqa: F401
from cl_service.methods import hide as _hide  # noqa: F401
from cl_service.methods import joint as _joint  # noqa: F401
from cl_service.methods import keeplora as _keeplora  # noqa: F401
from cl_service.methods import lora_ft as _lora_ft  # noqa: F401
from cl_service.methods import modalprompt as _modalprompt  # noqa: F401
from cl_service.methods import moelora as _moelora  # noqa: F401
from cl_service.methods import mrlora as _mrlora  # noqa: F401
from cl_service.methods import olora as _olora  # noqa: F401
from cl_service.methods import oracle as _oracle  # noqa: F401
from cl_service.methods import sefe as _sefe  # noqa: F401
from cl_service.methods import zero_shot as _zero_shot  # noqa: F401
from cl_service.methods.replay import register_replay_variants

register_replay_variants(METHODS)  # after every method module: each sequential one gets its replay row

__all__ = ["METHODS", "Answer", "Method", "StageContext", "unserved", "why_unserved"]
