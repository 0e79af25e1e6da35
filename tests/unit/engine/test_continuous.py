"""Continuous batching on the CPU: rows join and leave the running decode between steps and get the answers
batch-at-a-time answering gives; a full queue refuses at once; a bad row fails alone. The captured CUDA-graph
step is tested on a GPU (``tests/gpu/test_cuda_graphs.py``)."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from cl_service.engine.continuous import ContinuousBatcher, QueueFull
from cl_service.engine.engine import Engine
from cl_service.engine.pipeline import Pipeline

pytestmark = pytest.mark.timeout(240)


def test_rows_join_and_leave_and_answer_as_batches_do(tiny_base, adapters, samples):
    """Ten requests through four slots, with several experts (one adapting the vision tower), the plain base,
    different answer lengths and one much longer question (the buffers grow under live rows), arriving in two
    waves: the same answers as :meth:`Engine.answer_mixed` per row."""
    eng = Engine(tiny_base)
    names = ["e1", None, "e2", "vis", "e3", "e2", None, "e1", "e3", "e1"]
    lens = [6, 3, 12, 6, 1, 9, 6, 40, 2, 6]
    rows = list(samples[:10])
    rows[7] = dataclasses.replace(rows[7], question=rows[7].question + " and then" * 40)
    folders = [adapters[k] if k else None for k in names]
    ref = [Engine(tiny_base, cuda_graphs=False).answer_mixed([s], [f], n)[0] for s, f, n in zip(rows, folders, lens)]
    with eng.continuous(slots=4, max_queue=16) as cb:
        futs = [cb.submit(s, f, n) for s, f, n in zip(rows[:5], folders[:5], lens[:5])]
        while cb.stats["steps"] < 2:  # the second wave joins a decode that is running
            time.sleep(0.01)
        futs += [cb.submit(s, f, n) for s, f, n in zip(rows[5:], folders[5:], lens[5:])]
        got = [f.result(timeout=120) for f in futs]
    assert got == ref
    assert cb.stats["joined"] == 10 and cb.stats["finished"] == 10 and cb.stats["max_live"] <= 4
    assert cb.stats["prefills"] >= 3 and cb.stats["arena_grown"] >= 2  # joined in groups; grew for the long row
    kinds = {k for k, *_ in cb.log}
    assert kinds == {"prefill", "step"}
    assert not any(eng._pinned.values())  # every row gave its adapter back


def test_shared_vision_states_give_the_same_answers(tiny_base, adapters, samples):
    eng = Engine(tiny_base)
    rows = list(samples[:4])
    folders = [adapters["e1"], adapters["e2"], None, adapters["e3"]]
    states = eng.vision_states(rows)  # [N_img, k, d] for all four; split per request
    per = list(states.split([len(s.images) for s in rows]))
    with eng.continuous(slots=8) as cb:
        got = [f.result(timeout=60) for f in [cb.submit(s, f, 5, vision_states=v) for s, f, v in zip(rows, folders, per)]]
    assert got == eng.answer_mixed(rows, folders, 5)


def test_full_queue_refuses_and_a_bad_row_fails_alone(tiny_base, adapters, samples, tmp_path):
    eng = Engine(tiny_base)
    gate = threading.Event()
    with eng.continuous(slots=1, max_queue=1) as cb:
        join = cb._join
        cb._join = lambda take: (gate.wait(30), join(take))  # the worker holds its first request
        first = cb.submit(samples[0], adapters["e1"], 4)
        while cb.queued:
            time.sleep(0.01)
        second = cb.submit(samples[1], str(tmp_path / "no-such-adapter"), 4)  # waits in the queue
        with pytest.raises(QueueFull, match="max_queue=1"):
            cb.submit(samples[2], adapters["e2"], 4)
        t0 = time.monotonic()
        with pytest.raises(QueueFull):
            cb.submit(samples[2], adapters["e2"], 4, timeout_s=0.2)
        assert time.monotonic() - t0 >= 0.2
        gate.set()
        third = cb.submit(samples[2], adapters["e2"], 4, timeout_s=30)  # room again once the worker takes one
        assert first.result(timeout=60) == eng.answer_mixed(samples[:1], [adapters["e1"]], 4)[0]
        with pytest.raises(Exception, match="no-such-adapter"):
            second.result(timeout=60)
        assert third.result(timeout=60) == eng.answer_mixed(samples[2:3], [adapters["e2"]], 4)[0]
    assert cb.stats["queue_full"] == 2 and cb.stats["failed"] == 1
    with pytest.raises(RuntimeError, match="closed"):
        cb.submit(samples[0], None, 2)


def test_arguments_are_checked(tiny_base):
    eng = Engine(tiny_base)
    with pytest.raises(ValueError, match=">= 1"):
        ContinuousBatcher(eng, slots=0)
    with pytest.raises(ValueError, match=">= 1"):
        ContinuousBatcher(eng, max_queue=0)


def test_pipeline_hands_routed_rows_to_the_running_decode(tiny_base, adapters, samples):
    """Stage one computes CLIP states and picks an expert per request; stage two hands each row to the
    continuous batcher (a future per row): callers get the answers batch-at-a-time answering gives."""
    eng = Engine(tiny_base)
    pick = [adapters["e1"], adapters["e2"], None, adapters["e3"]]
    rows = list(samples[:8])

    def stage1(items):
        return eng.vision_states(items), [pick[hash(s.id) % 4] for s in items]

    with eng.continuous(slots=3) as cb:
        def stage2(items, mid):
            per = mid[0].split([len(s.images) for s in items])
            return [cb.submit(s, a, 4, vision_states=v) for s, a, v in zip(items, mid[1], per)]

        with Pipeline(stage1, stage2, max_batch=3) as p:
            got = p.map(rows, timeout_s=120)
    assert got == eng.answer_mixed(rows, [pick[hash(s.id) % 4] for s in rows], 4)


def test_on_token_hands_each_rows_tokens_out_as_they_are_decoded(tiny_base, adapters, samples):
    """A streaming server's hook: every row's tokens reach its ``on_token`` in order (EOS included), all of them
    before its future resolves, and they decode to the row's answer; a callback that raises costs only itself."""
    eng = Engine(tiny_base)
    rows = list(samples[:4])
    folders = [adapters["e1"], None, adapters["e2"], adapters["e3"]]
    got: dict[int, list[int]] = {i: [] for i in range(len(rows))}
    seen_at_done: dict[int, int] = {}

    def collect(i):
        return lambda tok: got[i].append(tok)

    def broken(tok):
        raise RuntimeError("a client went away")

    with eng.continuous(slots=2, max_queue=8) as cb:
        futs = [cb.submit(s, f, 6, on_token=collect(i)) for i, (s, f) in enumerate(zip(rows, folders))]
        for i, f in enumerate(futs):
            f.add_done_callback(lambda _, i=i: seen_at_done.__setitem__(i, len(got[i])))
        extra = cb.submit(rows[0], folders[0], 6, on_token=broken)
        answers = [f.result(timeout=120) for f in futs]
        assert extra.result(timeout=120) == answers[0]
    tok = eng.mllm.tokenizer
    eos = eng.mllm.eos_id
    for i, answer in enumerate(answers):
        ids = got[i]
        assert 1 <= len(ids) <= 6 and seen_at_done[i] == len(ids)  # every token came before the answer
        assert eos not in ids[:-1]  # nothing after EOS
        text = tok.decode([t for t in ids if t != eos], skip_special_tokens=True).strip()
        assert text == answer
