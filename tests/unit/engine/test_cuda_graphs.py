"""CUDA-graph decoding on the CPU: the engine flag is a no-op there, and the static-buffer decode step that the
graphs capture (run uncaptured) answers exactly as the eager decode does. The capture itself is tested on a GPU
(``tests/gpu/test_cuda_graphs.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cl_service.engine.cudagraphs import GraphDecoder, batch_bucket, length_bucket, unsupported
from cl_service.engine.engine import Engine

pytestmark = pytest.mark.timeout(240)


def test_buckets():
    assert [batch_bucket(b) for b in (1, 2, 3, 5, 9, 33, 64, 65, 97, 128, 129, 200)] == \
        [1, 2, 4, 8, 16, 64, 64, 96, 128, 128, 192, 256]
    assert [length_bucket(n) for n in (1, 64, 65, 512, 513, 653, 1024, 1025, 3000)] == \
        [64, 64, 128, 512, 576, 704, 1024, 1152, 3072]
    for n in range(1, 5000, 7):  # never short, never more than 12.5% (or one 64-block) over
        assert n <= length_bucket(n) <= max(n * 1.125, n + 63) and length_bucket(n) % 64 == 0


def test_flag_is_a_noop_on_cpu(tiny_base, adapters, samples, monkeypatch):
    """cuda_graphs=True on the CPU: the same answers as False, no decoder built, nothing captured."""
    def no_capture(*a, **k):
        raise AssertionError("no CUDA graph may be captured on the CPU")

    monkeypatch.setattr(torch.cuda, "graph", no_capture)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", no_capture)
    folders = [adapters["e1"], None, adapters["e2"], adapters["e3"], adapters["e1"]]
    off = Engine(tiny_base, cuda_graphs=False)
    on = Engine(tiny_base, cuda_graphs=True)
    auto = Engine(tiny_base)
    assert auto.cuda_graphs == "auto"
    ref = off.answer_mixed(samples[:5], folders, 5)
    assert on.answer_mixed(samples[:5], folders, 5) == ref
    assert auto.answer_mixed(samples[:5], folders, 5) == ref
    assert on._graphs is None and auto._graphs is None
    with pytest.raises(ValueError, match="cuda_graphs"):
        Engine(on.mllm, cuda_graphs="yes")


def test_static_decode_step_equals_eager(tiny_base, adapters, samples):
    """The step the graphs capture, run uncaptured on its static buffers (padded rows, a fixed-length masked
    cache, slots from static buffers): the same answers as eager decoding, for batches of several sizes (none
    a bucket size but 1), mixed, single-adapter and base-only batches, both LoRA decode paths (a bucket
    smaller than the slot count gathers, a larger one takes the one-hot path), and after adapters change."""
    eager = Engine(tiny_base, cuda_graphs=False)
    static = Engine(tiny_base, cuda_graphs=True)
    assert unsupported(static.mllm) is None
    static._graphs = dec = GraphDecoder(static.mllm, static.multi, capture=False)
    names = ["e1", None, "e2", "vis", "e3", "e2", None, "e1", "e3", "e1"]
    plans = [names, names[:3], names[:5], ["e2"] * 6, [None] * 3, names[3:4]]  # all 4 loaded first: 5 slots
    for plan in plans:
        folders = [adapters[k] if k else None for k in plan]
        got = static.answer_mixed(samples[:len(plan)], folders, 6)
        assert got == eager.answer_mixed(samples[:len(plan)], folders, 6), plan
    assert dec.stats["sessions"] == len(plans) and dec.stats["eager_steps"] > 0
    assert {(b, lora) for b, _, lora in dec.graphs} >= {(4, True), (8, True), (16, True), (4, False), (1, True)}
    # answers of a run where every row differs from the one before (the static inputs are reset per batch)
    ref = eager.answer_mixed(samples[:5], [adapters["e3"]] * 5, 6)
    assert static.answer_mixed(samples[:5], [adapters["e3"]] * 5, 6) == ref
    # a dropped adapter rebuilds the stacks: entries of the old stacks go, the next batch uses the new ones
    old = [dec._graphs[k].plan.stacks for k in dec.graphs if k[2]]
    vis = str(Path(adapters["vis"]).resolve())
    static.multi.drop(vis)
    del static._multi_loaded[vis]
    folders = [adapters[k] for k in ("e1", "e2", "e3")]
    assert static.answer_mixed(samples[:3], folders, 6) == eager.answer_mixed(samples[:3], folders, 6)
    now = [dec._graphs[k].plan.stacks for k in dec.graphs if k[2]]
    assert now and all(st is now[0] for st in now) and not any(st is o for st in now for o in old)


def test_decoder_that_gives_up_at_its_first_step(tiny_base, samples):
    """A decoder whose first step returns None (a capture that failed): the batch decodes on eagerly, on the
    cache in the decoder's storage that the prefill filled, to the same answers."""
    import contextlib
    from types import SimpleNamespace

    from cl_service.models.generate import growing_cache
    from cl_service.models.mllm import load_mllm

    m = load_mllm(tiny_base)
    c = m.model.config.text_config
    H, D = c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    used = []

    class GiveUp:
        @contextlib.contextmanager
        def session(self, mask, n):
            B, L = mask.shape
            storage = [(torch.zeros(B + 3, H, L + n + 5, D), torch.zeros(B + 3, H, L + n + 5, D))
                       for _ in range(c.num_hidden_layers)]
            used.append(storage)
            yield SimpleNamespace(cache=growing_cache(L + n, storage), step=lambda *a: None)

    assert m.generate(samples[:4], 6, decoder=GiveUp()) == m.generate(samples[:4], 6)
    assert used and bool(used[0][0][0].abs().sum() > 0)  # the prefill wrote into the storage
