"""The evaluation memo: stored answers/features are exactly what a fresh pass computes."""

import threading

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


def test_memo_off_is_per_thread(tiny_base, samples):
    """Two threads' memo_off blocks overlap: each computes afresh, the other threads keep the memo, and the
    memo is there afterwards (a switch of the whole engine would leave it off for good)."""
    eng = Engine(tiny_base)
    eng.enable_memo()
    memo = eng.memo
    want = eng.answer(samples[:2], None, 3)
    inside, go = threading.Barrier(3, timeout=30), threading.Event()
    calls, errors = [], []
    real = eng.mllm.generate

    def counting(todo, *a, **k):
        calls.append(threading.current_thread().name)
        return real(todo, *a, **k)

    eng.mllm.generate = counting

    def fresh():
        try:
            with eng.memo_off():
                inside.wait()
                assert eng.answer(samples[:2], None, 3) == want
                go.wait(30)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=fresh, name=f"fresh-{i}", daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    inside.wait()
    assert eng.answer(samples[:2], None, 3) == want  # this thread: from the memo
    go.set()
    for t in threads:
        t.join(30)
    assert not errors and sorted(calls) == ["fresh-0", "fresh-1"]
    assert eng.memo is memo and eng._memo.active() is memo
