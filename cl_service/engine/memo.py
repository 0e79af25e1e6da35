"""The evaluation memo: deterministic results (greedy answers, base features) kept per sample for the life of
an engine. A stream evaluation asks the same expert about the same test item at every stage (oracle, the
routed methods, zero-shot); greedy decoding makes the stored answer the one a fresh pass would give."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from pathlib import Path
from typing import Callable, Sequence

from cl_service.adapters.registry import ADAPTER_META, read_adapter
from cl_service.data.schema import Sample


class Memo:
    """Results under ``kind + (sample digest,)`` keys; off (``store`` None) until :meth:`enable`."""

    def __init__(self) -> None:
        self.store: dict | None = None
        self._local = threading.local()  # per thread: depth of off() blocks

    def enable(self) -> None:
        if self.store is None:
            self.store = {}

    @contextlib.contextmanager
    def off(self):
        """This thread's calls compute afresh inside the block; another thread's calls meanwhile still use the
        memo (a switch for every thread would be left off for good when two such blocks overlap)."""
        depth = getattr(self._local, "off", 0)
        self._local.off = depth + 1
        try:
            yield
        finally:
            self._local.off = depth

    def active(self) -> dict | None:
        """The store this thread's calls use (None: compute afresh)."""
        return None if getattr(self._local, "off", 0) else self.store

    def map(self, kind: tuple, samples: Sequence[Sample], compute: Callable[[list[Sample]], Sequence]) -> list:
        """One result per sample: stored ones as they are, the others from ``compute`` over those alone."""
        store = self.active()
        if store is None:
            return list(compute(list(samples)))
        keys = [kind + (_sample_digest(s),) for s in samples]
        todo = [i for i, k in enumerate(keys) if k not in store]
        if todo:
            for i, v in zip(todo, compute([samples[i] for i in todo])):
                store[keys[i]] = v
        return [store[k] for k in keys]


def content_digest(adapter: str | None) -> str:
    """The adapter's identity by content (its checksummed ``adapter.json``); "base" for no adapter."""
    if adapter is None:
        return "base"
    meta = Path(adapter) / ADAPTER_META
    if not meta.is_file():
        read_adapter(adapter)  # raises the registry's clear error
    return hashlib.sha256(meta.read_bytes()).hexdigest()


def _sample_digest(s: Sample) -> str:
    h = hashlib.sha256()
    for part in (s.id, s.question, *s.images):
        b = part.encode() if isinstance(part, str) else part
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()
