"""MLLM routing over pools past 26 experts (two-letter labels): decode length, fallback scoring, fused = peft."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cl_service.engine.engine import Engine
from cl_service.engine.labels import label_scores, label_tokens
from cl_service.routers.prompt import Pool, router_sample

pytestmark = pytest.mark.timeout(300)


def _pool(n):
    return Pool(tuple(f"e{i}" for i in range(n)), tuple(f"domain {i}: things {i}" for i in range(n)))


@torch.no_grad()
def _reference_scores(eng, router, pool, sample):
    """Sum of log-probs of each label's tokens, one full teacher-forced forward per label (peft path)."""
    tok = eng.mllm.tokenizer
    out = []
    for label in pool.letters:
        row = dataclasses.replace(router_sample(pool, sample, None), answers=[label])
        ids, n = eng.mllm.encode(row, with_target=True)
        m = next(k for k in range(1, len(ids) - n + 1) if label in tok.decode(ids[n:n + k]))
        batch = eng.mllm.collate([row], train=True)
        lp = torch.log_softmax(eng._run(router, lambda: eng.mllm.forward(batch).logits[0].float()), -1)
        out.append(sum(float(lp[n - 1 + j, ids[n + j]]) for j in range(m)))
    return torch.tensor(out)


def test_fallback_picks_the_label_of_the_highest_summed_log_prob(tiny_base, adapters, samples):
    torch.set_num_threads(1)
    pool, router, items = _pool(30), adapters["e1"], samples[:4]
    eng = Engine(tiny_base)
    eng.router_max_new_tokens = 1  # too short for labels of two tokens: raised, not refused
    seen = []
    generate = eng.mllm.generate
    eng.mllm.generate = lambda s, n, *a, **k: seen.append(n) or generate(s, n, *a, **k)
    routes = eng.route_mllm(items, router, pool)
    need = max(len(label_tokens(eng, L)) for L in pool.letters)
    assert need >= 2 and seen == [need]
    assert any(r.fallback for r in routes), "a random router should miss the labels (else nothing is tested)"
    for r, s in zip(routes, items):
        if r.fallback:
            ref = _reference_scores(eng, router, pool, s)
            assert r.expert == pool.experts[int(ref.argmax())]
            # the engine's batched scores (one row per shared label prefix) equal one full forward per label
            torch.testing.assert_close(label_scores(eng, [router_sample(pool, s, None)], router, pool, False)[0],
                                       ref, rtol=1e-4, atol=1e-4)
    # the stacked multi-adapter path (and with reused CLIP states) routes the same
    fused = Engine(tiny_base, fused_lora=True)
    fused.router_max_new_tokens = 1
    assert fused.route_mllm(items, router, pool) == routes
    assert fused.route_mllm(items, router, pool, vision_states=fused.vision_states(items)) == routes


def test_valid_two_letter_output_is_taken_without_fallback(tiny_base, adapters, samples):
    pool, eng = _pool(100), Engine(tiny_base)
    eng.mllm.generate = lambda s, n, *a, **k: ["BC is the answer", "A B", "zz CV.", "AB"][:len(s)]
    routes = eng.route_mllm(samples[:4], adapters["e2"], pool)
    assert [r.expert for r in routes[:1] + routes[2:]] == ["e28", "e73", "e1"]
    assert [r.fallback for r in routes] == [False, True, False, False] and routes[1].raw == "A B"


def test_one_prefill_only_when_every_label_is_one_token(tiny_base, adapters, samples):
    """A fused one-token router over a pool past 26 takes the one-prefill path only when each label is a
    single token (as for some large vocabularies); its fallback is then the argmax over those tokens."""
    pool, eng = _pool(30), Engine(tiny_base, fused_lora=True)
    eng.router_max_new_tokens = 1
    calls = []
    eng._route_one_prefill = lambda items, router, pool, ids, vs: calls.append(ids.tolist()) or []
    eng.route_mllm(samples[:2], adapters["e1"], pool)
    assert calls == []  # the tiny tokenizer splits some labels
    eng._label_cache.update({L: (100 + k,) for k, L in enumerate(pool.letters)})
    eng.route_mllm(samples[:2], adapters["e1"], pool)
    assert calls == [list(range(100, 130))]
