"""Answers from soft mixtures of LoRA adapters, a weight vector per row (HiDe-LLaVA, DISCO).

A :class:`Mixture` says how one row is answered: adapters ``A_t, B_t`` (peft LoRA folders), the row's weight ``w_t``
of each, from which decoder layer the weighted sum ``sum_t w_t B_t A_t x`` applies (below it, every adapted Linear
applies the product of sums ``(sum_t B_t)(sum_t A_t) x``), and whose projector the row's images go through. Rows
of one batch may carry different weights: they share every forward pass of the base through the stacked
multi-adapter path (:meth:`cl_service.engine.multilora.MultiLoRA.mixture`), a soft weight vector where a routed row
has a one-hot. Decode steps run eagerly (CUDA graphs replay one-hot rows only).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from cl_service.data.schema import Sample


@dataclass(frozen=True)
class Mixture:
    """One row's mixture of adapter folders ``adapters`` with weights ``weights`` (one each, finite).

    ``mixed_from``: the first decoder layer that applies the weighted sum (0: all of them, DISCO; ``-1``: the last
    layer only, HiDe-LLaVA); the layers below apply the product of sums, weight 1 each. ``projector``: the adapter
    folder whose projector copy the images go through (None, or a folder without one: the base's)."""

    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    mixed_from: int = 0
    projector: str | None = None

    def __post_init__(self) -> None:
        if not self.adapters or len(set(self.adapters)) != len(self.adapters):
            raise ValueError(f"a mixture needs distinct adapters, got {list(self.adapters)}")
        if len(self.weights) != len(self.adapters) or not all(math.isfinite(w) for w in self.weights):
            raise ValueError(f"a mixture needs one finite weight per adapter: {len(self.adapters)} adapters, "
                             f"weights {list(self.weights)}")

    @property
    def plan(self) -> tuple:
        """What rows must share to be answered in one pass: everything but the weights."""
        return self.adapters, self.mixed_from, self.projector


def answer_mixture(engine: Any, samples: Sequence[Sample], mixtures: Sequence[Mixture], max_new_tokens: int,
                   vision_states: torch.Tensor | None = None) -> list[str]:
    """Greedy answers of ``engine`` (an :class:`~cl_service.engine.engine.Engine`), sample ``i`` through
    ``mixtures[i]``; rows with the same adapters, layers and projector share each batch of ``engine.batch_size``.
    ``vision_states``: the samples' base CLIP states (``[N_img, k, H]``, images in sample order), or None."""
    if len(samples) != len(mixtures):
        raise ValueError(f"{len(samples)} samples but {len(mixtures)} mixtures")
    folders = list(dict.fromkeys(f for m in mixtures for f in (*m.adapters, m.projector) if f is not None))
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, m in enumerate(mixtures):
        groups[m.plan].append(i)
    counts = [len(s.images) for s in samples]
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    out: list[str] = [""] * len(samples)
    keys = engine.hold_adapters(folders)
    try:
        key = dict(zip(folders, keys))
        for (adapters, mixed_from, projector), rows in groups.items():
            for c in range(0, len(rows), engine.batch_size):
                chunk = rows[c:c + engine.batch_size]
                todo = [samples[i] for i in chunk]
                image_keys = [key[projector] if projector is not None else None] * sum(counts[i] for i in chunk)
                if vision_states is not None:
                    vs = torch.cat([vision_states[starts[i]:starts[i + 1]] for i in chunk])
                    feats: Any = engine.multi.image_features(None, image_keys, vs)
                else:
                    def feats(pixels: torch.Tensor, image_keys=image_keys) -> torch.Tensor:
                        return engine.multi.image_features(pixels, image_keys)
                weights = torch.tensor([mixtures[i].weights for i in chunk], dtype=torch.float64)
                with torch.no_grad(), engine.base_passes(), \
                        engine.multi.mixture([key[a] for a in adapters], weights, mixed_from):
                    texts = engine.mllm.generate(todo, max_new_tokens, len(todo), image_features=feats)
                for i, t in zip(chunk, texts):
                    out[i] = t
    finally:
        engine.release_adapters(keys)
    return out
