"""The adapter registry: adapter folders addressed by id, each with ``adapter.json`` and checksums.

An adapter folder (peft layout: ``adapter_config.json``, ``adapter_model.safetensors``) gets an
``adapter.json``: ``{id, kind, task, description, version, base, job_key, files: {name: sha256}}``.
A folder is *complete* only when that file exists and every listed file matches its checksum: this is
how a resumed run knows which training stages are done. Clients address adapters by id, never by path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cl_service._atomic import atomic_write_text, replace_dir
from cl_service.data.shards import sha256_file

ADAPTER_META = "adapter.json"


class AdapterError(LookupError):
    """A missing, incomplete or corrupt adapter, or an unknown adapter id."""


@dataclass(frozen=True)
class AdapterInfo:
    id: str
    kind: str
    task: str
    description: str
    version: int
    path: Path
    meta: dict[str, Any]


def finalize_adapter(folder: str | Path, *, id: str, kind: str, task: str, description: str, base: str,
                     job_key: str, extra: dict[str, Any] | None = None,
                     replaces: str | Path | None = None) -> dict[str, Any]:
    """Write ``adapter.json`` (checksums of every file in ``folder``) — the last step of saving an adapter.

    ``version`` counts publications: 1 for a new adapter, the replaced one's version + 1 when the weights or
    the job differ (a retrain), the same version when identical files are published again. ``replaces`` is
    the folder this one will replace: by default ``folder`` itself, or for a :func:`publish_dir` staging
    folder the final folder it names."""
    folder = Path(folder)
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != ADAPTER_META
             and not p.name.startswith(".")}
    version = _next_version(Path(replaces) if replaces is not None else _final_of(folder), files, job_key)
    meta = {"id": id, "kind": kind, "task": task, "description": description, "version": version, "base": base,
            "job_key": job_key, "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra or {})}
    atomic_write_text(folder / ADAPTER_META, json.dumps(meta, indent=2))
    return meta


def restamp_version(stage: str | Path, final: str | Path) -> dict[str, Any]:
    """Give an adapter finalized elsewhere (a Ray Train worker's own folder, brought here in ``stage``) the
    version it gets as the replacement of ``final`` here. ``adapter.json`` is not among its own checksums, so
    the adapter still verifies."""
    stage = Path(stage)
    meta = json.loads((stage / ADAPTER_META).read_text())
    version = _next_version(Path(final), meta.get("files", {}), meta.get("job_key", ""))
    if meta.get("version") != version:
        meta["version"] = version
        atomic_write_text(stage / ADAPTER_META, json.dumps(meta, indent=2))
    return meta


def _final_of(folder: Path) -> Path:
    """The folder a :func:`publish_dir` staging folder (``.<name>.partial-<pid>``) becomes; else itself."""
    m = re.fullmatch(r"\.(.+)\.partial-\d+", folder.name)
    return folder.with_name(m.group(1)) if m else folder


def _next_version(final: Path, files: dict[str, str], job_key: str) -> int:
    try:
        old = json.loads((final / ADAPTER_META).read_text())
        version = int(old.get("version", 1))
    except (OSError, ValueError, AttributeError, TypeError):
        return 1  # nothing published there yet (or unreadable: start over)
    return version if old.get("files") == files and old.get("job_key") == job_key else version + 1


def adapter_digest(folder: str | Path) -> str | None:
    """Short sha256 of a folder's ``adapter.json`` (None without one): it lists every file's checksum, so
    it names the adapter's content wherever the folder lives."""
    import hashlib

    p = Path(folder) / ADAPTER_META
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else None


def read_adapter(folder: str | Path, job_key: str | None = None, verify: bool = True) -> dict[str, Any]:
    """The adapter's metadata; raises :class:`AdapterError` if incomplete, corrupt or of another job."""
    folder = Path(folder)
    mpath = folder / ADAPTER_META
    if not mpath.is_file():
        raise AdapterError(f"adapter {folder} is missing or incomplete (no {ADAPTER_META})")
    meta = json.loads(mpath.read_text())
    if job_key is not None and meta.get("job_key") != job_key:
        raise AdapterError(f"adapter {folder} was trained by another configuration")
    if verify:
        for name, digest in meta["files"].items():
            p = folder / name
            if not p.is_file() or sha256_file(p) != digest:
                raise AdapterError(f"adapter {folder}: file {name} is missing or does not match its checksum")
    return meta


def is_complete(folder: str | Path, job_key: str | None = None) -> bool:
    try:
        read_adapter(folder, job_key)
        return True
    except AdapterError:
        return False


def publish_dir(final: str | Path) -> Path:
    """A fresh staging folder next to ``final``; move it into place with :func:`commit_dir`."""
    final = Path(final)
    stage = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    return stage


commit_dir = replace_dir


class AdapterRegistry:
    """All complete adapters under a run's ``adapters/`` folder, by id."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def scan(self) -> dict[str, AdapterInfo]:
        out: dict[str, AdapterInfo] = {}
        for mpath in sorted(self.root.rglob(ADAPTER_META)):
            if any(part.startswith(".") for part in mpath.relative_to(self.root).parts):
                continue  # staging folders of unfinished saves
            meta = json.loads(mpath.read_text())
            out[meta["id"]] = AdapterInfo(meta["id"], meta["kind"], meta["task"], meta["description"],
                                          int(meta.get("version", 1)), mpath.parent, meta)
        return out

    def get(self, adapter_id: str) -> AdapterInfo:
        items = self.scan()
        if adapter_id not in items:
            raise AdapterError(f"unknown adapter {adapter_id!r}; known: {', '.join(sorted(items)) or '(none)'}")
        info = items[adapter_id]
        read_adapter(info.path)  # verify checksums before anyone loads it
        return info
