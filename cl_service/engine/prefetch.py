"""Cold adapters of a continuous batch: read and verified in a loader thread while the decode goes on.

A request whose adapter is neither on the device nor in host memory would make the batcher's worker read the
adapter's files and check their checksums (for a 7B expert, hundreds of megabytes) while every row decoding
waits. :class:`Prefetch` holds such a request back and hands its adapter to a loader thread
(:meth:`Engine.fetch_adapter`: into host memory); once it is read the request goes back to the batcher's
queue, in arrival order, and joins between two steps with a copy to the device; if it does not load, the
requests that need it fail with the reason.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


class Prefetch:
    """Requests waiting for their adapter's files (see the module doc).

    Args:
        engine: the :class:`~cl_service.engine.Engine` (``adapter_on_hand``, ``fetch_adapter``).
        cv: the batcher's condition; ``back`` is called holding it, and it is notified when a load ends.
        back: ``back(items)`` puts requests whose adapter was read back in the batcher's queue.
        fail: ``fail(items, error)`` ends requests whose adapter did not load (called without ``cv``).
        stats: where ``"fetches"`` (adapters handed to the loader) is counted.
    Requests are any objects with ``adapter`` (a folder or None) and ``fetched`` (set True once read).
    """

    def __init__(self, engine: Any, cv: threading.Condition, back: Callable[[list], None],
                 fail: Callable[[list, BaseException], None], stats: Counter, name: str) -> None:
        self.engine, self._cv, self._back, self._fail, self.stats = engine, cv, back, fail, stats
        self._cold: dict[str, list] = {}  # adapter folder -> requests waiting for it
        self._loader = ThreadPoolExecutor(1, thread_name_prefix=name)

    @property
    def waiting(self) -> int:
        """Requests held back (read under ``cv`` for an exact count)."""
        return sum(map(len, list(self._cold.values())))

    def hold(self, p: Any) -> bool:
        """True when ``p`` must wait for its adapter's files (handed to the loader now, or already loading)."""
        if p.fetched:  # read once already: if it left host memory meanwhile, the join reads it itself
            return False
        try:
            if self.engine.adapter_on_hand(p.adapter):
                return False
        except Exception:  # noqa: BLE001 - the loader reports what is wrong with this adapter
            pass
        with self._cv:
            group = self._cold.setdefault(p.adapter, [])
            group.append(p)
            if len(group) == 1:
                self.stats["fetches"] += 1
                self._loader.submit(self._fetch, p.adapter)
        return True

    def close(self) -> None:
        self._loader.shutdown(wait=False)

    def _fetch(self, adapter: str) -> None:
        err: BaseException | None = None
        try:
            self.engine.fetch_adapter(adapter)
        except BaseException as e:  # noqa: BLE001 - the requests that need it get it
            err = e
        with self._cv:
            group = self._cold.pop(adapter, [])
            if err is None:
                for p in group:
                    p.fetched = True
                self._back(group)
            self._cv.notify_all()
        if err is not None:
            self._fail(group, err)
