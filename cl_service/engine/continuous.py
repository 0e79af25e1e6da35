"""Continuous batching for stage two: requests join the running decode between steps.

Batch-at-a-time answering (:meth:`Engine.answer_mixed`) makes a request that arrives while a batch decodes
wait for that whole batch, then for its own; under light load a lone request waits for company, under heavy
load short answers wait for the longest one in their batch. :class:`ContinuousBatcher` keeps one running
decode instead:

- **Slots.** A fixed number of rows (``slots``), each with its own KV-cache row in static buffers of
  ``[slots, H_kv, Lb, D]`` per layer (the :class:`~cl_service.engine.cudagraphs.GraphDecoder` arena), its own
  cache column, position, adapter and answer length. A step decodes one token for every live row, in the
  smallest batch bucket that holds the highest live slot, as a replayed CUDA graph on a GPU (the captured step
  writes each row's key/value at that row's column) or the same static-buffer step run eagerly on the CPU.
- **Joining.** Between two steps, the requests waiting (oldest first, any mix of experts) are prefilled
  together through the stacked multi-adapter path (:class:`~cl_service.engine.multilora.MultiLoRA`: each row
  its expert's LoRA and projector, CLIP states given by stage one reused), their keys/values copied into free
  slots, and their first token taken from the prefill. They decode from the next step on.
- **Tokens as they come.** A request may pass ``on_token``: the worker calls it with each token id of that
  row as soon as it is decoded (the prefill's first token, then one per step; EOS included), before the future
  resolves, so a server can stream the answer. A callback that raises is logged and dropped, the row goes on.
- **Leaving.** A row that emits EOS or reaches its ``max_new_tokens`` resolves its future at once and frees its
  slot (and its hold on the adapter, :meth:`Engine.hold_adapters`); the next waiting request takes it.
- **Cold adapters.** A request whose adapter is neither on the device nor in host memory waits while a loader
  thread reads and verifies its files into host memory (:mod:`cl_service.engine.prefetch`); the rows decoding
  go on stepping meanwhile, and the request joins between two steps with a copy to the device.
- **Back-pressure.** At most ``max_queue`` requests wait to join; :meth:`submit` then raises
  :class:`QueueFull` (a server answers ``RESOURCE_EXHAUSTED``), or waits up to its ``timeout_s`` for room.
  Nothing waits without bound.
- **Failures.** Every request ends exactly once: its answer, or an error. A fault of the request's own fails
  it alone: its adapter does not load, its prefill fails, its tokens do not decode into text, or the
  key/value buffers cannot grow to hold its prompt and answer (:class:`KVCacheFull`, which like
  :class:`QueueFull` is a :class:`ResourceExhausted`: nothing of the request ran, it may be sent again later).
  Growing the buffers allocates the new ones next to the old, copies the live rows over and only then
  switches, so a failed growth leaves the rows decoding as they were. A decode step that fails fails the rows
  decoding at that moment (their cache is no longer known good) and the batcher starts over from empty
  buffers; requests still waiting are untouched and the next ones are answered.
- **Fairness.** Joining is first come, first served over all experts; no expert's rows can hold a slot longer
  than their own answer.

Answers equal :meth:`Engine.answer_mixed`'s for the same rows (the decode reads a longer, masked cache, so in
bf16 they may differ at a near-tie, as CUDA-graph decoding may). One worker thread owns the decoder (its own
arena and graphs, not the engine's) and, on a GPU, its own high-priority CUDA stream. Its passes are shared
passes of the engine's :class:`~cl_service.engine.gate.PassGate` (peft's adapters off), so they never run next
to a pass that switches the whole model (a peft router answered in another thread).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from cl_service.data.schema import Sample
from cl_service.engine.cudagraphs import GraphDecoder, DecodeGraph, batch_bucket, fill_onehot, length_bucket
from cl_service.engine.multilora import RowPlan
from cl_service.engine.prefetch import Prefetch
from cl_service.models.generate import growing_cache

__all__ = ["ContinuousBatcher", "KVCacheFull", "QueueFull", "ResourceExhausted"]

log = logging.getLogger(__name__)


class ResourceExhausted(RuntimeError):
    """Stage two has no room for this request now; nothing of it ran, so it may be sent again later (a server
    answers ``RESOURCE_EXHAUSTED``)."""


class QueueFull(ResourceExhausted):
    """Too many requests wait to join the running decode (:attr:`ContinuousBatcher.max_queue`)."""


class KVCacheFull(ResourceExhausted):
    """The key/value buffers could not grow to hold this request's prompt and answer (the device's memory is
    short); the rows decoding go on as they were."""


@dataclass
class _Pending:
    sample: Sample
    adapter: str | None
    max_new: int
    states: torch.Tensor | None    # the sample's CLIP states [n_img, k, d] (any device) or None
    ready: Any                     # a CUDA event the states' producer recorded, or None
    fut: Future
    t: float = field(default_factory=time.perf_counter)
    on_token: Callable[[int], None] | None = None
    fetched: bool = False          # its adapter went through the loader thread once


@dataclass
class _Row:
    fut: Future
    key: str | None
    max_new: int
    col: int                       # the cache column the next token's key/value go to
    pos: int                       # its position id
    tokens: list[int]
    on_token: Callable[[int], None] | None = None


class ContinuousBatcher:
    """Stage two of two-stage inference with continuous batching (see the module doc).

    Args:
        engine: the :class:`~cl_service.engine.Engine` whose base, stacked adapters and tokenizer answer.
        slots: rows decoding at once (the arena holds this many, rounded up to a batch bucket).
        max_queue: requests that may wait to join (those whose adapter is loading included); beyond it
            :meth:`submit` raises :class:`QueueFull`.
        max_prefill: most requests joining in one prefill (default: ``slots``); a smaller value shortens the
            pause a large join puts on the rows decoding.
        max_new_tokens: a request's answer length when it names none (default: the engine's).
        capture: replay captured CUDA graphs on a GPU (default: the engine's ``cuda_graphs`` setting); the CPU
            always runs the same step eagerly.
        wait_s: when nothing decodes, how long the first request waits for company before it is prefilled
            (a request arriving while rows decode joins at the next step without waiting).
        stream: the CUDA stream the worker runs on (default: a new one at high priority).
    """

    def __init__(self, engine: Any, slots: int = 64, max_queue: int = 256, max_prefill: int | None = None,
                 max_new_tokens: int | None = None, capture: bool | None = None, wait_s: float = 0.0,
                 stream: Any = None, name: str = "clsvc-continuous") -> None:
        if slots < 1 or max_queue < 1 or (max_prefill is not None and max_prefill < 1):
            raise ValueError(f"slots, max_queue and max_prefill must be >= 1 (got {slots}, {max_queue}, {max_prefill})")
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s}")
        self.wait_s = float(wait_s)
        self.engine, self.mllm = engine, engine.mllm
        self.slots, self.max_queue = int(slots), int(max_queue)
        self.max_prefill = int(max_prefill or slots)
        self.max_new_tokens = int(max_new_tokens or engine.max_new_tokens)
        cuda = self.mllm.device.type == "cuda"
        if capture is None:
            capture = bool(engine.cuda_graphs)
        self.dec = GraphDecoder(self.mllm, engine.multi, capture=bool(capture) and cuda)
        if self.dec.reason is not None:
            raise ValueError(f"continuous batching is not available for this base: {self.dec.reason}")
        self.cap = batch_bucket(self.slots, self.dec.buckets)
        #: "submitted", "prefills", "joined", "steps", "finished", "failed", "cancelled", "queue_full",
        #: "kv_full", "fetches", "arena_grown", "max_live"; every submitted request ends as exactly one of
        #: finished, failed, cancelled
        self.stats: Counter[str] = Counter()
        #: ``(kind, start, end, rows)`` of the last 2000 prefills ("prefill") and steps ("step"), perf_counter s
        self.log: deque[tuple[str, float, float, int]] = deque(maxlen=2000)
        self._queue: deque[_Pending] = deque()
        self._cv = threading.Condition()
        self._cold = Prefetch(engine, self._cv, self._requeue, self._fail_fetch, self.stats, f"{name}-load")
        self._closed = False
        self._rows: dict[int, _Row] = {}            # slot -> row
        self._Lb = 0                                 # cache length of the arena (0: none yet)
        self._views: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # [cap, H, Lb, D] per layer
        self._mask: torch.Tensor | None = None       # [cap, Lb] bool: the master attention mask
        self._idx = torch.zeros(self.cap, dtype=torch.long, device=self.mllm.device)  # slot -> adapter stack slot
        self._stacks: Any = None                     # the adapter stacks _idx refers to
        self._slots: dict[str, int] = {}             # and their adapter slots
        self._synced: DecodeGraph | None = None           # the graph whose buffers hold the live mask (else _mask)
        self._stream = (stream if stream is not None else torch.cuda.Stream(self.mllm.device, priority=-1)) if cuda \
            else None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API
    @property
    def queued(self) -> int:
        """Requests waiting to join (those whose adapter is loading included)."""
        return len(self._queue) + self._cold.waiting

    @property
    def live(self) -> int:
        return len(self._rows)

    def submit(self, sample: Sample, adapter: str | None, max_new_tokens: int | None = None,
               vision_states: torch.Tensor | None = None, timeout_s: float | None = None,
               on_token: Callable[[int], None] | None = None) -> Future:
        """Queue one request: its answer from base + ``adapter`` (a folder; None = the plain base), as a future.

        ``vision_states``: the sample's CLIP states ``[n_img, k, d]`` from stage one (CPU or this device), so the
        prefill skips the CLIP pass. ``on_token(token_id)``: called from the worker thread with each token of this
        row as it is decoded (EOS included), before the future resolves. A full queue raises :class:`QueueFull`
        at once, or after waiting up to ``timeout_s`` for room. The future resolves exactly once: to the answer,
        or to the request's error (:class:`KVCacheFull` when the key/value buffers cannot grow to hold it; see
        the module doc)."""
        ready = None
        if vision_states is not None and vision_states.is_cuda:  # stage one's stream may still be writing it
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(vision_states.device))
        item = _Pending(sample, adapter, int(max_new_tokens or self.max_new_tokens), vision_states, ready, Future(),
                        on_token=on_token)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cv:
            while self.queued >= self.max_queue and not self._closed:
                left = 0.0 if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    self.stats["queue_full"] += 1
                    raise QueueFull(f"{self.queued} requests already wait for stage two (max_queue="
                                    f"{self.max_queue}); retry later")
                self._cv.wait(left)
            if self._closed:
                raise RuntimeError("continuous batcher is closed")
            self._queue.append(item)
            self.stats["submitted"] += 1
            self._cv.notify_all()
        return item.fut

    def close(self, timeout_s: float = 60.0) -> None:
        """Finish what was submitted, then stop the worker (bounded by ``timeout_s``)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"continuous batcher did not finish within {timeout_s:.0f} s")
        self._cold.close()

    def __enter__(self) -> "ContinuousBatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ worker
    def _loop(self) -> None:
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            while True:
                with self._cv:
                    while not self._queue and not self._rows:
                        if self._closed and not self._cold.waiting:
                            return
                        self._cv.wait()
                    if not self._rows and self.wait_s > 0:  # idle: the first request waits a little for company
                        deadline = self._queue[0].t + self.wait_s
                        while (len(self._queue) < min(self.slots, self.max_prefill) and not self._closed
                               and time.perf_counter() < deadline):
                            self._cv.wait(max(0.0, deadline - time.perf_counter()))
                    free = self.slots - len(self._rows)
                    n = min(free, self.max_prefill, self.engine.batch_size, len(self._queue))
                    take = [self._queue.popleft() for _ in range(n)]
                    if take:
                        self._cv.notify_all()  # room in the queue
                take = [p for p in take if not self._cold.hold(p)]  # cold adapters: they join once read
                take = [p for p in take if self._start(p)]  # callers that gave up: skipped
                try:
                    if take:
                        self._join(take)
                    if self._rows:
                        self._step()
                except BaseException as e:  # noqa: BLE001 - the rows in flight get it; the worker goes on
                    self._fail_all(e)
                    self._fail(take, e)  # those not yet rows (each future resolves once: done ones are skipped)

    def _start(self, p: _Pending) -> bool:
        if p.fut.set_running_or_notify_cancel():
            return True
        self.stats["cancelled"] += 1
        return False

    def _requeue(self, items: list[_Pending]) -> None:
        """Requests whose adapter the loader read: back in the queue, in arrival order (holding ``_cv``)."""
        self._queue = deque(sorted([*items, *self._queue], key=lambda p: p.t))

    def _fail_fetch(self, items: list[_Pending], e: BaseException) -> None:
        self._fail([p for p in items if self._start(p)], e)

    @torch.no_grad()
    def _join(self, take: list[_Pending]) -> None:
        """Prefill ``take`` together (one by one when that fails, so a bad row fails alone) into free slots."""
        try:
            self._prefill_into_slots(take)
        except Exception as e:  # noqa: BLE001
            if len(take) == 1:
                self._fail(take, _exhausted(e))
                return
            for p in take:
                try:
                    self._prefill_into_slots([p])
                except Exception as e1:  # noqa: BLE001 - this row's own error
                    self._fail([p], _exhausted(e1))

    def _prefill_into_slots(self, take: list[_Pending]) -> None:
        """Everything that can fail comes before the rows are inserted: on an error nothing of ``take`` is
        live and the live rows are as they were."""
        eng, mllm = self.engine, self.mllm
        t0 = time.perf_counter()
        keys = eng.hold_adapters([p.adapter for p in take])  # a missing or broken adapter raises here
        try:
            samples = [p.sample for p in take]
            states = None
            if all(p.states is not None for p in take):
                for p in take:
                    if p.ready is not None:
                        torch.cuda.current_stream().wait_event(p.ready)
                states = torch.cat([p.states.to(mllm.device, non_blocking=True) for p in take])
            chunk, ck, feats = next(eng._mixed_chunks(samples, keys, states))
            if len(chunk) != len(take):
                raise RuntimeError(f"engine batch_size {eng.batch_size} is below the join of {len(take)}")
            batch = mllm.collate(chunk, train=False, pixels=not torch.is_tensor(feats))
            mask = batch["attention_mask"].to(mllm.device)
            L = mask.shape[1]
            self._ensure_arena(L + max(p.max_new for p in take))  # room first: a full cache costs no prefill
            with eng.base_passes(), eng.multi.rows(ck):
                res = mllm.model(inputs_embeds=mllm.embed(batch, image_features=feats), attention_mask=mask,
                                 position_ids=batch["position_ids"].to(mllm.device), use_cache=True,
                                 logits_to_keep=1, past_key_values=growing_cache(L))
            first = res.logits[:, -1].argmax(-1).tolist()  # also waits for the prefill (the states may go)
            kv = [(layer.keys, layer.values) for layer in res.past_key_values.layers]
            self._remap()  # the stacks this join's loads rebuilt; the live rows' slots follow them
            idx = [self._slots[k] if k is not None else 0 for k in keys]
            free = [s for s in range(self.slots) if s not in self._rows][:len(take)]
            at = torch.tensor(free, device=mllm.device)
            self._flush()
            for (k, v), (K, V) in zip(self._views, kv):
                k[:, :, :L].index_copy_(0, at, K)
                v[:, :, :L].index_copy_(0, at, V)
            self._mask[at] = False
            self._mask[at, :L] = mask.bool()
            self._idx[at] = torch.tensor(idx, device=mllm.device)
            n_real = mask.sum(1).tolist()
        except BaseException:
            eng.release_adapters(keys)
            raise
        for p, key, s, tok, n in zip(take, keys, free, first, n_real):
            self._rows[s] = _Row(p.fut, key, p.max_new, col=L, pos=int(n), tokens=[tok], on_token=p.on_token)
        for s in free:
            self._emit(self._rows[s])
            self._check_done(s)
        self.stats["prefills"] += 1
        self.stats["joined"] += len(take)
        self.stats["max_live"] = max(self.stats["max_live"], len(self._rows))
        self.log.append(("prefill", t0, time.perf_counter(), len(take)))

    @torch.no_grad()
    def _step(self) -> None:
        t0 = time.perf_counter()
        stacks, rank = self._remap()
        if not self._rows:  # the remap failed the last rows (their adapter left)
            return
        Bb = batch_bucket(max(self._rows) + 1, self.dec.buckets)
        lora = RowPlan(stacks=stacks, rank=rank, vision=False, idx=self._idx, uniform=None) if stacks else None
        g = self.dec._entry(Bb, self._Lb, lora)
        if g is None:
            raise torch.OutOfMemoryError("no memory for the continuous batch's decode buffers")
        if self._synced is not g:
            self._flush()
            g.mask.copy_(self._mask[:Bb])
            if g.plan is not None:
                g.plan.idx.copy_(self._idx[:Bb])
                fill_onehot(g.plan)
            self._synced = g
        ids, pos, col = [0] * Bb, [0] * Bb, [0] * Bb  # free slots: token 0 at column 0, ignored
        for s, r in self._rows.items():
            ids[s], pos[s], col[s] = r.tokens[-1], r.pos, r.col
        dev = torch.tensor([ids, pos, col], dtype=torch.long).to(self.mllm.device)
        g.ids[:, 0].copy_(dev[0])
        g.pos[:, 0].copy_(dev[1])
        g.col.copy_(dev[2])
        with self.engine.base_passes():
            if self.dec.capture and g.graph is None and self.dec.reason is None:
                try:
                    self.dec._capture(g)
                except Exception as e:  # noqa: BLE001 - stay correct: decode on eagerly
                    self.dec.reason = f"capture failed: {type(e).__name__}: {e}"[:400]
                    self.dec.capture = False
            if g.graph is not None and self.dec.capture:
                g.graph.replay()
                self.dec.stats["replays"] += 1
                logits = g.logits
            else:
                self.dec.stats["eager_steps"] += 1
                logits = self.dec._forward(g)
            nxt = logits[:Bb].argmax(-1).tolist()
        self.stats["steps"] += 1
        rows = len(self._rows)
        for s in list(self._rows):
            r = self._rows[s]
            r.tokens.append(nxt[s])
            r.col += 1
            r.pos += 1
            self._emit(r)
            self._check_done(s)
        self.log.append(("step", t0, time.perf_counter(), rows))

    # ------------------------------------------------------------------ rows and buffers
    @staticmethod
    def _emit(r: _Row) -> None:
        """The row's newest token to its ``on_token``; a callback that fails is dropped, not the decode."""
        if r.on_token is None:
            return
        try:
            r.on_token(r.tokens[-1])
        except Exception:  # noqa: BLE001 - the caller's bug must not fail the rows decoding with it
            log.exception("on_token callback failed; no more tokens are sent to it")
            r.on_token = None

    def _check_done(self, s: int) -> None:
        """Row ``s`` leaves when it emitted EOS or its last token; its future gets its text, or the error of
        decoding it (that row alone)."""
        r = self._rows[s]
        eos = self.mllm.eos_id
        if r.tokens[-1] != eos and len(r.tokens) < r.max_new:
            return
        self._free(s)
        row = r.tokens[: r.tokens.index(eos)] if eos in r.tokens else r.tokens
        try:
            text = self.mllm.tokenizer.decode(row, skip_special_tokens=True).strip()
        except Exception as e:  # noqa: BLE001
            self._resolve(r.fut, error=RuntimeError(f"the answer's {len(row)} tokens did not decode into text: "
                                                     f"{type(e).__name__}: {e}"))
            return
        self._resolve(r.fut, text)

    def _free(self, s: int) -> None:
        r = self._rows.pop(s)
        self.engine.release_adapters([r.key])
        self._flush()
        self._mask[s] = False
        self._mask[s, 0] = True  # a free slot attends its column 0 (finite, ignored): no empty softmax
        self._idx[s] = 0

    def _resolve(self, fut: Future, result: Any = None, error: BaseException | None = None) -> None:
        """Settle ``fut`` once; a future already settled is left as it is."""
        try:
            if error is None:
                fut.set_result(result)
            else:
                fut.set_exception(error)
        except InvalidStateError:
            return
        self.stats["finished" if error is None else "failed"] += 1

    def _flush(self) -> None:
        """Bring the master mask up to date with the graph buffers the last steps wrote, and mark every
        graph's buffers stale (the next step loads them from the master)."""
        g, self._synced = self._synced, None
        if g is not None and self._mask is not None and g.Lb == self._Lb:
            self._mask[:g.Bb].copy_(g.mask)

    def _ensure_arena(self, need: int) -> None:
        """Static buffers whose cache length holds ``need`` positions, or :class:`KVCacheFull` with nothing
        changed. With rows live, the new buffers are allocated next to the old, the rows' keys, values and
        mask copied over, and only then switched to; with none, an arena more than twice too long shrinks."""
        Lb = length_bucket(need)
        if self._views is not None and Lb <= self._Lb and (self._rows or 2 * Lb > self._Lb):
            return
        try:
            mask = torch.zeros(self.cap, Lb, dtype=torch.bool, device=self.mllm.device)
        except torch.OutOfMemoryError:
            mask = None
        if not self._rows:  # nothing to keep: the old buffers go first, leaving room for the new
            self._views, self._mask, self._Lb, self._synced = None, None, 0, None
            self.dec.clear()
            views = None if mask is None else self.dec._views(self.cap, Lb)
            if views is None:
                self._cache_full(Lb)
            mask[:, 0] = True  # every slot is free: it attends its column 0 (see _free)
        else:
            got = None if mask is None else self.dec.grown(self.cap, Lb)
            if got is None:
                self._cache_full(Lb)
            arena, views = got
            self._flush()
            old_L = self._Lb
            for (k, v), (K, V) in zip(views, self._views):
                k[:, :, :old_L].copy_(K)
                v[:, :, :old_L].copy_(V)
            mask[:, :old_L] = self._mask
            self.dec.adopt(arena)
        self._views, self._mask, self._Lb, self._synced = views, mask, Lb, None
        self.stats["arena_grown"] += 1

    def _cache_full(self, Lb: int) -> None:
        self.stats["kv_full"] += 1
        raise KVCacheFull(f"no device memory for key/value buffers of {self.cap} rows x {Lb} positions, which this "
                          f"request's prompt and answer need ({len(self._rows)} rows decoding in {self._Lb} "
                          "positions go on); retry later or with a shorter question or answer")

    def _remap(self) -> tuple[dict, int]:
        """Adapters loaded or dropped since the last call rebuild the stacks (slot numbers may move): point each
        live row at its adapter's slot in the new stacks; a row whose adapter is gone (its files changed,
        :meth:`Engine.forget_missing`) fails alone. Returns the current ``(stacks, rank)``."""
        stacks, slots, rank = self.engine.multi._build()
        if stacks is not self._stacks:
            for s in [s for s, r in self._rows.items() if r.key is not None and r.key not in slots]:
                key = self._rows[s].key
                fut = self._rows[s].fut
                self._free(s)
                self._resolve(fut, error=RuntimeError(f"adapter {key} left the device while its row decoded "
                                                      "(its files changed?)"))
            self._flush()
            live = sorted(self._rows)
            if live:
                self._idx[torch.tensor(live, device=self._idx.device)] = torch.tensor(
                    [slots[self._rows[s].key] if self._rows[s].key is not None else 0 for s in live],
                    device=self._idx.device)
            self._stacks, self._slots = stacks, slots
        return stacks, rank

    def _fail(self, items: list[_Pending], e: BaseException) -> None:
        for p in items:
            self._resolve(p.fut, error=e)

    def _fail_all(self, e: BaseException) -> None:
        """A step failed: every live row gets the error, and the decoder starts over from empty buffers."""
        rows, self._rows = list(self._rows.values()), {}
        for r in rows:
            self.engine.release_adapters([r.key])
            self._resolve(r.fut, error=e)
        self.dec.clear()
        self._views, self._mask, self._Lb, self._synced, self._stacks = None, None, 0, None, None
        self._idx.zero_()


def _exhausted(e: BaseException) -> BaseException:
    """A request's prefill that ran out of device memory: :class:`ResourceExhausted` (nothing of it stays, it
    may be sent again later); any other error as it is."""
    if isinstance(e, torch.OutOfMemoryError):
        err = ResourceExhausted(f"no device memory for this request's prefill now; retry later ({e})"[:600])
        err.__cause__ = e
        return err
    return e
