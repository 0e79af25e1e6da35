"""The paths ``config.resolved.json`` records, written so that a results folder names no path of the machine
that ran it, and read back into paths the reading process can open.

A results folder is copied, committed and served from other machines and working directories, so the base and
the dataset are recorded as:

- a path relative to the results folder when they lie inside it (a built-in benchmark's ``<out>/data``);
- ``$CLSVC_HOME/<rel>`` when they lie under the home of caches and stores (a base ``clsvc`` built);
- a URI, or a local path the user gave as an absolute one, as given (the user named it);
- otherwise a path relative to the results folder (``../data/dcl``).

The base is named by content too (``base_digest``): where its recorded path depends on where the folder or the
home is now, :func:`read_resolved` checks that the folder it finds there is that base, so a results folder is
never served over another base that happens to sit at the same place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cl_service._home import HOME_ENV, clsvc_home
from cl_service.data.shards import is_uri
from cl_service.digest import base_digest

RESOLVED = "config.resolved.json"
HOME_PREFIX = f"${HOME_ENV}/"


class ResolvedError(ValueError):
    """A results folder's recorded base or dataset cannot be found as recorded."""


def portable_path(path: str | os.PathLike, out: str | os.PathLike, given: str | None = None) -> str:
    """How ``config.resolved.json`` names ``path`` (absolute, or a URI) for the results folder ``out``;
    ``given`` is the value the user wrote in the config (``base.path``, ``data.path``), if any."""
    if is_uri(path):
        return str(path)
    p, out = Path(path).resolve(), Path(out).resolve()
    if p.is_relative_to(out):
        return p.relative_to(out).as_posix() or "."
    home = clsvc_home().resolve()
    if p.is_relative_to(home):
        return HOME_PREFIX + p.relative_to(home).as_posix()
    if given is not None and Path(given).expanduser().is_absolute():
        return str(Path(given).expanduser())
    return Path(os.path.relpath(p, out)).as_posix()


def resolve_path(value: str, run_dir: str | os.PathLike) -> str:
    """The path (or URI) a recorded ``value`` names for the results folder ``run_dir``, as this process sees it.
    Absolute values (as every folder written before this format recorded them) are returned unchanged."""
    if is_uri(value):
        return value
    if value.startswith(HOME_PREFIX):
        return str(clsvc_home() / value[len(HOME_PREFIX):])
    return str((Path(run_dir) / value).resolve())  # an absolute value stays itself


def read_resolved(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``run_dir``'s ``config.resolved.json`` with ``base`` and ``dataset`` resolved to paths this process opens.

    Raises ``FileNotFoundError`` when the file is missing, and :class:`ResolvedError` when a base recorded
    relative to the folder or to ``$CLSVC_HOME`` is not found there, or is another base than the one recorded
    (by content digest)."""
    resolved = json.loads((Path(run_dir) / RESOLVED).read_text())
    recorded, want = resolved.get("base"), resolved.get("base_digest")
    for key in ("base", "dataset"):
        if isinstance(resolved.get(key), str):
            resolved[key] = resolve_path(resolved[key], run_dir)
    if isinstance(recorded, str) and not is_uri(recorded) and not Path(recorded).is_absolute() and want:
        try:
            have = base_digest(resolved["base"])
        except FileNotFoundError:
            raise ResolvedError(f"{run_dir}: its base {recorded!r} is not at {resolved['base']} (${HOME_ENV} is "
                                f"{clsvc_home()}); build or copy it there, or set ${HOME_ENV}") from None
        if have != want:
            raise ResolvedError(f"{run_dir}: the base at {resolved['base']} has digest {have}, the run's had "
                                f"{want}: another base sits there (rebuilt, or another ${HOME_ENV})")
    return resolved

