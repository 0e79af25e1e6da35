"""The two-stage pipeline: stage one of the next batch overlaps stage two of the last, results unchanged."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from cl_service.engine.engine import Engine
from cl_service.engine.pipeline import Pipeline
from cl_service.routers.prompt import Pool

pytestmark = pytest.mark.timeout(180)


def _overlaps(log) -> int:
    """How many stage-one batches ran while some stage-two batch was running."""
    ones = [(a, b) for s, a, b, _ in log if s == 1]
    twos = [(a, b) for s, a, b, _ in log if s == 2]
    return sum(any(a1 < b2 and a2 < b1 for a2, b2 in twos) for a1, b1 in ones)


def test_results_in_order_batched_and_overlapped():
    def stage1(items):
        time.sleep(0.05)
        return [x * 2 for x in items]

    def stage2(items, mid):
        time.sleep(0.05)
        return [m + 1 for m in mid]

    with Pipeline(stage1, stage2, max_batch=4) as p:
        out = p.map(list(range(23)), timeout_s=30)
    assert out == [2 * x + 1 for x in range(23)]
    sizes = [n for s, _, _, n in p.log if s == 1]
    assert sum(sizes) == 23 and max(sizes) <= 4
    assert _overlaps(p.log) >= 2  # stage one kept working while stage two ran


def test_requests_arriving_while_busy_form_one_batch():
    gate = threading.Event()

    def stage1(items):
        gate.wait(10)
        return items

    with Pipeline(stage1, lambda items, mid: mid, max_batch=64) as p:
        first = p.submit("a")
        time.sleep(0.1)  # stage one is busy with ["a"]
        rest = [p.submit(i) for i in range(10)]
        gate.set()
        assert first.result(10) == "a" and [f.result(10) for f in rest] == list(range(10))
    assert [n for s, _, _, n in p.log if s == 1] == [1, 10]


def test_wait_s_gathers_company_for_a_lone_request():
    with Pipeline(lambda items: items, lambda items, mid: mid, wait_s=0.3) as p:
        a = p.submit(1)
        time.sleep(0.05)
        b = p.submit(2)
        assert a.result(10) == 1 and b.result(10) == 2
    assert [n for s, _, _, n in p.log if s == 1] == [2]


def test_an_error_fails_only_its_own_batch():
    def stage1(items):
        if "bad" in items:
            raise ValueError("bad request")
        return items

    def stage2(items, mid):
        if "boom" in items:
            raise RuntimeError("stage two failed")
        return [x.upper() for x in mid]

    with Pipeline(stage1, stage2, max_batch=1) as p:
        futs = [p.submit(x) for x in ["ok", "bad", "boom", "fine"]]
        assert futs[0].result(10) == "OK" and futs[3].result(10) == "FINE"
        with pytest.raises(ValueError, match="bad request"):
            futs[1].result(10)
        with pytest.raises(RuntimeError, match="stage two failed"):
            futs[2].result(10)


def test_lost_results_are_an_error():
    with Pipeline(lambda items: items, lambda items, mid: mid[:-1], max_batch=8) as p:
        futs = [p.submit(i) for i in range(3)]
        for f in futs:  # however the three were batched, every batch lost one result
            with pytest.raises(RuntimeError, match=r"stage two returned \d+ results for \d+ requests"):
                f.result(10)


def test_back_pressure_bounds_batches_ahead_of_stage_two():
    ahead = []
    done2 = [0]
    done1 = [0]

    def stage1(items):
        done1[0] += 1
        ahead.append(done1[0] - done2[0])
        return items

    def stage2(items, mid):
        time.sleep(0.05)
        done2[0] += 1
        return mid

    with Pipeline(stage1, stage2, max_batch=1, depth=1) as p:
        p.map(list(range(8)), timeout_s=30)
    # one batch in stage two, one waiting for it, one just routed and blocked on the queue
    assert max(ahead) <= 3


def test_merge_lets_stage_two_answer_every_waiting_routed_batch_at_once():
    gate = threading.Event()
    seen2 = []

    def stage2(items, mid):
        gate.wait(10)
        seen2.append(list(items))
        return [m * 10 for m in mid]

    merge = lambda mids: [x for m in mids for x in m]  # noqa: E731
    with Pipeline(lambda items: list(items), stage2, max_batch=5, merge=merge) as p:
        first = p.submit(0)
        time.sleep(0.1)  # stage two is blocked on [0]; stage one routes the rest as they come
        rest = []
        for i in range(1, 8):
            rest.append(p.submit(i))
            time.sleep(0.03)
        time.sleep(0.1)
        gate.set()
        assert [f.result(10) for f in [first, *rest]] == [i * 10 for i in range(8)]
    assert seen2[0] == [0]
    assert max(len(b) for b in seen2) <= 5 and sum(len(b) for b in seen2) == 8
    assert len(seen2) <= 3  # 7 routed one by one, answered in at most two merged batches of <= 5
    assert max(n for s, _, _, n in p.log if s == 1) < max(n for s, _, _, n in p.log if s == 2)


def test_a_merge_error_fails_the_merged_requests_only():
    gate = threading.Event()

    def merge(mids):
        raise ValueError("cannot merge")

    def stage2(items, mid):
        gate.wait(10)
        return mid

    with Pipeline(lambda items: list(items), stage2, max_batch=4, merge=merge) as p:
        a = p.submit("a")
        time.sleep(0.1)
        b, c = p.submit("b"), None
        time.sleep(0.05)
        c = p.submit("c")
        time.sleep(0.1)
        gate.set()
        assert a.result(10) == "a"
        with pytest.raises(ValueError, match="cannot merge"):
            b.result(10)
        with pytest.raises(ValueError, match="cannot merge"):
            c.result(10)
        assert p.map(["d"], timeout_s=10) == ["d"]


def test_close_finishes_pending_work_and_refuses_new():
    p = Pipeline(lambda items: items, lambda items, mid: mid, max_batch=2)
    futs = [p.submit(i) for i in range(5)]
    p.close(timeout_s=10)
    assert [f.result(0) for f in futs] == list(range(5))
    with pytest.raises(RuntimeError, match="closed"):
        p.submit(9)
    p.close()  # twice is fine


def test_bad_settings_are_refused():
    for kw, msg in [({"max_batch": 0}, "max_batch"), ({"wait_s": -1}, "wait_s"), ({"depth": 0}, "depth")]:
        with pytest.raises(ValueError, match=msg):
            Pipeline(lambda i: i, lambda i, m: m, **kw)


def test_engine_two_stage_pipelined_equals_sequential(tiny_base, adapters, samples):
    """Route with an MLLM router and answer with mixed experts, two batches in flight at once: the same
    routes and answers as one batch after the other (the per-row adapter plans are per thread)."""
    torch.set_num_threads(1)
    pool = Pool(("e1", "e2", "e3"), ("a: first", "b: second", "c: third"))
    eng = Engine(tiny_base, fused_lora=True)
    eng.router_max_new_tokens = 1
    experts = {e: adapters[e] for e in pool.experts}

    def stage1(items):
        vs = eng.vision_states(items)
        return vs, [r.expert for r in eng.route_mllm(items, adapters["vis"], pool, vision_states=vs)]

    def stage2(items, mid):
        vs, chosen = mid
        return list(zip(chosen, eng.answer_mixed(items, [experts[e] for e in chosen], 5, vision_states=vs)))

    reqs = samples * 3  # 30 requests
    with Pipeline(stage1, stage2, max_batch=4) as p:
        piped = p.map(reqs, timeout_s=120)
    sizes = [n for s, _, _, n in p.log if s == 1]  # the batches the pipeline formed, in order
    sequential, i = [], 0
    for n in sizes:
        chunk = reqs[i:i + n]
        sequential += stage2(chunk, stage1(chunk))
        i += n
    assert i == len(reqs) and len({e for e, _ in sequential}) >= 2, "the router should pick several experts"
    assert piped == sequential
    assert _overlaps(p.log) >= 1


def test_concurrent_mixed_calls_keep_their_own_rows(tiny_base, adapters, samples):
    """Two threads answering through different adapters at the same time each get their own answers."""
    torch.set_num_threads(1)
    eng = Engine(tiny_base, fused_lora=True)
    plans = {"a": [adapters["e1"], adapters["e2"]] * 5, "b": [adapters["e3"], None] * 5}
    ref = {k: eng.answer_mixed(samples, v, 5) for k, v in plans.items()}
    assert ref["a"] != ref["b"]
    got: dict = {}
    errors = []

    def work(k):
        try:
            got[k] = [eng.answer_mixed(samples, plans[k], 5) for _ in range(3)]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and all(got[k] == [ref[k]] * 3 for k in plans)
    assert not eng.multi._handles  # hooks come off when no thread is inside rows()

