"""Progress bars for long work (evaluation units, base builds, data generation and ingest), on stderr.

Shown only when stderr is a terminal (tqdm's ``disable=None``), so job logs, CI and ``ray job submit`` output
carry none; ``CLSVC_PROGRESS=0`` turns them off on a terminal too, ``CLSVC_PROGRESS=1`` forces them on.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable


def _disable() -> bool | None:
    v = os.environ.get("CLSVC_PROGRESS", "").strip().lower()
    if v in ("0", "false", "no", "off"):
        return True
    if v in ("1", "true", "yes", "on"):
        return False
    return None  # tqdm: off unless stderr is a TTY


def bar(total: int | None = None, desc: str = "", unit: str = "it", iterable: Iterable[Any] | None = None,
        **kw: Any):
    """A tqdm bar on stderr that leaves no line behind and stays quiet when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False,
                disable=_disable(), **kw)
