"""The evaluation memo: stored answers/features are exactly what a fresh pass computes."""

import numpy as np
import pytest
import torch

from cl_service.data.shards import ShardDataset
from cl_service.engine import Engine

pytestmark = pytest.mark.timeout(300)


def test_memo_returns_what_a_fresh_pass_computes(tiny_base, dcl_shards):
    torch.set_num_threads(1)
    ds = ShardDataset(dcl_shards)
    samples = ds.samples("RS", "test")[:6] + ds.samples("Med", "test")[:4]
    fresh = Engine(tiny_base)
    want = fresh.answer(samples, None, 4)
    want_f = fresh.features(samples)
    want_q = fresh.question_features(samples)

    eng = Engine(tiny_base)
    eng.enable_memo()
    # a different batch composition first: the memo must not depend on which items were batched together
    part = eng.answer(samples[3:7], None, 4)
    assert part == want[3:7]
    calls = []
    orig = eng.mllm.generate
    eng.mllm.generate = lambda todo, *a, **k: calls.append(len(todo)) or orig(todo, *a, **k)
    assert eng.answer(samples, None, 4) == want
    assert calls == [6]  # only the 6 items not seen before were generated
    assert eng.answer(samples, None, 4) == want and calls == [6]
    assert eng.answer(samples[:2], None, 3) == fresh.answer(samples[:2], None, 3)  # max_new_tokens is in the key
    np.testing.assert_allclose(eng.features(samples[::-1]), want_f[::-1], atol=1e-5)
    np.testing.assert_allclose(eng.question_features(samples), want_q, atol=1e-5)
