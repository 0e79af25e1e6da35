"""CUDA-graph decoding: the decode step of :meth:`MLLM.generate` captured once per shape and replayed.

A 7B decode step of one token per row is ~1,200 kernel launches from Python (32 layers of norms, projections,
LoRA updates, rotary embedding, attention, SwiGLU); on an H100/H200 the launches, not the GPU, set its time
(35-56 ms at batch 64, where weights and KV cache stream in ~8 ms; BENCHMARKS.md). Replaying a captured
graph launches them all at once (14 ms on an H200). What makes the step capturable (no host syncs, no data-dependent shapes or Python branches,
every tensor it reads at a fixed address):

- **Static KV cache.** One key and one value buffer per decoder layer, allocated once (zeroed) and grown when a
  larger shape is needed (which drops every graph). A batch of ``B`` rows, prompt length ``L`` and ``n`` new
  tokens uses the view ``[Bb, H_kv, Lb, D]``: ``Bb`` the batch bucket (:data:`BATCH_BUCKETS`) and ``Lb`` the
  length bucket (:func:`length_bucket`, at most 12.5% over ``L + n``). The prefill (eager, transformers) writes
  rows ``:B``, columns ``:L`` (:class:`cl_service.models.generate._GrowingLayer` with storage); step ``t`` writes
  column ``L + t``, scattered at a per-row device index (one column for all rows here; each row its own in
  continuous batching, :mod:`cl_service.engine.continuous`).
- **Attention over a fixed length.** Every step reads all ``Lb`` columns under a boolean mask kept in a static
  ``[Bb, Lb]`` buffer (the prompt's padding mask; the graph sets the new column). Columns not yet written are
  masked, and finite (the buffers start zeroed), so no ``0 * inf`` NaN leaks through the weighted sum. Padding
  rows ``B..Bb`` attend to column 0 only; their outputs are dropped.
- **Our loop over transformers' decoder layers** (embedding, rotary table, each ``LlamaDecoderLayer`` with a
  static cache object, final norm, ``lm_head``) instead of ``LlamaModel.forward``, whose mask building and
  cache bookkeeping use per-step Python ints and host syncs. The layers themselves are transformers' own (with
  the fused kernels, peft's wrappers and the multi-adapter hooks as they are).
- **Multi-adapter LoRA from static slot buffers.** During capture the hooks see a row plan with ``uniform=None``
  whose slot indices / one-hot rows live in static buffers (:meth:`MultiLoRA.plan_block`); each batch writes
  its rows' slots there. The stacked weights are read where the plan's ``stacks`` hold them, so a graph is
  captured per adapter-stack version: a load or drop rebuilds the stacks (a new object), the next batch
  captures anew and the graphs of the old stacks are dropped.

Graphs are captured lazily per ``(Bb, Lb, LoRA on)`` (and stacks), after two warm-up runs on a side stream
(the step is idempotent: a warm-up writes the same key/value column the real step writes), into one private
memory pool shared by all graphs. Graphs alias each other's scratch memory and the KV buffers, so one batch
at a time decodes through them (another thread's batch meanwhile decodes eagerly), and a step's logits, which
live in the pool, are read before the next replay. Anything unexpected (a capture that fails, an unsupported
model) falls back to eager decoding with the same results; on the CPU nothing here runs.

The numbers differ from eager decoding only in rounding: the attention kernel sees a longer, masked key
length, and the LoRA update of a single-adapter batch takes the all-slots path (exact zeros for the other
slots). ``tests/gpu/test_cuda_graphs.py`` checks greedy answers (identical in float32, a first difference in
bf16 only at a near-tie) and ``bench/serve.py --sections graphs`` times a step.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from cl_service.engine.multilora import MultiLoRA, RowPlan
from cl_service.models.generate import growing_cache
from cl_service.models.mllm import MLLM

#: Batch sizes a graph is captured for; a batch is padded with dummy rows up to the next one (beyond the last:
#: multiples of 64).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 96, 128)


def batch_bucket(b: int, buckets: tuple[int, ...] = BATCH_BUCKETS) -> int:
    """The smallest bucket that holds ``b`` rows."""
    for x in buckets:
        if b <= x:
            return x
    return -(-b // 64) * 64


def length_bucket(n: int) -> int:
    """Cache length for ``n`` positions: multiples of 64 up to 512, then eight steps per doubling (so at most
    12.5% more key/value columns are read than needed, with a handful of shapes per doubling)."""
    if n <= 512:
        return max(64, -(-n // 64) * 64)
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


def unsupported(mllm: MLLM) -> str | None:
    """Why the decode step of ``mllm`` cannot be captured here (None: it can)."""
    lm = getattr(getattr(mllm.model, "model", None), "language_model", None)
    if lm is None or not hasattr(lm, "layers") or not hasattr(mllm.model, "lm_head"):
        return "not a LLaVA with model.language_model and lm_head"
    kinds = {type(layer).__name__ for layer in lm.layers}
    if kinds != {"LlamaDecoderLayer"}:
        return f"decoder layers {sorted(kinds)}, not LlamaDecoderLayer"
    impl = getattr(lm.config, "_attn_implementation", None)
    if impl != "sdpa":
        return f"attention implementation {impl!r}, not 'sdpa' (the static mask is boolean)"
    rope = str(getattr(lm.rotary_emb, "rope_type", "default"))
    if "dynamic" in rope or "longrope" in rope:
        return f"rotary embedding {rope!r} recomputes its table from the positions (a host sync)"
    return None


def fill_onehot(plan: RowPlan) -> None:
    """Write the one-hot rows ``[Bb, 1, S*r]`` of a static row plan from its slot indices ``plan.idx``."""
    S = plan.onehot.shape[-1] // plan.rank
    plan.onehot.copy_(F.one_hot(plan.idx, S).to(plan.onehot.dtype).repeat_interleave(plan.rank, dim=1).unsqueeze(1))


class _StaticKV:
    """What the decoder layers see as ``past_key_values`` in a step: writes each row's new key/value at that
    row's device column ``col[b]`` of the static buffers and returns the whole buffers."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]], col: torch.Tensor) -> None:
        self.kv, self.col = kv, col
        self._where: torch.Tensor | None = None  # col broadcast to the keys' shape, made once per step

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v = self.kv[layer_idx]
        if self._where is None:
            self._where = self.col.view(-1, 1, 1, 1).expand_as(key_states)
        k.scatter_(2, self._where, key_states)
        v.scatter_(2, self._where, value_states)
        return k, v


@dataclass
class DecodeGraph:
    """One captured (or capturable) decode step and its static inputs."""
    Bb: int
    Lb: int
    kv: list[tuple[torch.Tensor, torch.Tensor]]   # per layer: [Bb, H_kv, Lb, D] views of the arena
    ids: torch.Tensor                             # [Bb, 1] this step's tokens
    pos: torch.Tensor                             # [Bb, 1] their positions
    col: torch.Tensor                             # [Bb] the cache column each row's token goes to
    mask: torch.Tensor                            # [Bb, Lb] bool, True = attend
    plan: RowPlan | None                            # static LoRA row plan (None: the plain base)
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None            # [Bb, V] the captured step's output (in the graph pool)


class _Session:
    """One batch decoding through a graph (see :class:`cl_service.models.generate.StepDecoder`)."""

    def __init__(self, decoder: "GraphDecoder", g: DecodeGraph, B: int, cache) -> None:
        self._decoder, self._g, self._B = decoder, g, B
        self.cache = cache

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, column: int) -> torch.Tensor | None:
        """Logits ``[B, V]`` after ``tokens`` ``[B]`` at ``positions`` ``[B, 1]``, written to cache ``column``
        (None: the graph could not be captured; only at a session's first step, where the caller decodes on
        eagerly on :attr:`cache`)."""
        return self._decoder._step(self._g, self._B, tokens, positions, column)


class GraphDecoder:
    """Decode steps of :meth:`MLLM.generate` as replayed CUDA graphs (pass as ``generate(..., decoder=)``).

    Args:
        mllm: the model (its text decoder must be transformers' Llama with SDPA attention; otherwise every
            batch declines and decodes eagerly, see :func:`unsupported`).
        multi: the stacked adapters whose per-row LoRA the decode applies (the active :meth:`MultiLoRA.rows`
            block of the calling thread); None: the plain base only.
        capture: False runs the same static-buffer step without capturing it (a CPU test of everything but
            the capture).
        max_graphs: graphs kept (least recently used dropped beyond).
        buckets: batch buckets (:data:`BATCH_BUCKETS`).
    """

    def __init__(self, mllm: MLLM, multi: MultiLoRA | None = None, capture: bool = True, max_graphs: int = 48,
                 buckets: tuple[int, ...] = BATCH_BUCKETS, warmup: int = 2) -> None:
        self.mllm, self.multi, self.capture = mllm, multi, capture
        self.max_graphs, self.buckets, self.warmup = max_graphs, tuple(buckets), warmup
        self.reason: str | None = unsupported(mllm)  # why batches decline (None: they do not)
        self.stats: Counter[str] = Counter()  # sessions, declined_*, captures, replays, eager_steps, arena_grown
        self._lock = threading.Lock()  # one batch decodes through the graphs at a time
        self._graphs: OrderedDict[tuple[int, int, bool], DecodeGraph] = OrderedDict()
        self._arena: torch.Tensor | None = None  # [layers, 2, numel] the static keys/values
        self._pool = None
        self._stream: torch.cuda.Stream | None = None

    # ------------------------------------------------------------------ public
    @contextlib.contextmanager
    def session(self, mask: torch.Tensor, max_new_tokens: int) -> Iterator[_Session | None]:
        """One batch (prompt attention mask ``mask`` ``[B, L]``): a session, or None when this batch decodes
        eagerly (another batch holds the graphs, the model or device is not supported, memory is short)."""
        s = self._open(mask, max_new_tokens)
        try:
            yield s
        finally:
            if s is not None:
                self._lock.release()

    def clear(self) -> None:
        """Drop every graph and the static KV buffers (their memory returns to PyTorch's cache)."""
        with self._lock:
            self._graphs.clear()
            self._arena = None

    @property
    def graphs(self) -> list[tuple[int, int, bool]]:
        """The ``(batch bucket, length bucket, LoRA)`` of every graph held."""
        return list(self._graphs)

    # ------------------------------------------------------------------ internals
    @property
    def _lm(self) -> torch.nn.Module:
        return self.mllm.model.model.language_model

    def _open(self, mask: torch.Tensor, max_new_tokens: int) -> _Session | None:
        if self.reason is not None:
            self.stats["declined_unsupported"] += 1
            return None
        if self.capture and mask.device.type != "cuda":
            self.stats["declined_not_cuda"] += 1
            return None
        if not self._lock.acquire(blocking=False):
            self.stats["declined_busy"] += 1
            return None
        try:
            B, L = mask.shape
            plan = self.multi.active_plan() if self.multi is not None else None
            if plan is not None and (plan.weights is not None or plan.fused):
                self.stats["declined_mixture"] += 1  # graphs replay one-hot rows only: a mixture decodes eagerly
                self._lock.release()
                return None
            lora = plan if (plan is not None and plan.stacks and plan.uniform != 0 and not plan.vision) else None
            if lora is not None and lora.idx.shape[0] != B:
                self.stats["declined_rows"] += 1  # a rows() block that is not this batch: leave it to eager
                self._lock.release()
                return None
            g = self._entry(batch_bucket(B, self.buckets), length_bucket(L + max_new_tokens), lora)
            cache = None if g is None else growing_cache(L + max_new_tokens, g.kv)
            if cache is None:  # no memory for the buffers, or a transformers whose cache we cannot back
                self.stats["declined_memory" if g is None else "declined_cache"] += 1
                self._lock.release()
                return None
            self._load(g, mask, lora)
            self.stats["sessions"] += 1
            return _Session(self, g, B, cache)
        except BaseException:
            self._lock.release()
            raise

    def _entry(self, Bb: int, Lb: int, lora: RowPlan | None) -> DecodeGraph | None:
        """The graph entry for this shape and these adapter stacks (a new one, not yet captured, if needed)."""
        stacks = lora.stacks if lora is not None else None
        if stacks is not None:  # adapters were loaded or dropped: graphs of the old stacks are stale
            for k in [k for k, g in self._graphs.items() if g.plan is not None and g.plan.stacks is not stacks]:
                del self._graphs[k]
        key = (Bb, Lb, lora is not None)
        g = self._graphs.get(key)
        if g is None:
            kv = self._views(Bb, Lb)
            if kv is None:
                return None
            dev = self.mllm.device
            plan = None
            if lora is not None:
                r = lora.rank
                S = next(iter(stacks.values()))[0].shape[0] // r
                plan = RowPlan(stacks=stacks, rank=r, vision=False, uniform=None,
                             idx=torch.zeros(Bb, dtype=torch.long, device=dev),
                             onehot=torch.zeros(Bb, 1, S * r, dtype=self.mllm.dtype, device=dev))
            g = DecodeGraph(Bb, Lb, kv, ids=torch.zeros(Bb, 1, dtype=torch.long, device=dev),
                       pos=torch.zeros(Bb, 1, dtype=torch.long, device=dev),
                       col=torch.zeros(Bb, dtype=torch.long, device=dev),
                       mask=torch.zeros(Bb, Lb, dtype=torch.bool, device=dev), plan=plan)
            self._graphs[key] = g
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        return g

    def _views(self, Bb: int, Lb: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per layer, the ``[Bb, H_kv, Lb, D]`` key and value views of the static buffers (grown as needed,
        which drops every graph; None when the memory is not there)."""
        need = self._numel(Bb, Lb)
        if self._arena is None or self._arena.shape[-1] < need:
            if self._arena is not None and self._arena.is_cuda:
                torch.cuda.synchronize(self._arena.device)  # other streams may have read it; then free it
            self._graphs.clear()
            self._arena = None
            self._arena = self._alloc(need)
            if self._arena is None:
                return None
            self.stats["arena_grown"] += 1
        return self._split(self._arena, Bb, Lb)

    def grown(self, Bb: int, Lb: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]] | None:
        """A new arena and its ``[Bb, H_kv, Lb, D]`` views, while the current arena and its graphs stay as they
        are (None when there is no memory for both at once). The caller copies what it keeps, then
        :meth:`adopt` switches to it."""
        arena = self._alloc(self._numel(Bb, Lb))
        return None if arena is None else (arena, self._split(arena, Bb, Lb))

    def adopt(self, arena: torch.Tensor) -> None:
        """Decode from ``arena`` (from :meth:`grown`) on; the graphs of the old one are dropped."""
        with self._lock:
            if self._arena is not None and self._arena.is_cuda:
                torch.cuda.synchronize(self._arena.device)  # other streams may have read it; then free it
            self._graphs.clear()
            self._arena = arena
            self.stats["arena_grown"] += 1

    def _numel(self, Bb: int, Lb: int) -> int:
        H, D = self._heads()
        return Bb * H * Lb * D

    def _heads(self) -> tuple[int, int]:
        """(key/value heads, head dim) of the decoder."""
        lm = self._lm
        return getattr(lm.config, "num_key_value_heads", None) or lm.config.num_attention_heads, \
            lm.layers[0].self_attn.head_dim

    def _alloc(self, numel: int) -> torch.Tensor | None:
        """Zeroed ``[layers, 2, numel]`` (finite: see the module doc), or None when the memory is not there."""
        shape = (len(self._lm.layers), 2, numel)
        try:
            return torch.zeros(shape, dtype=self.mllm.dtype, device=self.mllm.device)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            try:
                return torch.zeros(shape, dtype=self.mllm.dtype, device=self.mllm.device)
            except torch.OutOfMemoryError:
                return None

    def _split(self, a: torch.Tensor, Bb: int, Lb: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        H, D = self._heads()
        n = Bb * H * Lb * D
        return [(a[i, 0, :n].view(Bb, H, Lb, D), a[i, 1, :n].view(Bb, H, Lb, D)) for i in range(a.shape[0])]

    def _load(self, g: DecodeGraph, mask: torch.Tensor, lora: RowPlan | None) -> None:
        """Write a new batch's prompt mask and row slots into the static inputs (padding rows: column 0, base)."""
        B, L = mask.shape
        g.mask.zero_()
        g.mask[:B, :L] = mask != 0
        g.mask[B:, 0] = True
        g.ids.zero_()
        g.pos.zero_()
        if g.plan is not None:
            g.plan.idx.zero_()
            g.plan.idx[:B] = lora.idx
            fill_onehot(g.plan)

    def _step(self, g: DecodeGraph, B: int, tokens: torch.Tensor, positions: torch.Tensor, column: int
              ) -> torch.Tensor | None:
        g.ids[:B, 0] = tokens
        g.pos[:B] = positions
        g.col.fill_(column)
        if g.graph is None and self.capture:  # a new graph: captured at a session's first step
            try:
                self._capture(g)
            except Exception as e:  # noqa: BLE001 - stay correct: this batch and later ones decode eagerly
                self.reason = f"capture failed: {type(e).__name__}: {e}"[:400]
                warnings.warn(f"CUDA-graph decoding off: {self.reason}", RuntimeWarning, stacklevel=2)
                self._graphs.clear()
                return None  # transformers' own step goes on from the cache the prefill filled
        if g.graph is not None:
            g.graph.replay()
            self.stats["replays"] += 1
            return g.logits[:B]
        self.stats["eager_steps"] += 1
        return self._forward(g)[:B]

    def _capture(self, g: DecodeGraph) -> None:
        """Warm up on a side stream (with this step's real inputs: the step is idempotent), then capture."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.mllm.device)
            self._pool = torch.cuda.graph_pool_handle()
        s = self._stream
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(self.warmup):
                self._forward(g)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=s, capture_error_mode="thread_local"):
            out = self._forward(g)
        g.graph, g.logits = graph, out
        self.stats["captures"] += 1

    def _forward(self, g: DecodeGraph) -> torch.Tensor:
        """One decode step over the static buffers: logits ``[Bb, V]`` of the tokens in ``g.ids``."""
        lm = self._lm
        with self.multi.plan_block(g.plan) if g.plan is not None else contextlib.nullcontext():
            h = lm.embed_tokens(g.ids)
            pe = lm.rotary_emb(h, position_ids=g.pos)
            g.mask.scatter_(1, g.col[:, None], True)
            am = g.mask[:, None, None, :]
            kv = _StaticKV(g.kv, g.col)
            for layer in lm.layers:
                h = layer(h, attention_mask=am, position_embeddings=pe, position_ids=g.pos, past_key_values=kv,
                          use_cache=True)
                if isinstance(h, tuple):  # transformers 4 returned (hidden_states, ...)
                    h = h[0]
            return self.mllm.model.lm_head(lm.norm(h)[:, -1])
