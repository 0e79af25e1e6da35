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

        def answer_mixed(self, samples, adapters, n, vision_states=None):
            self.calls.append((n, [s.id for s in samples], adapters, vision_states.flatten().tolist()))
            return [f"{a}/{n}/{s.id}" for s, a in zip(samples, adapters)]

    eng = Engine()
    out = answer_grouped(eng, samples, ["x", "y", "x"], [4, None, 4], states)
    assert out == ["x/4/s0", "y/None/s1", "x/4/s2"]
    assert eng.calls == [(4, ["s0", "s2"], ["x", "x"], [0.0, 3.0]), (None, ["s1"], ["y"], [1.0, 2.0])]
    assert cat_states([None, states[0]]) is None and cat_states([]) is None
