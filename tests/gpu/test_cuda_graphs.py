"""CUDA-graph decoding (``cl_service.engine.cudagraphs``) answers as eager decoding does (skipped without a GPU).

float32: identical greedy answers. bf16: identical token sequences, except that a row may first differ at a
step where eager decoding's two candidates were a near-tie: eager logit of eager's token minus eager logit of
the graph's token <= two bf16 steps at the row's largest logit (2 * 2**(floor(log2 max|logit|) - 7)), i.e.
within the rounding of one bf16 value on each side. Until rows differ, the graph step's logits stay within the
bf16 tolerance of the eager step's.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BF16_REL = 2e-2


def _experts(mllm, root, names, seed0=0):
    """Random LoRA experts (all decoder Linears, own projector) saved and registered like trained ones."""
    from cl_service.adapters.lora import LoraCfg, attach_lora, remove_lora, save_adapter
    from cl_service.adapters.registry import finalize_adapter

    out = []
    for i, name in enumerate(names):
        params = attach_lora(mllm, LoraCfg(rank=8, alpha=16.0, dropout=0.0), "x", seed=seed0 + i)
        g = torch.Generator(device="cuda").manual_seed(100 + seed0 + i)
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g, device="cuda").to(p.dtype) * 0.3)
        out.append(str(save_adapter(mllm, root / name, "x")))
        finalize_adapter(out[-1], id=name, kind="expert", task=name, description="", base="b", job_key=name)
        remove_lora(mllm)
    return out


def _samples(n):
    from cl_service.data.synth import BENCHMARKS

    return list(BENCHMARKS.get("dcl-mini").generate("test", 8, 1))[:n]


def _both(eng, samples, folders, n):
    eng.cuda_graphs = False
    ref = eng.answer_mixed(samples, folders, n)
    eng.cuda_graphs = True
    return eng.answer_mixed(samples, folders, n), ref


def test_graph_answers_equal_eager_fp32(tiny_base, tmp_path):
    """Mixed, single-adapter and base-only batches of bucket and non-bucket sizes: identical answers; each
    shape is captured once and replayed afterwards; a batch that finds the graphs busy decodes eagerly."""
    from cl_service.engine.engine import Engine
    from cl_service.models.mllm import load_mllm

    mllm = load_mllm(tiny_base, dtype="float32", device="cuda")
    folders = _experts(mllm, tmp_path, ["a", "b", "c"])
    eng = Engine(mllm, fused_lora=True)
    assert eng.cuda_graphs == "auto"
    samples = _samples(40)
    mix = [folders[0], None, folders[1], folders[2], folders[1]]
    answers = set()
    for B in (1, 2, 3, 5, 8, 13, 33):
        plan = [mix[i % len(mix)] for i in range(B)]
        got, ref = _both(eng, samples[:B], plan, 8)
        assert got == ref, B
        answers |= set(ref)
    for plan in ([folders[2]] * 6, [None] * 7):
        got, ref = _both(eng, samples[:len(plan)], plan, 8)
        assert got == ref
    dec = eng._graphs
    assert dec is not None and dec.reason is None, dec.reason
    assert len(answers) > 10 and dec.stats["eager_steps"] == 0 and dec.stats["replays"] > 0
    captures = dec.stats["captures"]  # growing the static KV buffers (a larger bucket) dropped the earlier graphs
    assert captures >= len(dec.graphs) and dec.stats["arena_grown"] >= 2
    got, ref = _both(eng, samples[:33], [mix[i % 5] for i in range(33)], 8)  # the largest bucket: still held
    assert got == ref and dec.stats["captures"] == captures  # replayed, not captured again
    with dec._lock:  # another batch holds the graphs: this one decodes eagerly
        assert eng.answer_mixed(samples[:3], mix[:3], 8) == ref[:3]
    assert dec.stats["declined_busy"] == 1


def _trace(eng, samples, folders, n, graphs):
    """Per step, the logits ``[B, V]`` (float32) that chose each token: the prefill's, then each decode step's."""
    eng.cuda_graphs = True
    dec = eng._decoder()
    eng.cuda_graphs = graphs
    steps = []
    hook = eng.mllm.model.lm_head.register_forward_hook(
        lambda m, a, out: steps.append(out[:, -1].float().clone()) if out.dim() == 3 else None)  # not the graphs'
    orig = dec._step

    def step(g, B, tokens, positions, column):
        out = orig(g, B, tokens, positions, column)
        steps.append(out.float().clone())
        return out

    dec._step = step
    try:
        texts = eng.answer_mixed(samples, folders, n)
    finally:
        hook.remove()
        del dec._step
    return texts, steps


def test_graph_answers_bf16_within_one_step(tiny_base, tmp_path):
    from cl_service.engine.engine import Engine
    from cl_service.models.mllm import load_mllm

    mllm = load_mllm(tiny_base, dtype="bfloat16", device="cuda")
    folders = _experts(mllm, tmp_path, ["a", "b", "c"])
    eng = Engine(mllm, fused_lora=True)
    samples = _samples(24)
    plan = [[folders[0], None, folders[1], folders[2]][i % 4] for i in range(24)]
    rows_equal = rows = 0
    for B in (3, 11, 24):
        ref_texts, ref = _trace(eng, samples[:B], plan[:B], 8, graphs=False)
        got_texts, got = _trace(eng, samples[:B], plan[:B], 8, graphs=True)
        assert eng._graphs.stats["replays"] > 0 and eng._graphs.reason is None
        T = min(len(ref), len(got))
        tok_ref = torch.stack([x.argmax(-1) for x in ref[:T]], 1)  # [B, T]
        tok_got = torch.stack([x.argmax(-1) for x in got[:T]], 1)
        for b in range(B):
            rows += 1
            diff = (tok_ref[b] != tok_got[b]).nonzero()
            t = int(diff[0]) if len(diff) else T
            for s in range(min(t + 1, T)):  # same tokens so far: same inputs, so logits within bf16 tolerance
                rel = float((got[s][b] - ref[s][b]).norm() / ref[s][b].norm())
                assert rel < BF16_REL, (B, b, s, rel)
            if t == T:
                rows_equal += ref_texts[b] == got_texts[b]
                continue
            l = ref[t][b]
            gap = float(l[tok_ref[b, t]] - l[tok_got[b, t]])
            step = 2.0 ** (math.floor(math.log2(float(l.abs().max()))) - 7)
            assert 0 <= gap <= 2 * step, (B, b, t, gap, step)
    assert rows_equal >= rows * 3 // 4, (rows_equal, rows)


def test_new_adapter_is_captured_anew(tiny_base, tmp_path):
    """Loading an adapter rebuilds the stacks: the graphs of the old stacks are dropped, new ones captured,
    and rows of the new adapter get its answers."""
    from cl_service.engine.engine import Engine
    from cl_service.models.mllm import load_mllm

    mllm = load_mllm(tiny_base, dtype="float32", device="cuda")
    a, b = _experts(mllm, tmp_path, ["a", "b"])
    eng = Engine(mllm, fused_lora=True, cuda_graphs=True)
    samples = _samples(6)
    got, ref = _both(eng, samples, [a, b, None, a, b, a], 8)
    assert got == ref
    dec = eng._graphs
    old = [dec._graphs[k].plan.stacks for k in dec.graphs if k[2]]
    captures = dec.stats["captures"]
    (c,) = _experts(mllm, tmp_path, ["c"], seed0=7)
    got, ref = _both(eng, samples, [c, a, c, b, c, None], 8)
    assert got == ref
    assert dec.stats["captures"] > captures
    now = [dec._graphs[k].plan.stacks for k in dec.graphs if k[2]]
    assert now and not any(s is o for s in now for o in old)
    only_c, only_a = eng.answer_mixed(samples, [c] * 6, 8), eng.answer_mixed(samples, [a] * 6, 8)
    assert only_c != only_a
    assert [got[0], got[2], got[4]] == [only_c[0], only_c[2], only_c[4]]


def test_failed_capture_decodes_eagerly(tiny_base, tmp_path):
    """A capture that fails (here: made to) warns once, the batch decodes on eagerly from the cache its prefill
    filled, and later batches decline the graphs: the same answers throughout."""
    from cl_service.engine.engine import Engine
    from cl_service.models.mllm import load_mllm

    mllm = load_mllm(tiny_base, dtype="float32", device="cuda")
    a, b = _experts(mllm, tmp_path, ["a", "b"])
    eng = Engine(mllm, fused_lora=True)
    dec = eng._decoder()

    def fail(g):
        dec._forward(g)  # a warm-up that ran (it wrote the step's cache column) before the capture failed
        raise RuntimeError("operation not permitted when stream is capturing")

    dec._capture = fail
    samples, plan = _samples(5), [a, None, b, a, b]
    with pytest.warns(RuntimeWarning, match="CUDA-graph decoding off"):
        got, ref = _both(eng, samples, plan, 8)
    assert got == ref and dec.reason.startswith("capture failed") and dec.stats["replays"] == 0
    got, ref = _both(eng, samples, plan, 8)
    assert got == ref and dec.stats["declined_unsupported"] == 1
