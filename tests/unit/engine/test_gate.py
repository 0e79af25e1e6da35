"""Two stages in one process (colocated serving): a pass that switches the whole model (a peft router, a
MoE-LoRA) never runs next to the plain base / stacked-expert passes of another thread, so each gets the
answers it gets alone. The gate itself first, then the engine with two threads overlapping for real."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

from cl_service.engine.engine import Engine
from cl_service.engine.gate import PassGate
from cl_service.routers.prompt import Pool, router_sample

pytestmark = pytest.mark.timeout(180)


class _Off:
    """A stand-in for peft's reference-counted "adapters off" switch that records whether it is on."""

    def __init__(self) -> None:
        self.depth = 0
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self):
        with self.lock:
            self.depth += 1
        try:
            yield
        finally:
            with self.lock:
                self.depth -= 1


def _thread(fn, name=None):
    t = threading.Thread(target=fn, name=name, daemon=True)
    t.start()
    return t


def test_exclusive_waits_for_shared_and_holds_new_shared_back():
    off = _Off()
    gate = PassGate(off)
    order, s1_in, s1_go, x_waiting = [], threading.Event(), threading.Event(), threading.Event()

    def s1():
        with gate.shared():
            order.append("s1 in")
            assert off.depth == 1  # peft's adapters are off inside a shared block
            s1_in.set()
            s1_go.wait(10)
            order.append("s1 out")

    def x():
        with gate.exclusive():
            order.append("x in")
            assert off.depth == 0  # and on again (nothing shared open) inside an exclusive one
            order.append("x out")

    def s2():
        with gate.shared():
            order.append("s2 in")

    threads = [_thread(s1)]
    assert s1_in.wait(10)
    threads.append(_thread(x))
    deadline = time.monotonic() + 10
    while gate.stats["waited"] < 1:  # x waits for s1
        assert time.monotonic() < deadline
        time.sleep(0.001)
    threads.append(_thread(s2))
    while gate.stats["waited"] < 2:  # s2 waits behind x: a stream of shared blocks cannot starve it
        assert time.monotonic() < deadline
        time.sleep(0.001)
    s1_go.set()
    for t in threads:
        t.join(10)
    assert order == ["s1 in", "s1 out", "x in", "x out", "s2 in"]
    assert gate.stats["shared"] == 2 and gate.stats["exclusive"] == 1


def test_blocks_nest_within_a_thread_and_a_stuck_pass_times_out():
    off = _Off()
    gate = PassGate(off, timeout_s=0.2)
    with gate.shared(), gate.shared():  # a shared pass inside another of the same thread goes straight in
        assert off.depth == 2
        with pytest.raises(RuntimeError, match="would wait for itself"):
            with gate.exclusive():
                pass
    with gate.exclusive(), gate.exclusive():
        with gate.shared():  # inside an exclusive block: alone anyway, peft off for this inner block only
            assert off.depth == 1
        assert off.depth == 0
    held, go = threading.Event(), threading.Event()

    def hold():
        with gate.shared():
            held.set()
            go.wait(10)

    t = _thread(hold)
    assert held.wait(10)
    with pytest.raises(TimeoutError, match="waited"):
        with gate.exclusive():
            pass
    with gate.shared():  # the request that gave up holds nothing back
        pass
    go.set()
    t.join(10)


# ---------------------------------------------------------------------------------------------- on the engine
POOL = Pool(("e1", "e2", "e3"), ("a: first", "b: second", "c: third"))


@pytest.fixture(scope="module")
def moelora(tiny_base, tmp_path_factory):
    """A saved MoE-LoRA with non-zero experts (it changes answers)."""
    from cl_service.adapters.lora import LoraCfg
    from cl_service.adapters.moelora import MoELoRASpec, attach_moelora, detach_moelora, save_moelora
    from cl_service.adapters.registry import finalize_adapter
    from cl_service.models.mllm import load_mllm

    m = load_mllm(tiny_base)
    params = attach_moelora(m, MoELoRASpec.of(LoraCfg(rank=4, alpha=8, dropout=0.0, targets=("q", "v", "down")),
                                              experts=2), seed=3)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    folder = save_moelora(m, tmp_path_factory.mktemp("moe") / "moe")
    finalize_adapter(folder, id="moelora:stage-0", kind="moelora", task="all", description="", base=str(tiny_base),
                     job_key="moe")
    detach_moelora(m)
    return str(folder)


def _overlapped(eng: Engine, switching, plain):
    """``switching()`` (a call that switches the whole model) in one thread and ``plain()`` in another,
    overlapping for real: ``plain`` starts while ``switching`` is inside its generate (the model switched), and
    ``switching`` goes on only once ``plain`` ran a forward pass meanwhile (``plain`` then pauses inside its
    call until ``switching``'s generate is done), or once ``plain`` is held back waiting for the model.
    Returns both results and whether the two calls' time spans overlapped."""
    inside, started, forwarded, done = (threading.Event() for _ in range(4))
    real = eng.mllm.generate
    out: dict = {}

    def held_back() -> bool:
        gate = getattr(eng, "gate", None)
        return gate is not None and gate.stats["waited"] > 0

    def generate(*a, **k):
        if threading.current_thread().name != "switching" or inside.is_set():
            return real(*a, **k)
        inside.set()
        assert started.wait(30)
        deadline = time.monotonic() + 30
        while not forwarded.is_set() and not held_back():
            assert time.monotonic() < deadline, "the plain call neither ran nor waited"
            time.sleep(0.002)
        try:
            return real(*a, **k)
        finally:
            done.set()

    def first_forward(module, args, output):
        if threading.current_thread().name == "plain" and not forwarded.is_set():
            forwarded.set()
            done.wait(30)  # (without the gate: the switching pass runs now, while this call is in its block)

    def run(name, fn, before=None):
        def body():
            if before is not None:
                assert before.wait(30)
            t0 = time.monotonic()
            if name == "plain":
                started.set()
            try:
                out[name] = fn()
            except BaseException as e:  # noqa: BLE001
                out[name] = e
            out[name + "_span"] = (t0, time.monotonic())
        return _thread(body, name)

    eng.mllm.generate = generate
    hook = eng.mllm.model.register_forward_hook(first_forward)
    try:
        threads = [run("switching", switching), run("plain", plain, before=inside)]
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
    finally:
        hook.remove()
        del eng.mllm.generate
    (s0, s1), (p0, p1) = out["switching_span"], out["plain_span"]
    return out["switching"], out["plain"], p0 < s1 and s0 < p1


def test_a_peft_router_and_mixed_answers_in_two_threads(tiny_base, adapters, samples):
    """Stage one routes with the MLLM router LoRA through peft (``share_vision_states=false``), stage two answers
    with the plain base and experts, on one engine at once: the routes and answers each computes alone."""
    torch.set_num_threads(1)
    rows = list(samples[:6])
    plan = [adapters["e1"], None, adapters["e2"], None, adapters["e3"], adapters["vis"]]
    alone = Engine(tiny_base)
    want_routes = alone.route_mllm(rows, adapters["vis"], POOL)
    want_answers = alone.answer_mixed(rows, plan, 6)
    base_raws = alone.answer([router_sample(POOL, s, None) for s in rows], None, alone.router_max_new_tokens)
    assert base_raws != [r.raw for r in want_routes], "the router LoRA must change the router's output"

    eng = Engine(tiny_base)  # fused_lora off: the router runs through peft's active adapter
    routes, answers, overlapped = _overlapped(eng, lambda: eng.route_mllm(rows, adapters["vis"], POOL),
                                              lambda: eng.answer_mixed(rows, plan, 6))
    assert overlapped
    assert routes == want_routes
    assert answers == want_answers
    assert eng.gate.stats["waited"] >= 1  # the two passes did not run at once


def test_a_moelora_and_mixed_answers_in_two_threads(tiny_base, adapters, samples, moelora):
    torch.set_num_threads(1)
    rows = list(samples[:6])
    plan = [None, adapters["e1"], None, adapters["e2"], None, adapters["e3"]]
    alone = Engine(tiny_base)
    want_moe = alone.answer(rows, moelora, 6)
    want_answers = alone.answer_mixed(rows, plan, 6)
    assert want_moe != alone.answer(rows, None, 6), "the MoE-LoRA must change the answers"

    eng = Engine(tiny_base)
    moe, answers, overlapped = _overlapped(eng, lambda: eng.answer(rows, moelora, 6),
                                           lambda: eng.answer_mixed(rows, plan, 6))
    assert overlapped
    assert moe == want_moe
    assert answers == want_answers


def test_a_continuous_batch_next_to_a_peft_router(tiny_base, adapters, samples):
    """Rows decode in a continuous batch while another thread routes through peft's router adapter, then keeps
    it active: every decode step runs the plain base plus each row's own expert, and each route is the
    router's."""
    torch.set_num_threads(1)
    rows = list(samples[:8])
    plan = [adapters["e1"], None, adapters["e2"], None, adapters["e3"], adapters["e1"], None, adapters["e2"]]
    alone = Engine(tiny_base)
    want_answers = [alone.answer_mixed([s], [f], 10)[0] for s, f in zip(rows, plan)]
    want_routes = alone.route_mllm(rows[:4], adapters["vis"], POOL)

    eng = Engine(tiny_base)
    got_routes, errors = [], []
    with eng.continuous(slots=3) as cb:
        futs = [cb.submit(s, f, 10) for s, f in zip(rows[:4], plan[:4])]

        def route():
            try:
                for _ in range(3):
                    got_routes.append(eng.route_mllm(rows[:4], adapters["vis"], POOL))
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        t = _thread(route)
        futs += [cb.submit(s, f, 10) for s, f in zip(rows[4:], plan[4:])]
        t.join(60)
        answers = [f.result(timeout=60) for f in futs]
        assert eng.mllm.peft is not None  # the router's adapter stays attached and active between calls
        late = cb.submit(rows[0], plan[0], 10)
        assert late.result(timeout=60) == want_answers[0]
    assert not errors and got_routes == [want_routes] * 3
    assert answers == want_answers
