"""Content digests of what a run's results depend on: the base checkpoint folder and the shard dataset.

Job keys (:meth:`cl_service.train.job.TrainJob.key`) and stage records (:mod:`cl_service.eval.stage`) name the
base and the dataset by these digests, not by path: a base rebuilt in place (``clsvc base build``) or a dataset
with other rows gets a new digest, so the adapters and evaluations of the old one are not reused against it,
while a moved or copied folder keeps its digest.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cl_service._atomic import atomic_write_text
from cl_service._home import clsvc_home
from cl_service.data.shards import sha256_file

_NOT_LOADED = {"base.json"}  # the model store's build record (recipe, build time, loss): no load reads it
_MEMO: dict[str, tuple[tuple, str]] = {}  # folder -> (files' stat signature, digest), for this process
_DS_MEMO: dict[str, tuple[tuple, str]] = {}  # dataset folder -> (manifest's stat, digest), for this process


def base_digest(path: str | os.PathLike) -> str:
    """Short sha256 of a base checkpoint folder: every file's relative name and sha256 (hidden files and the
    store's ``base.json`` left out), whatever the folder's path.

    Each file's sha256 is computed once and cached under ``$CLSVC_HOME/digests`` (:func:`digest_cache`; never in
    the base's folder, which may be read-only or shared), keyed by its size, mtime and ctime (a rewritten file
    changes them; ctime cannot be set back), so a 14 GB base is read once and later calls only stat its files.
    Raises ``FileNotFoundError`` when ``path`` is not a folder."""
    root = Path(path).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"no base checkpoint folder at {root}")
    sig = tuple((rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for rel, st in _files(root))
    hit = _MEMO.get(str(root))
    if hit is not None and hit[0] == sig:
        return hit[1]
    cached = _read_cache(root)
    hashes: dict[str, str] = {}
    entries: dict[str, list[Any]] = {}
    for rel, *stat in sig:
        e = cached.get(rel)
        hashes[rel] = e[3] if isinstance(e, list) and len(e) == 4 and e[:3] == stat else sha256_file(root / rel)
        entries[rel] = [*stat, hashes[rel]]
    if entries != cached:
        _write_cache(root, entries)
    digest = hashlib.sha256(json.dumps(sorted(hashes.items())).encode()).hexdigest()[:16]
    _MEMO[str(root)] = (sig, digest)
    return digest


def dataset_digest(path: str | os.PathLike) -> str:
    """Short sha256 of a shard dataset's manifest, canonically: its format and schema version, stream, tasks
    (names, scorers, descriptions) and shards in order (task, split, rows, sha256). When, by which version and
    from where it was written are left out, so a dataset regenerated with the same rows keeps its digest."""
    from cl_service.data.shards import MANIFEST, ShardDataset

    # Job keys ask for it once per key (a sweep's cache: many times per job): memoised by the manifest's stat
    # for a local folder; a URI's manifest is read each time.
    local = "://" not in str(path)
    sig = None
    if local:
        try:
            st = os.stat(Path(path) / MANIFEST)
            sig = (st.st_size, st.st_mtime_ns, st.st_ino)
        except OSError:
            sig = None
    hit = _DS_MEMO.get(str(path))
    if sig is not None and hit is not None and hit[0] == sig:
        return hit[1]
    m = ShardDataset(path).manifest
    canon = {"format": m.get("format"), "schema_version": m.get("schema_version"), "stream": m.get("stream"),
             "tasks": m.get("tasks"),
             "shards": [[s["task"], s["split"], s["rows"], s["sha256"]] for s in m.get("shards", [])]}
    digest = hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    if sig is not None:
        _DS_MEMO[str(path)] = (sig, digest)
    return digest


def _files(root: Path) -> list[tuple[str, os.stat_result]]:
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or rel.as_posix() in _NOT_LOADED or not p.is_file():
            continue
        out.append((rel.as_posix(), p.stat()))
    return out


def digest_cache(path: str | os.PathLike) -> Path:
    """The file caching the checksums of the base folder at ``path``: ``$CLSVC_HOME/digests/<hash of path>.json``."""
    root = str(Path(path).resolve())
    return clsvc_home() / "digests" / (hashlib.sha256(root.encode()).hexdigest()[:16] + ".json")


def _read_cache(root: Path) -> dict[str, Any]:
    try:
        d = json.loads(digest_cache(root).read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(d, dict) and d.get("folder") == str(root) and isinstance(d.get("files"), dict)
    return d["files"] if ok else {}


def _write_cache(root: Path, entries: dict[str, list[Any]]) -> None:
    try:
        atomic_write_text(digest_cache(root), json.dumps({"folder": str(root), "files": entries}, indent=1,
                                                        sort_keys=True))
    except OSError:
        pass  # no writable home: the next process hashes the base again
