"""The batch splitting shared by both serving paths: results come back in request order."""

import torch

from cl_service.data.schema import Sample
from cl_service.serve.twostage import answer_grouped, cat_states, per_sample_states, route_grouped


def _s(i: int, images: int = 1) -> Sample:
    return Sample("T", "test", f"s{i}", [b"x"] * images, f"q{i}", ["a"], "t")


def test_route_grouped_calls_once_per_key_and_keeps_order():
    samples = [_s(i) for i in range(5)]
    keys = ["a", "b", "a", "c", "b"]
    states = [torch.full((1, 2), float(i)) for i in range(5)]
    calls = []

    def route(group, key, vs):
        calls.append((key, [s.id for s in group], vs[:, 0, 0].tolist() if vs is not None else None))
        return [f"{key}:{s.id}" for s in group]

    assert route_grouped(samples, keys, [v.unsqueeze(1) for v in states], route) == \
        ["a:s0", "b:s1", "a:s2", "c:s3", "b:s4"]
    assert calls == [("a", ["s0", "s2"], [0.0, 2.0]), ("b", ["s1", "s4"], [1.0, 4.0]), ("c", ["s3"], [3.0])]
    assert route_grouped(samples[:2], ["a", "a"], None, route) == ["a:s0", "a:s1"]
    assert calls[-1][2] is None


def test_answer_grouped_one_call_per_length_and_states_follow_their_rows():
    samples = [_s(0), _s(1, images=2), _s(2)]
    vs = torch.arange(4, dtype=torch.float32).view(4, 1, 1)  # 1 + 2 + 1 images
    states = per_sample_states(vs, samples)
    assert [v.shape[0] for v in states] == [1, 2, 1]

    class Engine:
        calls = []

        def answer_mixed(self, samples, adapters, n, vision_states=None, on_token=None):
            self.calls.append((n, [s.id for s in samples], adapters, vision_states.flatten().tolist()))
            return [f"{a}/{n}/{s.id}" for s, a in zip(samples, adapters)]

    eng = Engine()
    out = answer_grouped(eng, samples, ["x", "y", "x"], [4, None, 4], states)
    assert out == ["x/4/s0", "y/None/s1", "x/4/s2"]
    assert eng.calls == [(4, ["s0", "s2"], ["x", "x"], [0.0, 3.0]), (None, ["s1"], ["y"], [1.0, 2.0])]
    assert cat_states([None, states[0]]) is None and cat_states([]) is None


def test_isolated_runs_a_failed_batch_row_by_row_and_run_rows_keeps_refused_rows_out():
    from cl_service.serve.twostage import isolated, run_rows

    calls = []

    def fn(items):
        calls.append(list(items))
        if 13 in items:
            raise ValueError("row 13 is bad")
        return [x * 10 for x in items]

    out = isolated(fn, [1, 13, 2])
    assert out[0] == 10 and out[2] == 20 and isinstance(out[1], ValueError) and "row 13" in str(out[1])
    assert calls == [[1, 13, 2], [1], [13], [2]]
    assert isolated(fn, [1, 2]) == [10, 20] and calls[-1] == [1, 2]  # no failure: one call
    assert isolated(lambda items: items[:-1], [1, 2])[0].args[0].startswith("batched call returned 0 results")
    refused = KeyError("refused")
    calls.clear()
    assert run_rows(fn, [1, 2, 3], [None, refused, None]) == [10, refused, 30] and calls == [[1, 3]]
    assert run_rows(fn, [1], [refused]) == [refused] and calls == [[1, 3]]  # nothing left to run
