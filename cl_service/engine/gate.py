"""Passes over one model from several threads, when some of them switch state of the whole model.

Most engine passes leave the model as it is and keep their per-row adapter choice in thread-local state
(:meth:`~cl_service.engine.multilora.MultiLoRA.rows`): any number of threads may run them at once (a router
batch next to an expert batch, the decode steps of a continuous batch). A few switch something every thread
sees: peft's active adapter (``set_adapter``, loading or deleting a peft adapter) and MoE-LoRA's forward hooks.
peft's own "adapters off" switch (:meth:`MLLM.adapters_disabled`) is one of those too, but it is the state all
the shared passes want, and it is reference-counted, so shared passes keep it on together.

:class:`PassGate` makes the two kinds exclusive: a *shared* block runs with peft's adapters off, next to other
shared blocks; an *exclusive* block runs alone. An exclusive request waits for the open shared blocks to
close and holds new ones back meanwhile, so a stream of short shared blocks (decode steps) cannot starve it.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from typing import Callable, ContextManager, Iterator


class PassGate:
    """Shared and exclusive blocks of passes over one model (see the module doc).

    Args:
        off: a context manager factory that switches peft's adapters off for its block, reference-counted
            across threads (:meth:`MLLM.adapters_disabled`).
        timeout_s: the longest a block waits for the other kind to finish; beyond it ``TimeoutError`` (a
            pass stuck elsewhere, never a silent wait without bound).

    Reentrant per thread: a shared block inside a shared or an exclusive block of the same thread, and an
    exclusive inside an exclusive, go straight in. An exclusive block inside a shared block of the same thread
    would wait for itself: it raises ``RuntimeError`` instead.
    """

    def __init__(self, off: Callable[[], ContextManager], timeout_s: float = 1800.0) -> None:
        self._off = off
        self.timeout_s = timeout_s
        self._cv = threading.Condition()
        self._shared = 0                 # threads inside shared blocks
        self._owner: int | None = None   # the thread inside an exclusive block
        self._wanted = 0                 # exclusive requests waiting
        self._mine = threading.local()   # this thread's depths: .shared, .exclusive
        #: "shared", "exclusive": blocks entered (outermost only); "waited": entries that had to wait
        self.stats: Counter[str] = Counter()

    def _depths(self):
        me = self._mine
        if not hasattr(me, "shared"):
            me.shared = me.exclusive = 0
        return me

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """Passes that leave the model as it is, with peft's adapters off."""
        me = self._depths()
        if me.shared or me.exclusive:  # this thread is already in: waiting would wait for itself
            me.shared += 1
            try:
                with self._off():
                    yield
            finally:
                me.shared -= 1
            return
        with self._cv:
            self._wait(lambda: self._owner is None and not self._wanted)
            self._shared += 1
            self.stats["shared"] += 1
        me.shared = 1
        try:
            with self._off():
                yield
        finally:
            me.shared = 0
            with self._cv:
                self._shared -= 1
                if not self._shared:
                    self._cv.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Passes that may switch state of the whole model (peft's active adapter, MoE-LoRA hooks); alone."""
        me = self._depths()
        if me.exclusive:
            me.exclusive += 1
            try:
                yield
            finally:
                me.exclusive -= 1
            return
        if me.shared:
            raise RuntimeError("a pass that switches the whole model (a peft or MoE-LoRA adapter) cannot start "
                               "inside a shared pass of the same thread: it would wait for itself")
        with self._cv:
            self._wanted += 1
            try:
                self._wait(lambda: self._owner is None and not self._shared)
            finally:
                self._wanted -= 1
                self._cv.notify_all()  # shared blocks held back for this request may go if it gave up
            self._owner = threading.get_ident()
            self.stats["exclusive"] += 1
        me.exclusive = 1
        try:
            yield
        finally:
            me.exclusive = 0
            with self._cv:
                self._owner = None
                self._cv.notify_all()

    def _wait(self, ready: Callable[[], bool]) -> None:
        """Wait (holding ``_cv``) until ``ready()``, at most ``timeout_s``."""
        if ready():
            return
        self.stats["waited"] += 1
        if not self._cv.wait_for(ready, self.timeout_s):
            raise TimeoutError(f"waited {self.timeout_s:.0f} s for the model: a pass of the other kind (shared / "
                               "exclusive, cl_service.engine.gate) did not finish")
