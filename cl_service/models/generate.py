"""Greedy generation for :meth:`MLLM.generate <cl_service.models.mllm.MLLM.generate>`: batched, left-padded,
with a KV cache that lives in buffers sized for the whole answer (:class:`_GrowingLayer`), and optionally a
:class:`StepDecoder` (:class:`cl_service.engine.cudagraphs.GraphDecoder`: replayed CUDA graphs) running the
decode steps."""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from cl_service.data.schema import Sample

if TYPE_CHECKING:
    from cl_service.models.mllm import MLLM, ImageFeatures

__all__ = ["StepDecoder", "generate"]


class StepDecoder(Protocol):
    """Runs the decode steps of :meth:`MLLM.generate` (:class:`cl_service.engine.cudagraphs.GraphDecoder`).

    ``session(mask, max_new_tokens)`` is a context manager for one batch (``mask``: the prompt's attention mask
    ``[B, L]``) that yields None (decode as usual) or an object with ``cache`` (the ``past_key_values`` the
    prefill fills) and ``step(tokens [B], positions [B, 1], column) -> logits [B, V]``, valid until the next step;
    a first step may return None instead (the decoder gave up): the batch then decodes as usual on ``cache``.
    """

    def session(self, mask: torch.Tensor, max_new_tokens: int) -> contextlib.AbstractContextManager: ...


@torch.no_grad()
def generate(mllm: "MLLM", samples: Sequence[Sample], max_new_tokens: int = 16, batch_size: int = 64,
             vision_states: torch.Tensor | None = None, image_features: "ImageFeatures | None" = None,
             decoder: StepDecoder | None = None, on_token: Callable[[int, int], None] | None = None,
             prefix_rows: torch.Tensor | None = None) -> list[str]:
    """Greedy answers of ``mllm``, one string per sample: :meth:`MLLM.generate` (which documents the
    arguments). The model runs in eval mode and gets its training mode back."""
    was_training = mllm.model.training
    mllm.model.eval()
    try:
        out: list[str] = []
        if (vision_states is not None or torch.is_tensor(image_features)) and len(samples) > batch_size:
            raise ValueError("precomputed vision_states/image_features need batch_size >= len(samples)")
        if prefix_rows is not None and prefix_rows.shape[0] != len(samples):
            raise ValueError(f"prefix_rows has {prefix_rows.shape[0]} rows for {len(samples)} samples")
        for i in range(0, len(samples), batch_size):
            row = (lambda r, t, i=i: on_token(i + r, t)) if on_token is not None else None
            rows = prefix_rows[i:i + batch_size] if prefix_rows is not None else None
            out += _generate(mllm, samples[i:i + batch_size], max_new_tokens, vision_states, image_features,
                             decoder, row, rows)
        return out
    finally:
        mllm.model.train(was_training)


def _generate(mllm: "MLLM", samples: Sequence[Sample], max_new_tokens: int, vision_states, image_features=None,
              decoder: StepDecoder | None = None, on_token: Callable[[int, int], None] | None = None,
              rows: torch.Tensor | None = None) -> list[str]:
    """One batch: prefill, then one token per step until every row has its EOS or ``max_new_tokens``;
    ``on_token(row, token)`` for each row's token of a step while the row is not done (its EOS included).
    ``rows``: soft prompt rows per sample, inserted after BOS (:meth:`MLLM.inputs`)."""
    need_pixels = vision_states is None and not torch.is_tensor(image_features)
    batch = mllm.collate(samples, train=False, pixels=need_pixels)
    x = mllm.inputs(batch, vision_states, image_features, rows)  # the prompt as the decoder sees it
    mask, pos = x["attention_mask"], x["position_ids"]
    use_cache = max_new_tokens > 1  # one token (the router's letter) needs no KV cache: ~27 GB at 7B x 64
    with (decoder.session(mask, max_new_tokens) if decoder is not None and use_cache
          else contextlib.nullcontext()) as fast:
        if fast is not None:  # the prefill writes the KV cache into the decoder's static buffers
            cache = fast.cache
        else:
            cache = growing_cache(mask.shape[1] + max_new_tokens) if mllm.preallocate_kv and use_cache else None
        res = mllm.model(inputs_embeds=x["inputs_embeds"], attention_mask=mask, position_ids=pos, use_cache=use_cache,
                         logits_to_keep=1, past_key_values=cache)
        logits = res.logits[:, -1]
        B = len(samples)
        done = torch.zeros(B, dtype=torch.bool, device=mllm.device)
        tokens: list[torch.Tensor] = []
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, mllm.pad_id), nxt)
            tokens.append(nxt)
            if on_token is not None:  # one host sync per step, only when someone listens
                for r, (t, finished) in enumerate(zip(nxt.tolist(), done.tolist())):
                    if not finished:
                        on_token(r, t)
            done |= nxt == mllm.eos_id
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            pos = pos[:, -1:] + 1
            if fast is not None:  # the new token's key/value go to cache column prompt length + step
                logits = fast.step(nxt, pos, mask.shape[1] + step)
                if logits is not None:
                    continue
                fast = None  # it gave up at its first step: decode on as usual, on the cache it filled
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=mask.device)], dim=1)
            res = mllm.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                             past_key_values=res.past_key_values, use_cache=True)
            logits = res.logits[:, -1]
    gen = torch.stack(tokens, dim=1).tolist()
    texts = []
    for row in gen:
        if mllm.eos_id in row:
            row = row[: row.index(mllm.eos_id)]
        texts.append(mllm.tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


class _GrowingLayer(DynamicLayer):
    """A KV-cache layer whose keys/values live in one buffer sized for the whole generation: a new token
    writes one slot, where ``DynamicLayer`` concatenates (copies the whole cache) every step.

    ``storage``: buffers ``(keys, values)`` ``[B_max, H, L_max, D]`` to use instead (the first ``B`` rows), e.g.
    the static cache that a captured decode step reads."""

    def __init__(self, capacity: int, storage: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.capacity = capacity
        self._storage = storage
        self._n = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        if not self.is_initialized:
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
            B, H, _, D = key_states.shape
            size = max(self.capacity, n)
            if self._storage is not None:
                k, v = self._storage
                if (k.shape[0] < B or k.shape[1] != H or k.shape[2] < size or k.shape[3] != D or v.shape != k.shape
                        or k.dtype != key_states.dtype or k.device != key_states.device):
                    raise ValueError(f"KV storage {tuple(k.shape)} {k.dtype} does not hold keys "
                                     f"{tuple(key_states.shape)} {key_states.dtype} for {size} positions")
                self._k, self._v = k[:B], v[:B]
            else:
                self._k = key_states.new_empty(B, H, size, D)
                self._v = value_states.new_empty(B, H, size, value_states.shape[-1])
        if self._n + n > self._k.shape[-2]:  # longer than planned: grow (copy) once
            grow = lambda t: torch.cat([t, t.new_empty(*t.shape[:2], self._n + n, t.shape[-1])], dim=-2)  # noqa: E731
            self._k, self._v = grow(self._k), grow(self._v)
        self._k[:, :, self._n:self._n + n] = key_states
        self._v[:, :, self._n:self._n + n] = value_states
        self._n += n
        self.keys, self.values = self._k[:, :, :self._n], self._v[:, :, :self._n]
        return self.keys, self.values


def growing_cache(capacity: int, storage: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None
                   ) -> DynamicCache | None:
    """A ``DynamicCache`` of :class:`_GrowingLayer` (None, i.e. the model's default, if this transformers
    version builds its cache layers differently). ``storage``: per decoder layer, the buffers its layer uses."""
    cache = DynamicCache()
    if getattr(cache, "layer_class_to_replicate", None) is not DynamicLayer:
        return None
    if storage is None:
        cache.layer_class_to_replicate = functools.partial(_GrowingLayer, capacity)
    else:
        layers = iter(storage)  # the cache creates its layers in layer order
        cache.layer_class_to_replicate = lambda: _GrowingLayer(capacity, next(layers))
    return cache
