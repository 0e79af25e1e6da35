"""Two-stage inference with the stages overlapped: route the next batch while the last one is answered.

Two-stage inference (route, then answer with the chosen expert) run one batch at a time leaves the
accelerator half used: the router's work is one long prefill (compute-bound), the expert's answer is a
prefill plus a decode loop (memory- and launch-bound), and the host prepares each batch (image decoding,
tokenising) while the device waits. :class:`Pipeline` runs stage one and stage two in two threads, each
on its own CUDA stream, so stage one of batch ``k+1`` runs next to stage two of batch ``k``. It is the
in-process counterpart of the Ray Serve app's Router and Expert replicas.

Requests are submitted one at a time (:meth:`Pipeline.submit` returns a future). The stage-one thread
gathers a batch whenever it is free: everything queued, up to ``max_batch``; a request that finds the
queue empty waits ``wait_s`` for company. At most ``depth`` routed batches wait for stage two; beyond
that stage one waits (back-pressure), so memory stays bounded. With ``merge``, stage two takes every
routed batch waiting when it becomes free (up to ``max_batch`` requests) and answers them as one: under
light load stage one routes small batches as they come, and stage two still runs full ones. A stage two that
returns a ``Future`` per request instead (rows handed to a
:class:`~cl_service.engine.continuous.ContinuousBatcher`) resolves each caller when its own row is answered,
and takes the next routed batch at once.

The stages must be safe to run in two threads at once. :class:`~cl_service.engine.engine.Engine`'s calls
are: the mixed paths (``route_mllm`` with ``vision_states``, ``answer_mixed``, ``features``) keep their per-row
adapter plans thread-local (:meth:`~cl_service.engine.multilora.MultiLoRA.rows`) and run side by side, adapter
loading is serialised, and a pass that switches the whole model (a peft adapter: ``route_mllm`` without
``vision_states`` and without ``fused_lora``; a MoE-LoRA) runs alone (:mod:`cl_service.engine.gate`), so the
other stage waits for it rather than overlapping.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Sequence

import torch

_STOP = object()


def _streams(device: Any, stage2_first: bool) -> tuple[Any, Any]:
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type != "cuda":
        return None, None
    # Lower number = higher priority: the GPU schedules stage two's blocks (the decode steps users wait
    # on) ahead of stage one's when both have work queued.
    return torch.cuda.Stream(dev, priority=0), torch.cuda.Stream(dev, priority=-1 if stage2_first else 0)


def _tensors(obj: Any):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


class Pipeline:
    """Stage one and stage two of a two-stage model in two threads (two CUDA streams on a GPU).

    Args:
        stage1: ``items -> mid``, run on a batch of submitted items (e.g. CLIP states + routes).
        stage2: ``(items, mid) -> results``, one result per item, in order (e.g. the experts' answers), or a
            ``Future`` per item that resolves to it.
        device: the model's device; on ``cuda`` each stage gets its own stream, and stage two waits
            for stage one's work on the batch (an event) before it starts.
        max_batch: most items per batch.
        wait_s: how long a request that finds stage one idle and the queue empty waits for company.
        depth: routed batches that may wait for stage two (default: 1, or ``max_batch`` with ``merge``).
        merge: ``[mid, ...] -> mid`` for batches stage two takes together (e.g. concatenate the CLIP
            states and the route lists); None = stage two answers each routed batch alone.
        stage2_first: on a GPU, stage two's stream gets the higher priority.
    """

    def __init__(self, stage1: Callable[[list], Any], stage2: Callable[[list, Any], Sequence[Any]], *,
                 device: Any = None, max_batch: int = 64, wait_s: float = 0.0, depth: int | None = None,
                 merge: Callable[[list], Any] | None = None, stage2_first: bool = True,
                 name: str = "clsvc-pipeline") -> None:
        if depth is None:
            depth = max_batch if merge is not None else 1
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.stage1, self.stage2, self.merge = stage1, stage2, merge
        self._held: Any = None  # a routed batch that did not fit the last merged one
        self.max_batch, self.wait_s = max_batch, wait_s
        self._in: queue.Queue = queue.Queue()
        self._mid: queue.Queue = queue.Queue(maxsize=depth)
        self._s1, self._s2 = _streams(device, stage2_first)
        self._closed = False
        self._lock = threading.Lock()
        #: (stage, start, end, batch size) per batch, ``time.perf_counter`` seconds
        self.log: list[tuple[int, float, float, int]] = []
        self._threads = [threading.Thread(target=self._run1, name=f"{name}-1", daemon=True),
                         threading.Thread(target=self._run2, name=f"{name}-2", daemon=True)]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ API
    def submit(self, item: Any) -> Future:
        """Queue one request; the future resolves to its stage-two result (or its batch's error)."""
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("pipeline is closed")
            self._in.put((item, fut))
        return fut

    def map(self, items: Sequence[Any], timeout_s: float) -> list[Any]:
        """Submit ``items`` and return their results in order; ``TimeoutError`` after ``timeout_s``."""
        futs = [self.submit(x) for x in items]
        deadline = time.monotonic() + timeout_s
        return [f.result(timeout=max(0.0, deadline - time.monotonic())) for f in futs]

    def close(self, timeout_s: float = 60.0) -> None:
        """Finish what was submitted, then stop both threads (bounded by ``timeout_s``)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._in.put(_STOP)
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            raise TimeoutError(f"pipeline threads did not stop within {timeout_s:.0f} s")

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ threads
    def _gather(self) -> tuple[list, list[Future], bool]:
        """The next batch: block for one request, then take what is queued (waiting ``wait_s`` when
        nothing else is). Returns (items, futures, stop)."""
        first = self._in.get()
        if first is _STOP:
            return [], [], True
        got = [first]
        stop = False
        deadline = time.monotonic() + self.wait_s
        while len(got) < self.max_batch:
            try:
                nxt = self._in.get_nowait() if self._in.qsize() or not self.wait_s else \
                    self._in.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if nxt is _STOP:
                stop = True
                break
            got.append(nxt)
        live = [(x, f) for x, f in got if f.set_running_or_notify_cancel()]  # cancelled callers are skipped
        return [x for x, _ in live], [f for _, f in live], stop

    def _run1(self) -> None:
        try:
            while True:
                items, futs, stop = self._gather()
                if items:
                    t0 = time.perf_counter()
                    try:
                        with _on(self._s1):
                            mid = self.stage1(items)
                            events = []
                            if self._s1 is not None:
                                ev = torch.cuda.Event()
                                ev.record(self._s1)
                                events.append(ev)
                    except BaseException as e:  # noqa: BLE001 - the callers get it
                        for f in futs:
                            f.set_exception(e)
                    else:
                        self.log.append((1, t0, time.perf_counter(), len(items)))
                        self._mid.put((items, futs, mid, events))
                if stop:
                    return
        finally:
            self._mid.put(_STOP)

    def _next2(self) -> Any:
        """The next work for stage two, ``(items, futures, [mid, ...], events)``: one routed batch, or with
        ``merge`` every one waiting (up to ``max_batch`` requests). ``_STOP`` when stage one has stopped
        and nothing is left."""
        job = self._held if self._held is not None else self._mid.get()
        self._held = None
        if job is _STOP:
            return job
        jobs = [job]
        n = len(job[0])
        while self.merge is not None and n < self.max_batch:
            try:
                nxt = self._mid.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP or n + len(nxt[0]) > self.max_batch:
                self._held = nxt
                break
            jobs.append(nxt)
            n += len(nxt[0])
        return ([x for j in jobs for x in j[0]], [f for j in jobs for f in j[1]], [j[2] for j in jobs],
                [ev for j in jobs for ev in j[3]])

    def _run2(self) -> None:
        while True:
            job = self._next2()
            if job is _STOP:
                return
            items, futs, mids, events = job
            t0 = time.perf_counter()
            try:
                with _on(self._s2):
                    if self._s2 is not None:
                        for ev in events:  # stage one's work on these batches is done before ours starts
                            self._s2.wait_event(ev)
                    mid = mids[0] if len(mids) == 1 else self.merge(mids)
                    if self._s2 is not None:
                        for t in _tensors(mid):
                            if t.is_cuda:
                                t.record_stream(self._s2)  # freed by this stream's work, not stage one's
                    out = list(self.stage2(items, mid))
                    if self._s2 is not None:
                        self._s2.synchronize()
                if len(out) != len(items):
                    raise RuntimeError(f"stage two returned {len(out)} results for {len(items)} requests")
            except BaseException as e:  # noqa: BLE001 - the callers get it
                for f in futs:
                    f.set_exception(e)
                continue
            self.log.append((2, t0, time.perf_counter(), len(items)))
            for f, r in zip(futs, out):
                if isinstance(r, Future):  # a row handed on (continuous batching): its caller waits for it alone
                    r.add_done_callback(lambda r, f=f: f.set_exception(r.exception()) if r.exception() is not None
                                        else f.set_result(r.result()))
                else:
                    f.set_result(r)


def _on(stream: Any):
    """``torch.cuda.stream(s)`` for a stream, nothing for None (CPU)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
