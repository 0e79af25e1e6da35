"""Batch steps of two-stage serving, shared by the Ray Serve deployments and the plain gRPC servicer.

A serving batch holds requests of different clients: they may be routed against different pools (a
router published mid-batch) and ask for different answer lengths, and their rows may use different
experts. These helpers split a batch into the calls the :class:`~cl_service.engine.Engine` needs and put
the results back in request order. Nothing here knows of Ray or gRPC.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Callable, Hashable, Sequence

from cl_service.data.schema import Sample

log = logging.getLogger(__name__)


def per_sample_states(vision_states: Any, samples: Sequence[Sample]) -> list:
    """The batch's CLIP states ``[N_img, k, d]`` split per request (a request may hold several images)."""
    return list(vision_states.split([len(s.images) for s in samples]))


def cat_states(parts: list) -> Any:
    """Concatenate per-request states, or None when any is missing."""
    if not parts or any(p is None for p in parts):
        return None
    import torch

    return torch.cat(parts)


def route_grouped(samples: Sequence[Sample], keys: Sequence[Hashable], states: list | None,
                  route: Callable[[list[Sample], Hashable, Any], list]) -> list:
    """``route(group samples, key, group CLIP states or None)`` once per distinct key (e.g. router folder +
    pool); the routes in request order."""
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        groups[k].append(i)
    out: list = [None] * len(samples)
    for key, idx in groups.items():
        vs = None if states is None else cat_states([states[i] for i in idx])
        for i, r in zip(idx, route([samples[i] for i in idx], key, vs)):
            out[i] = r
    return out


def answer_grouped(engine: Any, samples: Sequence[Sample], adapters: Sequence[str | None],
                   max_new_tokens: Sequence[int | None], states: list | None,
                   on_token: Sequence[Callable[[int], None] | None] | None = None) -> list[str]:
    """Answers in request order; rows for different experts share each forward pass
    (:meth:`Engine.answer_mixed`), one call per distinct ``max_new_tokens``; ``on_token[i]`` gets row ``i``'s
    tokens as they are decoded."""
    by_len: dict[int | None, list[int]] = defaultdict(list)
    for i, n in enumerate(max_new_tokens):
        by_len[n].append(i)
    out = [""] * len(samples)
    for n, idx in by_len.items():
        vs = None if states is None else cat_states([states[i] for i in idx])
        texts = engine.answer_mixed([samples[i] for i in idx], [adapters[i] for i in idx], n, vision_states=vs,
                                    on_token=None if on_token is None else [on_token[i] for i in idx])
        for i, t in zip(idx, texts):
            out[i] = t
    return out


def isolated(fn: Callable[[list], Sequence[Any]], items: list) -> list:
    """``fn(items)``; when that raises, ``fn([item])`` for each item, so one bad row fails alone and the
    others still get answers. A failing row's result is its exception (the caller hands it to that
    request only)."""
    try:
        out = list(fn(items))
        if len(out) != len(items):
            raise RuntimeError(f"batched call returned {len(out)} results for {len(items)} rows")
        return out
    except Exception as e:  # noqa: BLE001 - which row failed is found below
        if len(items) <= 1:
            return [e] * len(items)
        log.warning("a batch of %d failed (%s); running its rows one by one", len(items), type(e).__name__)
    res: list = []
    for item in items:
        try:
            one = list(fn([item]))
            if len(one) != 1:
                raise RuntimeError(f"batched call returned {len(one)} results for 1 row")
            res.append(one[0])
        except Exception as e:  # noqa: BLE001 - this row's own error
            res.append(e)
    return res


def run_rows(fn: Callable[[list], Sequence[Any]], items: list, errors: Sequence[Exception | None]) -> list:
    """Results in item order: a row with an error (e.g. refused by validation) gets it, the others go
    through ``fn`` together (:func:`isolated`)."""
    ok = [i for i, e in enumerate(errors) if e is None]
    out: list = list(errors)
    for i, r in zip(ok, isolated(fn, [items[i] for i in ok]) if ok else []):
        out[i] = r
    return out
