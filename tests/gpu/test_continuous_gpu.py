"""Continuous batching with captured CUDA graphs, and adapter paging through pinned host memory, on a GPU
(skipped without one). float32: identical greedy answers to eager batch-at-a-time answering."""

from __future__ import annotations

import time

import pytest
import torch

from test_cuda_graphs import _experts, _samples  # the sibling module (pytest puts tests/gpu on sys.path)

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_continuous_graphs_answer_as_eager_batches(tiny_base, tmp_path):
    """Requests in two waves (the second joins a running decode), mixed experts and answer lengths, and an
    expert first loaded while rows decode (the stacks change under live rows: their slots are remapped and the
    step captured anew): the answers of eager batch-at-a-time decoding, from replayed graphs."""
    from cl_service.engine.engine import Engine
    from cl_service.models.mllm import load_mllm

    mllm = load_mllm(tiny_base, dtype="float32", device="cuda")
    a, b, c = _experts(mllm, tmp_path, ["a", "b", "c"])
    eng = Engine(mllm, fused_lora=True, cuda_graphs=True)
    ref_eng = Engine(mllm, fused_lora=True, cuda_graphs=False)
    samples = _samples(24)
    plan = [[a, None, b][i % 3] for i in range(12)] + [[c, a, b, None][i % 4] for i in range(12)]
    lens = [4 + (i * 5) % 13 for i in range(24)]
    ref = [ref_eng.answer_mixed([s], [f], n)[0] for s, f, n in zip(samples, plan, lens)]
    with eng.continuous(slots=8) as cb:
        futs = [cb.submit(s, f, n) for s, f, n in zip(samples[:12], plan[:12], lens[:12])]
        deadline = time.monotonic() + 60
        while cb.stats["steps"] < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        futs += [cb.submit(s, f, n) for s, f, n in zip(samples[12:], plan[12:], lens[12:])]
        got = [f.result(timeout=120) for f in futs]
    assert got == ref
    assert cb.dec.reason is None, cb.dec.reason
    assert cb.dec.stats["captures"] >= 2 and cb.dec.stats["replays"] > 0 and cb.dec.stats["eager_steps"] == 0
    assert cb.stats["finished"] == 24 and cb.stats["max_live"] == 8
    assert len(set(ref)) > 8


def test_paging_through_pinned_memory_gives_the_same_answers(tiny_base, tmp_path):
    """Two adapters on the device, four in use: the others are parked in pinned host memory and paged back in
    (not read from disk again), with the answers of an engine that holds all four."""
    from cl_service.engine.engine import Engine
    from cl_service.models.mllm import load_mllm

    mllm = load_mllm(tiny_base, dtype="float32", device="cuda")
    folders = _experts(mllm, tmp_path, ["a", "b", "c", "d"])
    paged = Engine(mllm, fused_lora=True, max_loaded=2, max_host_adapters=4)
    resident = Engine(mllm, fused_lora=True, max_loaded=8)
    samples = _samples(8)
    for rnd in range(3):
        for pair in ((0, 1), (2, 3), (1, 2), (3, 0)):
            rows = [folders[pair[i % 2]] for i in range(8)]
            assert paged.answer_mixed(samples, rows, 6) == resident.answer_mixed(samples, rows, 6), (rnd, pair)
    assert paged.paging["disk"] == 4 and paged.paging["host"] > 0 and paged.paging["parked"] > 0
    parked = paged.multi._parked
    assert parked and all(A.is_pinned() for a in parked.values() for A, _ in a.lora.values())


def test_a_failed_growth_leaves_the_rows_and_their_graphs_as_they_were(tiny_base, tmp_path, monkeypatch):
    """Rows decode from replayed graphs; a long question needs larger key/value buffers and their allocation
    fails (from the test side): that request gets ``KVCacheFull``, the rows go on replaying the graphs of the
    old buffers to their eager answers, and once memory is back the long question is answered."""
    import dataclasses
    import threading

    from cl_service.engine.continuous import KVCacheFull
    from cl_service.engine.engine import Engine
    from cl_service.models.mllm import load_mllm

    mllm = load_mllm(tiny_base, dtype="float32", device="cuda")
    a, b = _experts(mllm, tmp_path, ["a", "b"])
    eng = Engine(mllm, fused_lora=True, cuda_graphs=True)
    ref_eng = Engine(mllm, fused_lora=True, cuda_graphs=False)
    samples = _samples(4)
    jobs = [(samples[0], a, 30), (samples[1], None, 30), (samples[2], b, 30)]
    big = (dataclasses.replace(samples[3], question=samples[3].question + " and then" * 40), a, 20)
    ref = [ref_eng.answer_mixed([s], [f], n)[0] for s, f, n in [*jobs, big]]
    real, limit, refused = torch.zeros, [1 << 62], []

    def zeros(*size, **kw):
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
        if threading.current_thread().name == "cb-gpu" and len(shape) == 3 and shape[1] == 2 and shape[2] > limit[0]:
            refused.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return real(*size, **kw)

    monkeypatch.setattr(torch, "zeros", zeros)
    with eng.continuous(slots=4, name="cb-gpu") as cb:
        futs = [cb.submit(*j) for j in jobs]
        deadline = time.monotonic() + 60
        while cb.stats["steps"] < 3 and time.monotonic() < deadline:
            time.sleep(0.002)
        limit[0] = cb.dec._arena.shape[-1]
        replays = cb.dec.stats["replays"]
        with pytest.raises(KVCacheFull):
            cb.submit(*big).result(timeout=60)
        assert [f.result(timeout=60) for f in futs] == ref[:3]
        assert cb.dec.stats["replays"] > replays  # the old graphs went on
        limit[0] = 1 << 62
        assert cb.submit(*big).result(timeout=60) == ref[3]
    assert refused and cb.dec.reason is None and cb.dec.stats["eager_steps"] == 0
