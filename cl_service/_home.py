"""One home for every cache and store: ``$CLSVC_HOME``, default ``~/.cache/clsvc``.

Under it: ``models/`` (built bases, :mod:`cl_service.models.store`; ``$CLSVC_MODEL_STORE`` still overrides)
and ``torch_extensions/`` (DeepSpeed's compiled ops). Never the installed package's folder: on a normal
install that is ``site-packages``. ``make`` and ``cluster/local_demo.sh`` set it to the checkout's ``.clsvc``.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "CLSVC_HOME"


def clsvc_home() -> Path:
    """``$CLSVC_HOME`` (``~`` expanded) or ``~/.cache/clsvc``; not created here."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "clsvc"
