"""Result files name no path of the machine that wrote them: they are committed and read elsewhere.

:func:`portable` rewrites every absolute path inside a result (arguments, commands, logs) as a name that holds
on any machine: under the working directory (the checkout) relative to it, under ``$OUT`` as ``$OUT/...``, the
interpreter's prefix as ``$VENV``, the temporary folder as ``$TMPDIR``, the home as ``~``.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any


def _roots() -> list[tuple[str, str]]:
    roots = [(os.environ.get("OUT") or "", "$OUT"), (os.getcwd(), ""), (sys.prefix, "$VENV"),
             (tempfile.gettempdir(), "$TMPDIR"), (str(Path.home()), "~")]
    out: dict[str, str] = {}
    for path, name in roots:  # as written and as resolved (a symlinked /tmp, a checkout reached through a link)
        if path and Path(path).is_absolute():
            for form in (path.rstrip("/"), str(Path(path).resolve())):
                if form and form != "/":
                    out.setdefault(form, name)
    return sorted(out.items(), key=lambda r: -len(r[0]))  # longest first: a venv in the checkout is $VENV


def portable(obj: Any, roots: list[tuple[str, str]] | None = None) -> Any:
    """``obj`` (str, list, tuple, dict; anything else unchanged) with each of ``roots`` (``(absolute prefix,
    name)``, default: this process's ``$OUT``, working directory, ``sys.prefix``, temporary folder and home)
    replaced where it begins a path: ``/cwd/bench/x`` -> ``bench/x``, ``/tmp/a`` -> ``$TMPDIR/a``."""
    roots = _roots() if roots is None else roots
    if isinstance(obj, str):
        for prefix, name in roots:
            obj = re.sub(re.escape(prefix) + r"(/|(?![\w.-]))",
                         lambda m, n=name: (f"{n}/" if n else "") if m.group(1) else (n or "."), obj)
        return obj
    if isinstance(obj, dict):
        return {k: portable(v, roots) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(portable(v, roots) for v in obj)
    return obj
