"""Adapter folders as bytes, so that a node with no filesystem shared with the run's driver can use them.

The driver reads a finished adapter folder once (:func:`folder_files`: {file name: bytes}); the Ray layer
moves that through its object store (:mod:`cl_service.on_ray`); the other node writes it back
(:func:`materialise`), atomically, and checks every file against the checksums in its ``adapter.json``
before anyone reads it. Because a job and a stage record know an adapter by those checksums (its digest,
:func:`~cl_service.adapters.registry.adapter_digest`), a copy at another path is the same adapter: a training
job keeps its key, an evaluation unit its record.

A *mirror* is such a node's copy of a run's ``adapters/`` tree, in the same layout (paths relative to the run
folder stay the same): :func:`inventory` lists complete folders by digest, :func:`plan` says which folders to
send and which to drop so that the mirror equals the driver's tree.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from cl_service._atomic import write_folder
from cl_service.adapters.registry import ADAPTER_META, AdapterError, adapter_digest, read_adapter


def folder_files(folder: str | Path) -> dict[str, bytes]:
    """Every file of a complete adapter folder (checked against its checksums), by name. Adapter folders are
    flat; a subfolder is refused rather than silently left behind."""
    folder = Path(folder)
    read_adapter(folder)
    files: dict[str, bytes] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue  # a leftover temp file of an interrupted write
        if not p.is_file():
            raise AdapterError(f"{folder}: {p.name} is not a file; adapter folders are flat")
        files[p.name] = p.read_bytes()
    return files


def materialise(files: dict[str, bytes], folder: str | Path) -> Path:
    """Write ``files`` as the adapter folder ``folder`` (replacing any older one atomically) and verify them
    against their ``adapter.json``; an incomplete or corrupt copy is removed and raises :class:`AdapterError`."""
    folder = write_folder(folder, files)
    try:
        read_adapter(folder)
    except (AdapterError, ValueError, KeyError) as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise AdapterError(f"the copy of an adapter did not arrive intact: {e}") from None
    return folder


def inventory(root: str | Path) -> dict[str, str]:
    """Complete adapter folders under ``root`` (a run's ``adapters/``): path relative to ``root`` -> digest.
    Staging folders (names starting with ``.``) are skipped."""
    root = Path(root)
    out: dict[str, str] = {}
    if not root.is_dir():
        return out
    for meta in sorted(root.rglob(ADAPTER_META)):
        rel = meta.parent.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        digest = adapter_digest(meta.parent)
        if digest is not None:
            out[rel.as_posix()] = digest
    return out


def plan(source: dict[str, str], mirror: dict[str, str]) -> tuple[list[str], list[str]]:
    """What makes ``mirror`` equal ``source`` (two :func:`inventory` results): the folders to send (missing or
    with another digest) and the folders to drop (gone from the source)."""
    send = [rel for rel, d in sorted(source.items()) if mirror.get(rel) != d]
    drop = sorted(rel for rel in mirror if rel not in source)
    return send, drop


def drop(root: str | Path, rels: list[str]) -> None:
    """Remove the mirror's folders ``rels`` (relative to ``root``)."""
    root = Path(root).resolve()
    for rel in rels:
        target = (root / rel).resolve()
        if root not in target.parents:
            raise ValueError(f"{rel!r} is not inside {root}")
        shutil.rmtree(target, ignore_errors=True)
