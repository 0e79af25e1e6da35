"""Continuous batching under faults: every request ends exactly once, with the answer :meth:`Engine.answer_mixed`
gives or a clear error, and the batcher answers the next request. Faults are injected from the test side by
wrapping the engine's, decoder's or batcher's own methods (or the arena's allocation)."""

from __future__ import annotations

import dataclasses
import random
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from cl_service.engine.continuous import KVCacheFull, ResourceExhausted
from cl_service.engine.engine import Engine

pytestmark = pytest.mark.timeout(240)


class Injected(RuntimeError):
    """A fault the test injects."""


@pytest.fixture(scope="module")
def ref(tiny_base):
    """``ref(sample, folder, n)``: the answer of :meth:`Engine.answer_mixed` for that one row (memoised)."""
    eng = Engine(tiny_base, cuda_graphs=False)
    memo: dict = {}

    def answer(sample, folder, n):
        key = (sample.id, sample.question, folder, n)
        if key not in memo:
            memo[key] = eng.answer_mixed([sample], [folder], n)[0]
        return memo[key]
    return answer


def _long(sample, times=40):
    """The sample with a question long enough that the key/value buffers must grow for it."""
    return dataclasses.replace(sample, question=sample.question + " and then" * times)


def _until(cond, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


def _hold_steps(monkeypatch, cb) -> threading.Event:
    """Decode steps wait (up to 30 s) until the returned event is set: on a loaded machine the rows decoding could
    otherwise finish all their steps before the test's next request arrives, and the fault would not meet them."""
    go, step = threading.Event(), cb.dec._forward
    monkeypatch.setattr(cb.dec, "_forward", lambda g: (go.wait(30), step(g))[1])
    return go


def _exactly_once(cb, futs):
    """Every future settled, each counted once as finished, failed or cancelled; nothing left in the batcher, and
    every adapter hold given back."""
    assert all(f.done() for f in futs)
    s = cb.stats
    assert s["submitted"] == len(futs) == s["finished"] + s["failed"] + s["cancelled"], dict(s)
    assert s["finished"] == sum(not f.cancelled() and f.exception() is None for f in futs)
    assert cb.live == 0 and cb.queued == 0
    assert not any(cb.engine._pinned.values())


def _arena_alloc_fails(monkeypatch, worker: str, larger_than: list[int], seen: list[int], when=lambda: True,
                       live=lambda: 1):
    """``torch.zeros`` raises CUDA's out-of-memory error for key/value arenas (``[layers, 2, n]``) of more than
    ``larger_than[0]`` elements allocated by thread ``worker`` (when ``when()``); ``seen`` gets ``live()`` (the
    batcher's live rows) at each refusal."""
    real = torch.zeros

    def zeros(*size, **kw):
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
        if (threading.current_thread().name == worker and len(shape) == 3 and shape[1] == 2
                and shape[2] > larger_than[0] and when()):
            seen.append(live())
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return real(*size, **kw)

    monkeypatch.setattr(torch, "zeros", zeros)


def test_a_failed_arena_growth_fails_only_the_request_that_needed_it(tiny_base, adapters, samples, monkeypatch, ref):
    """The buffers must grow for a long question while two rows decode, and the allocation fails: that request
    gets :class:`KVCacheFull` (a :class:`ResourceExhausted`), the live rows finish with their right answers, a
    short request joins meanwhile, and once memory is back the long request is answered."""
    eng = Engine(tiny_base)
    live_jobs = [(samples[0], adapters["e1"], 30), (samples[1], None, 30)]
    big_job = (_long(samples[2]), adapters["e2"], 20)
    short_job = (samples[3], adapters["e3"], 4)
    with eng.continuous(slots=4, name="cb-grow") as cb:
        live = [cb.submit(*j) for j in live_jobs]
        _until(lambda: cb.stats["steps"] >= 2)
        queued = _hold_steps(monkeypatch, cb)
        limit, refused = [cb.dec._arena.shape[-1]], []
        _arena_alloc_fails(monkeypatch, "cb-grow", limit, refused, live=lambda: cb.live)
        big = cb.submit(*big_job)
        queued.set()
        with pytest.raises(KVCacheFull, match="key/value buffers") as ei:
            big.result(timeout=60)
        assert isinstance(ei.value, ResourceExhausted)
        short = cb.submit(*short_job)
        assert short.result(timeout=60) == ref(*short_job)
        assert [f.result(timeout=60) for f in live] == [ref(*j) for j in live_jobs]
        limit[0] = 1 << 62  # memory is back
        again = cb.submit(*big_job)
        assert again.result(timeout=60) == ref(*big_job)
    assert refused and refused[0] >= 1, "the growth must have been refused while rows decoded"
    assert cb.stats["kv_full"] == 1 and cb.stats["failed"] == 1
    _exactly_once(cb, [*live, big, short, again])


def test_a_failing_step_fails_the_live_rows_and_the_next_request_is_answered(tiny_base, adapters, samples,
                                                                              monkeypatch, ref):
    eng = Engine(tiny_base)
    jobs = [(samples[0], adapters["e1"], 12), (samples[1], None, 12), (samples[2], adapters["vis"], 12)]
    with eng.continuous(slots=4, name="cb-step") as cb:
        real, calls = cb.dec._forward, [0]

        def forward(g):
            calls[0] += 1
            if calls[0] == 3:
                raise Injected("injected fault: the decode step failed")
            return real(g)

        monkeypatch.setattr(cb.dec, "_forward", forward)
        futs = [cb.submit(*j) for j in jobs]
        for f, j in zip(futs, jobs):
            try:
                assert f.result(timeout=60) == ref(*j)
            except Injected:
                pass
        assert sum(f.exception() is not None for f in futs) >= 1
        nxt = (samples[3], adapters["e2"], 8)
        futs.append(cb.submit(*nxt))
        assert futs[-1].result(timeout=60) == ref(*nxt)
    _exactly_once(cb, futs)


def test_cancelled_requests_are_skipped_and_running_ones_finish(tiny_base, adapters, samples, ref):
    eng = Engine(tiny_base)
    gate = threading.Event()
    jobs = [(samples[i], [adapters["e1"], None, adapters["e2"], adapters["e3"]][i], 6) for i in range(4)]
    with eng.continuous(slots=2, name="cb-cancel") as cb:
        join = cb._join
        cb._join = lambda take: (gate.wait(30), join(take))  # the worker holds its first request
        first = cb.submit(*jobs[0])
        _until(lambda: cb.queued == 0)
        second, third = cb.submit(*jobs[1]), cb.submit(*jobs[2])
        assert second.cancel()  # still waiting: the caller gave up
        gate.set()
        assert first.result(timeout=60) == ref(*jobs[0]) and third.result(timeout=60) == ref(*jobs[2])
        assert second.cancelled()
        fourth = cb.submit(jobs[3][0], jobs[3][1], 30)
        _until(lambda: fourth.running() or fourth.done())
        assert not fourth.cancel()  # a running request cannot be taken back: it is answered
        assert fourth.result(timeout=60) == ref(jobs[3][0], jobs[3][1], 30)
    assert cb.stats["cancelled"] == 1
    _exactly_once(cb, [first, second, third, fourth])


def test_wait_s_gathers_company_and_a_cancelled_first_request_does_not_hold_the_rest(tiny_base, adapters, samples,
                                                                                   ref):
    eng = Engine(tiny_base)
    jobs = [(samples[0], adapters["e1"], 5), (samples[1], adapters["e2"], 5), (samples[2], None, 5)]
    eng.answer_mixed(samples[:2], [adapters["e1"], adapters["e2"]], 1)  # on hand: the waits are wait_s's alone
    with eng.continuous(slots=4, wait_s=0.6, name="cb-wait") as cb:
        t0 = time.monotonic()
        a = cb.submit(*jobs[0])
        time.sleep(0.05)
        b = cb.submit(*jobs[1])
        assert [a.result(timeout=30), b.result(timeout=30)] == [ref(*j) for j in jobs[:2]]
        assert [n for k, *_, n in cb.log if k == "prefill"] == [2]  # one prefill for both
        assert time.monotonic() - t0 < 10
        gone = cb.submit(*jobs[0])
        assert gone.cancel()
        t1 = time.monotonic()
        c = cb.submit(*jobs[2])
        assert c.result(timeout=30) == ref(*jobs[2])
        assert time.monotonic() - t1 < 10
    assert cb.stats["cancelled"] == 1
    _exactly_once(cb, [a, b, gone, c])


def test_max_prefill_bounds_each_join_and_a_bad_row_fails_alone(tiny_base, adapters, samples, ref, tmp_path):
    eng = Engine(tiny_base)
    gate = threading.Event()
    folders = [adapters["e1"], str(tmp_path / "no-such-adapter"), None, adapters["e3"], adapters["e2"]]
    jobs = [(samples[i], folders[i], 6) for i in range(5)]
    with eng.continuous(slots=4, max_prefill=2, name="cb-prefill") as cb:
        join = cb._join
        cb._join = lambda take: (gate.wait(30), join(take))
        futs = [cb.submit(*j) for j in jobs]
        gate.set()
        for f, j in zip(futs, jobs):
            if j[1] is not None and "no-such" in j[1]:
                with pytest.raises(Exception, match="no-such-adapter"):
                    f.result(timeout=60)
            else:
                assert f.result(timeout=60) == ref(*j)
        nxt = cb.submit(samples[5], adapters["e1"], 6)
        assert nxt.result(timeout=60) == ref(samples[5], adapters["e1"], 6)
    sizes = [n for k, *_, n in cb.log if k == "prefill"]
    assert sizes and max(sizes) <= 2
    _exactly_once(cb, [*futs, nxt])


def test_a_decode_that_raises_as_a_row_finishes_fails_that_row_alone(tiny_base, adapters, samples, monkeypatch,
                                                                     ref):
    eng = Engine(tiny_base)
    jobs = [(samples[0], adapters["e1"], 3), (samples[1], None, 14), (samples[2], adapters["e2"], 14)]
    eng.answer_mixed(samples[:2], [adapters["e1"], adapters["e2"]], 1)  # on hand: no row waits for a read
    with eng.continuous(slots=4, name="cb-text") as cb:
        real, calls = eng.mllm.tokenizer.decode, []

        def decode(ids, *a, **k):
            if threading.current_thread().name == "cb-text":
                calls.append(list(ids))
                if len(ids) <= 3 and len(calls) == 1:  # the short answer, the first to finish
                    raise Injected("injected fault: bad bytes")
            return real(ids, *a, **k)

        monkeypatch.setattr(eng.mllm.tokenizer, "decode", decode)
        futs = [cb.submit(*j) for j in jobs]
        with pytest.raises(RuntimeError, match="did not decode into text: Injected"):
            futs[0].result(timeout=30)
        assert [f.result(timeout=60) for f in futs[1:]] == [ref(*j) for j in jobs[1:]]
        nxt = cb.submit(*jobs[0])
        assert nxt.result(timeout=60) == ref(*jobs[0])
    assert cb.stats["failed"] == 1
    _exactly_once(cb, [*futs, nxt])


def test_a_remap_that_raises_during_a_join_fails_that_join_alone(tiny_base, adapters, samples, monkeypatch, ref):
    """The adapter slots of a joining request cannot be mapped: that request fails, once; the row decoding
    meanwhile finishes with its answer (never two rows for one request), and the next request is answered."""
    eng = Engine(tiny_base)
    live_job, bad_job, next_job = (samples[0], adapters["e1"], 24), (samples[1], adapters["e2"], 6), \
        (samples[2], adapters["e3"], 6)
    with eng.continuous(slots=4, name="cb-remap") as cb:
        live = cb.submit(*live_job)
        _until(lambda: cb.stats["steps"] >= 1)
        join, remap = cb._join, cb._remap
        state = {"joining": False, "fired": 0, "live": None}

        def joining(take):
            state["joining"] = True
            try:
                return join(take)
            finally:
                state["joining"] = False

        def failing_remap(*a, **k):
            if state["joining"] and not state["fired"]:
                state["fired"], state["live"] = 1, cb.live
                raise Injected("injected fault: no slot for the adapter")
            return remap(*a, **k)

        monkeypatch.setattr(cb, "_join", joining)
        monkeypatch.setattr(cb, "_remap", failing_remap)
        queued = _hold_steps(monkeypatch, cb)
        bad = cb.submit(*bad_job)
        queued.set()
        with pytest.raises(Injected):
            bad.result(timeout=60)
        assert live.result(timeout=60) == ref(*live_job)
        nxt = cb.submit(*next_job)
        assert nxt.result(timeout=60) == ref(*next_job)
    assert state["fired"] and state["live"] >= 1, "the fault must hit a join while a row decodes"
    assert cb.stats["failed"] == 1 and cb.stats["finished"] == 2
    _exactly_once(cb, [live, bad, nxt])


def test_a_cold_adapter_loads_while_the_rows_decode(tiny_base, adapters, samples, monkeypatch, ref, tmp_path):
    """Reading and verifying a cold adapter's files is slow (held here from the test side): the row decoding
    keeps stepping and finishes meanwhile; the request joins once its files are read."""
    import cl_service.engine.engine as engine_mod

    cold = str(shutil.copytree(adapters["e3"], tmp_path / "cold"))
    eng = Engine(tiny_base)
    eng.answer_mixed(samples[:1], [adapters["e1"]], 1)  # on hand
    reading, release, seen = threading.Event(), threading.Event(), {}
    real = engine_mod.read_adapter

    def slow_read(key):
        if Path(key).name == "cold":
            seen["live"] = cb.live
            reading.set()
            release.wait(30)
        return real(key)

    live_job, cold_job, again_job = (samples[0], adapters["e1"], 40), (samples[1], cold, 6), (samples[2], cold, 6)
    want = [ref(*j) for j in (live_job, cold_job, again_job)]  # before the reads are slowed
    monkeypatch.setattr(engine_mod, "read_adapter", slow_read)
    with eng.continuous(slots=4, name="cb-cold") as cb:
        live = cb.submit(*live_job)
        _until(lambda: cb.stats["steps"] >= 1)
        step = cb.dec._forward  # steps wait for the read to start: the row is still decoding when it does
        monkeypatch.setattr(cb.dec, "_forward", lambda g: (reading.wait(30), step(g))[1])
        waiting = cb.submit(*cold_job)
        assert reading.wait(30)
        steps = cb.stats["steps"]
        try:
            assert live.result(timeout=20) == want[0]  # finished while the files were being read
            assert cb.stats["steps"] > steps and not waiting.done() and cb.queued == 1
        finally:
            release.set()
        assert waiting.result(timeout=60) == want[1]
        again = cb.submit(*again_job)  # on hand now: no second read
        assert again.result(timeout=60) == want[2]
    assert seen["live"] == 1, "the read must start while a row decodes"
    assert eng.paging["fetched"] == 1 and cb.stats["fetches"] == 1
    _exactly_once(cb, [live, waiting, again])


def test_an_adapter_that_fails_to_load_in_the_loader_fails_its_requests_alone(tiny_base, adapters, samples, ref,
                                                                              tmp_path):
    broken = shutil.copytree(adapters["e2"], tmp_path / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"not the file its checksum names")
    eng = Engine(tiny_base)
    with eng.continuous(slots=4, name="cb-broken") as cb:
        futs = [cb.submit(samples[0], str(broken), 5), cb.submit(samples[1], adapters["e1"], 5),
                cb.submit(samples[2], str(broken), 5)]
        for i in (0, 2):
            with pytest.raises(Exception, match="checksum|sha256|differ"):
                futs[i].result(timeout=60)
        assert futs[1].result(timeout=60) == ref(samples[1], adapters["e1"], 5)
    assert eng.paging["fetched"] == 1 and cb.stats["fetches"] >= 2  # e1 read once; the broken folder never loads
    _exactly_once(cb, futs)


def test_stress_many_callers_with_random_faults(tiny_base, adapters, samples, monkeypatch, ref):
    """Seeded: six caller threads submit 48 requests (random samples, experts, answer lengths, some long
    questions) while faults hit random steps, arena growths, text decodes, remaps and adapter holds. Every
    future resolves exactly once, to the answer :meth:`Engine.answer_mixed` gives or to a clear error; nothing
    hangs; with the faults off the batcher answers again."""
    rng = random.Random(1234)
    folders = [None, adapters["e1"], adapters["e2"], adapters["e3"], adapters["vis"]]
    pool = list(samples[:8]) + [_long(samples[8], 30)]
    plan = [[(rng.randrange(len(pool)), rng.randrange(len(folders)), rng.randint(1, 12)) for _ in range(8)]
            for _ in range(6)]  # per caller: (sample, expert, answer length) indices

    def job(j):
        return pool[j[0]], folders[j[1]], j[2]

    want = {j: ref(*job(j)) for jobs in plan for j in jobs}
    eng = Engine(tiny_base)
    frng, lock, fired, armed = random.Random(99), threading.Lock(), Counter(), [True]

    def roll(kind: str, p: float) -> bool:
        if threading.current_thread().name != "cb-stress" or not armed[0]:
            return False
        with lock:
            hit = frng.random() < p
            fired[kind] += hit
        return hit

    with eng.continuous(slots=4, max_queue=12, max_prefill=3, name="cb-stress") as cb:
        forward, decode, remap, hold = cb.dec._forward, eng.mllm.tokenizer.decode, cb._remap, eng.hold_adapters

        def faulty(kind, p, fn):
            def wrapped(*a, **k):
                if roll(kind, p):
                    raise Injected(f"injected fault ({kind})")
                return fn(*a, **k)
            return wrapped

        monkeypatch.setattr(cb.dec, "_forward", faulty("step", 0.04, forward))
        monkeypatch.setattr(eng.mllm.tokenizer, "decode", faulty("decode", 0.06, decode))
        monkeypatch.setattr(cb, "_remap", faulty("remap", 0.02, remap))
        monkeypatch.setattr(eng, "hold_adapters", faulty("hold", 0.05, hold))
        _arena_alloc_fails(monkeypatch, "cb-stress", [0], [], when=lambda: roll("grow", 0.3))
        results: list = []
        errors: list = []

        def caller(jobs, seed):
            r = random.Random(seed)
            try:
                for j in jobs:
                    results.append((j, cb.submit(*job(j), timeout_s=60)))
                    time.sleep(r.random() * 0.01)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=caller, args=(jobs, i)) for i, jobs in enumerate(plan)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors and not any(t.is_alive() for t in threads) and len(results) == 48
        ok = bad = 0
        for j, f in results:
            try:
                assert f.result(timeout=120) == want[j]
                ok += 1
            except (Injected, KVCacheFull):
                bad += 1
            except RuntimeError as e:
                assert "injected fault" in str(e), e
                bad += 1
        armed[0] = False
        calm = [cb.submit(*job(j)) for j in plan[0][:3]]
        assert [f.result(timeout=60) for f in calm] == [want[j] for j in plan[0][:3]]
    assert sum(fired.values()) >= 3 and ok >= 10 and bad >= 3, (fired, ok, bad)
    _exactly_once(cb, [f for _, f in results] + calm)
