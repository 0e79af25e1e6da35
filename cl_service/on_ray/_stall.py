"""Stall detection: the driver gives up on remote work that has made no progress for ``ray.stall_timeout_s``.

Wall time cannot bound a training job or an evaluation (at 7B on the MLLM-CL release one takes hours); silence can.
The workers report progress (:class:`Beat`: an optimizer step, a resume point or an adapter stored, a forward
pass of an evaluator's base) to a small actor (:class:`Beats`), which times it on its own clock (nodes' clocks may
differ); the driver's wait asks it how long each piece of work has been silent (:class:`Watch`).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import ray

#: How often a worker reports at most (progress is cheap to tell, but a step may take milliseconds).
_EVERY_S = 1.0


@ray.remote(num_cpus=0)
class Beats:
    """When each watched piece of work (``tag``) last reported progress."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def beat(self, tag: str) -> None:
        self.last[tag] = time.monotonic()

    def quiet(self, tags: list[str]) -> dict[str, float | None]:
        """Seconds since each tag's last report (None: none yet)."""
        now = time.monotonic()
        return {t: (now - self.last[t]) if t in self.last else None for t in tags}


class Beat:
    """A worker's progress report for ``tag``: call it at every unit of progress (it sends at most one report a
    second, without waiting for an answer). Picklable; None as ``beats`` reports nothing."""

    def __init__(self, beats: Any, tag: str) -> None:
        self.beats, self.tag, self._sent = beats, tag, 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {"beats": self.beats, "tag": self.tag}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.beats, self.tag, self._sent = state["beats"], state["tag"], 0.0

    def __call__(self, *_: Any) -> None:
        now = time.monotonic()
        if self.beats is None or now - self._sent < _EVERY_S:
            return
        self._sent = now
        try:
            self.beats.beat.remote(self.tag)
        except Exception:  # noqa: BLE001  (the driver is gone: so is the wait that would read it)
            pass


class Watch:
    """The driver's side: :meth:`check` raises ``TimeoutError`` once a watched tag has been silent for
    ``stall_s`` seconds, counted from its last report or from when the watch began (:meth:`start`), whichever is
    later: work that never starts (a worker group that cannot be scheduled) is a stall too."""

    def __init__(self, beats: Any, stall_s: float, what: Callable[[str, float], str]) -> None:
        self.beats, self.stall_s, self.what = beats, float(stall_s), what
        self.started: dict[str, float] = {}

    def start(self, tag: str) -> None:
        """Begin (or begin again) watching ``tag``: silence counts from now."""
        self.started[tag] = time.monotonic()

    def stop(self, tag: str) -> None:
        self.started.pop(tag, None)

    def check(self) -> None:
        if not self.started:
            return
        quiet = ray.get(self.beats.quiet.remote(list(self.started)), timeout=60)
        now = time.monotonic()
        for tag, since in self.started.items():
            idle = now - since if quiet.get(tag) is None else min(quiet[tag], now - since)
            if idle > self.stall_s:
                raise TimeoutError(f"{self.what(tag, idle)}: no progress for {idle:.0f} s "
                                   f"(ray.stall_timeout_s={self.stall_s:.0f})")


__all__ = ["Beat", "Beats", "Watch"]
