"""Hot add: the catalog a server answers with, and the rule for swapping in what the run publishes next.

A poll first scans cheaply (``adapter.json`` files and the sizes/mtimes of the weight files, no checksums).
Only a change there verifies the checksums of everything (:meth:`Catalog.load`). An adapter that fails that
verification (a torn copy, a file replaced by hand) stays out of the served catalog and is verified again
when its files change or, at the latest, after a backoff (``retry_s``, doubling up to ``max_retry_s``), so a
transient failure is never remembered as "seen". Used by the plain gRPC servicer and the Ray Serve ingress.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from cl_service.serve.catalog import Catalog

log = logging.getLogger(__name__)


class CatalogWatch:
    """The current :class:`Catalog` of ``run_dir`` (``.catalog``; swapped by :meth:`poll`)."""

    def __init__(self, run_dir: str | Path, retry_s: float = 2.0, max_retry_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, method: str | None = None,
                 stage: int | None = None) -> None:
        self.run_dir, self.method, self.stage = Path(run_dir), method, stage
        self.retry_s, self.max_retry_s, self.clock = float(retry_s), float(max_retry_s), clock
        self.catalog = Catalog.load(self.run_dir, method=method, stage=stage)
        self.reloads = 0      # catalogs swapped in since start
        self.failures = 0     # verifications that left something out (or found nothing complete)
        self._lock = threading.Lock()
        self._seen = self.catalog.fingerprint  # the cheap fingerprint of the last scan that verified completely
        self._retry_at: float | None = None    # unverified content pending: when to verify it again
        self._backoff = self.retry_s
        if Catalog.load(self.run_dir, verify=False, method=method, stage=stage).fingerprint != self._seen:
            self._pending()

    @property
    def pending(self) -> bool:
        """Something published does not verify yet (it is retried)."""
        return self._retry_at is not None

    def _pending(self) -> None:
        self.failures += 1
        self._retry_at = self.clock() + self._backoff
        self._backoff = min(self._backoff * 2, self.max_retry_s)

    def poll(self) -> bool:
        """Swap in a new catalog if the run published anything that verifies; True when it changed.

        Raises :class:`~cl_service.adapters.registry.AdapterError` when nothing verifies at all (the
        current catalog stays, and it is retried like a partial failure)."""
        with self._lock:
            cheap = Catalog.load(self.run_dir, verify=False, method=self.method, stage=self.stage).fingerprint
            if cheap == self._seen and self._retry_at is None:
                return False
            if cheap == self._seen and self.clock() < self._retry_at:
                return False  # the same unverified content: wait for the backoff
            self._seen = cheap
            try:
                # checksums verified before anyone is routed to it
                new = Catalog.load(self.run_dir, method=self.method, stage=self.stage)
            except Exception:
                self._pending()
                raise
            if new.fingerprint == cheap:
                self._retry_at, self._backoff = None, self.retry_s
            else:  # something listed failed verification: not published now, verified again later
                self._pending()
                log.warning("hot add: an adapter under %s does not verify; retrying in %.0f s", self.run_dir,
                            self._retry_at - self.clock())
            if new.fingerprint == self.catalog.fingerprint:
                return False
            old, self.catalog = self.catalog, new  # one reference swap: requests in flight keep their snapshot
            self.reloads += 1
            log.info("catalog reloaded: experts %s -> %s, router %s (v%s) -> %s (v%s)",
                     [f"{e.task} v{e.version}" for e in old.experts], [f"{e.task} v{e.version}" for e in new.experts],
                     old.router_dir, old.router_version, new.router_dir, new.router_version)
            return True
