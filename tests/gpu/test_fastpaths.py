"""GPU fast paths agree with the plain implementation within bf16 tolerance (skipped without a GPU).

Run on the device by ``bench/device.sh``; the same code is unit-tested on the CPU in float32
(``tests/unit/engine/test_multilora.py``, ``tests/unit/train``).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BF16_REL = 2e-2  # bf16 operands: errors between 1e-3 and 1e-2 relative


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_multilora_paths_agree_bf16():
    """Uniform, gather (prefill) and one-hot (decode) LoRA updates == a float64 per-row reference."""
    from cl_service.engine.multilora import MultiLoRA, RowPlan

    torch.manual_seed(0)
    S, r, d_in, d_out, B = 5, 16, 256, 384, 12
    ml = MultiLoRA.__new__(MultiLoRA)
    A = torch.randn(S * r, d_in, device="cuda", dtype=torch.bfloat16) / d_in ** 0.5
    Bt = torch.randn(S * r, d_out, device="cuda", dtype=torch.bfloat16) / r ** 0.5
    A[:r] = 0
    Bt[:r] = 0
    idx = torch.randint(0, S, (B,), device="cuda")
    oh = torch.zeros(B, S, device="cuda", dtype=torch.bfloat16)
    oh[torch.arange(B), idx] = 1
    plan = RowPlan(stacks={}, rank=r, vision=False, idx=idx, uniform=None, onehot=oh.repeat_interleave(r, 1).unsqueeze(1))
    for L in (1, 7):  # L == 1 and B >= S: one-hot path; L > 1: gather path
        x = torch.randn(B, L, d_in, device="cuda", dtype=torch.bfloat16)
        got = ml.delta(x, A, Bt, plan=plan)
        ref = torch.stack([x[b].double() @ A.double().view(S, r, d_in)[idx[b]].T @ Bt.double().view(S, r, d_out)[idx[b]]
                           for b in range(B)])
        assert _rel(got, ref) < BF16_REL, L
    plan.uniform = 3
    x = torch.randn(B, 7, d_in, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ A.double()[3 * r:4 * r].T @ Bt.double()[3 * r:4 * r]
    assert _rel(ml.delta(x, A, Bt, plan=plan), ref) < BF16_REL


def test_mixed_logits_match_peft_bf16(tiny_base, tmp_path):
    """A mixed batch through the stacked adapters vs peft one adapter at a time, bf16 on the GPU."""
    from cl_service.adapters.lora import LoraCfg, attach_lora, remove_lora, save_adapter
    from cl_service.adapters.registry import finalize_adapter
    from cl_service.data.synth import BENCHMARKS
    from cl_service.engine.engine import Engine
    from cl_service.models.mllm import load_mllm

    mllm = load_mllm(tiny_base, dtype="float32", device="cuda")
    folders = []
    for i in range(3):
        params = attach_lora(mllm, LoraCfg(rank=8, alpha=16.0, dropout=0.0), "x", seed=i)
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p) * 0.2)
        folders.append(str(save_adapter(mllm, tmp_path / f"a{i}", "x")))
        finalize_adapter(folders[-1], id=f"a{i}", kind="expert", task="t", description="", base="b", job_key="k")
        remove_lora(mllm)
    samples = list(BENCHMARKS.get("dcl-mini").generate("test", 2, 0))[:6]
    plan = [folders[0], None, folders[1], folders[2], folders[0], folders[1]]

    def peft_logits(eng):
        return torch.cat([eng._run(f, lambda s=s: eng._first_logits([s])) for f, s in zip(plan, samples)])

    ref = peft_logits(Engine(mllm))  # float32 reference
    remove_lora(mllm)
    mllm.model.to(torch.bfloat16)
    eng = Engine(mllm)
    mixed = eng._last_logits_mixed(samples, plan)
    peft_bf16 = peft_logits(eng)
    # The stacked path is as close to the float32 reference as peft itself is in bf16.
    assert _rel(mixed, ref) < max(2 * _rel(peft_bf16, ref), BF16_REL), (_rel(mixed, ref), _rel(peft_bf16, ref))
    assert (mixed.argmax(-1) == ref.argmax(-1)).float().mean() >= 5 / 6


def test_autocast_training_matches_plain_bf16(tiny_base, monkeypatch):
    """The training fast path (autocast, no fp32 input copies, fused AdamW; then also the fused norm / rotary /
    SwiGLU kernels with their backward) computes the same loss and adapter gradients as the plain path (peft's
    fp32 LoRA matmuls) within bf16 tolerance."""
    from cl_service.adapters.lora import LoraCfg, attach_lora, set_input_casting
    from cl_service.data.synth import BENCHMARKS
    from cl_service.models import kernels
    from cl_service.models.mllm import load_mllm

    monkeypatch.setattr(kernels, "MIN_ELEMENTS", 0)  # the tiny model's tensors all take the kernels when fused
    samples = list(BENCHMARKS.get("dcl-mini").generate("train", 2, 0))[:8]
    out = {}
    for fast in (False, True, "fused"):
        mllm = load_mllm(tiny_base, dtype="bfloat16", device="cuda")
        if fast == "fused":
            assert mllm.fuse_kernels()["norms"] > 0
        params = attach_lora(mllm, LoraCfg(rank=8, alpha=16.0, dropout=0.0), "job", seed=0)
        with torch.no_grad():  # B != 0 so that A gets gradients too
            for n, p in mllm.model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(p) * 0.05)
        assert all(p.dtype == torch.float32 for n, p in mllm.model.named_parameters() if "lora_" in n)
        batch = mllm.collate(samples, train=True)
        if fast:
            set_input_casting(mllm, False)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = mllm.loss(batch)
        else:
            loss = mllm.loss(batch)
        loss.backward()
        out[fast] = (loss.detach().float(), torch.cat([p.grad.flatten().float() for p in params]))
    for fast in (True, "fused"):
        assert abs(float(out[fast][0] - out[False][0])) / abs(float(out[False][0])) < 1e-2
        assert _rel(out[fast][1], out[False][1]) < 5e-2
    # the fused kernels add no more error than autocast itself did
    assert _rel(out["fused"][1], out[True][1]) < 5e-2
    assert not kernels.FAILED


def test_fused_kernel_gradients_match_autograd_bf16(monkeypatch):
    """Each fused kernel's backward against eager autograd through transformers' formula: input gradients within
    bf16 rounding (the kernels compute in float32 and round once; eager rounds after every op)."""
    from transformers.models.llama import modeling_llama as ml

    from cl_service.models import kernels

    monkeypatch.setattr(kernels, "MIN_ELEMENTS", 0)
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16

    def grads(fn, *xs):
        xs = [x.detach().clone().requires_grad_(True) for x in xs]
        outs = fn(*xs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, [torch.randn_like(o, generator=None) * 0 + dy for o, dy in zip(outs, dys(outs))])
        return outs, [x.grad for x in xs]

    cache: dict = {}

    def dys(outs):  # the same upstream gradients for both paths
        key = tuple(o.shape for o in outs)
        if key not in cache:
            cache[key] = [torch.randn(o.shape, device=dev, dtype=o.dtype) for o in outs]
        return cache[key]

    x, w = torch.randn(3, 37, 4096, device=dev, dtype=bf) * 3, torch.randn(4096, device=dev, dtype=bf)
    (yo,), (gx,) = grads(lambda a: kernels.rms_norm(a, w, 1e-5), x)
    (yr,), (rx,) = grads(lambda a: kernels.rms_norm_ref(a, w, 1e-5), x)
    _bf16_step_close(yo, yr, 0.99)
    assert _rel(gx.float(), rx.float()) < 1e-2

    g, u = torch.randn(5, 11008, device=dev, dtype=bf) * 4, torch.randn(5, 11008, device=dev, dtype=bf)
    _, (gg, gu) = grads(kernels.silu_mul, g, u)
    _, (rg, ru) = grads(kernels.silu_mul_ref, g, u)
    assert _rel(gg.float(), rg.float()) < 1e-2 and _rel(gu.float(), ru.float()) < 1e-2

    original = kernels.ORIGINAL_ROPE or ml.apply_rotary_pos_emb
    cfg = ml.LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8)
    rot = ml.LlamaRotaryEmbedding(cfg).to(dev)
    B, L = 2, 29
    q = torch.randn(B, L, 32 * 128, device=dev, dtype=bf).view(B, L, 32, 128).transpose(1, 2)
    k = torch.randn(B, L, 8 * 128, device=dev, dtype=bf).view(B, L, 8, 128).transpose(1, 2)
    cos, sin = rot(q, torch.arange(L, device=dev)[None].expand(B, L))
    _, (fq, fk) = grads(lambda a, b: kernels.apply_rope(a, b, cos, sin), q, k)
    _, (oq, ok) = grads(lambda a, b: original(a, b, cos, sin), q, k)
    assert _rel(fq.float(), oq.float()) < 1e-2 and _rel(fk.float(), ok.float()) < 1e-2
    assert not kernels.FAILED


def test_pipelined_two_stage_equals_sequential_on_two_streams(tiny_base, tmp_path):
    """Route and answer with two batches in flight, each stage on its own CUDA stream: the same routes and
    answers as the same batches one after another (stream ordering and the per-thread row plans hold)."""
    from cl_service.adapters.lora import LoraCfg, attach_lora, remove_lora, save_adapter
    from cl_service.adapters.registry import finalize_adapter
    from cl_service.data.synth import BENCHMARKS
    from cl_service.engine.engine import Engine
    from cl_service.engine.pipeline import Pipeline
    from cl_service.models.mllm import load_mllm
    from cl_service.routers.prompt import Pool

    mllm = load_mllm(tiny_base, dtype="float32", device="cuda")
    folders = {}
    for i, name in enumerate(["e1", "e2", "e3", "router"]):
        params = attach_lora(mllm, LoraCfg(rank=8, alpha=16.0, dropout=0.0), "x", seed=i)
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p) * 0.3)
        folders[name] = str(save_adapter(mllm, tmp_path / name, "x"))
        finalize_adapter(folders[name], id=name, kind="expert", task=name, description="", base="b", job_key=name)
        remove_lora(mllm)
    pool = Pool(("e1", "e2", "e3"), ("a: first", "b: second", "c: third"))
    eng = Engine(mllm, fused_lora=True)
    eng.router_max_new_tokens = 1

    def stage1(items):
        vs = eng.vision_states(items)
        return vs, [r.expert for r in eng.route_mllm(items, folders["router"], pool, vision_states=vs)]

    def stage2(items, mid):
        vs, chosen = mid
        return list(zip(chosen, eng.answer_mixed(items, [folders[e] for e in chosen], 6, vision_states=vs)))

    reqs = list(BENCHMARKS.get("dcl-mini").generate("test", 8, 1))[:40]
    with Pipeline(stage1, stage2, device="cuda", max_batch=8) as p:
        piped = p.map(reqs, timeout_s=120)
    sizes = [n for s, _, _, n in p.log if s == 1]
    sequential, i = [], 0
    for n in sizes:
        sequential += stage2(reqs[i:i + n], stage1(reqs[i:i + n]))
        i += n
    assert len({e for e, _ in sequential}) >= 2
    assert piped == sequential


def _bf16_step_close(got: torch.Tensor, ref: torch.Tensor, equal_share: float) -> None:
    """Within one bf16 rounding step everywhere, and bitwise equal on at least ``equal_share`` of elements."""
    assert got.shape == ref.shape and got.dtype == ref.dtype
    diff = (got.float() - ref.float()).abs()
    assert bool((diff <= ref.float().abs() * 2 ** -7 + 1e-6).all()), float(diff.max())
    assert float((got == ref).float().mean()) >= equal_share


def test_fused_kernels_match_transformers_bf16(monkeypatch):
    """The Triton RMSNorm / rotary / SwiGLU kernels against transformers' eager math, within one bf16 step and
    almost all elements bitwise (rotary on strided query/key views, grouped KV heads, a batch-1 cos/sin, one
    decode token); small inputs take the eager path unless told otherwise."""
    from transformers.models.llama import modeling_llama as ml

    from cl_service.models import kernels

    assert kernels.triton is not None
    assert not kernels.usable(torch.zeros(64, 4096, device="cuda"))  # a decode batch: launch-bound, eager
    assert kernels.usable(torch.zeros(640, 4096, device="cuda"))
    monkeypatch.setattr(kernels, "MIN_ELEMENTS", 0)
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    for shape in ((5, 4096), (3, 37, 4096), (2, 1, 256)):
        x = torch.randn(shape, device=dev, dtype=bf) * 3
        w = torch.randn(shape[-1], device=dev, dtype=bf)
        _bf16_step_close(kernels.rms_norm(x, w, 1e-5), kernels.rms_norm_ref(x, w, 1e-5), 0.99)
    original = kernels.ORIGINAL_ROPE or ml.apply_rotary_pos_emb
    cfg = ml.LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8)
    rot = ml.LlamaRotaryEmbedding(cfg).to(dev)
    for B, L, cos_batch in ((3, 37, 3), (4, 1, 4), (2, 9, 1)):
        q = torch.randn(B, L, 32 * 128, device=dev, dtype=bf).view(B, L, 32, 128).transpose(1, 2)
        k = torch.randn(B, L, 8 * 128, device=dev, dtype=bf).view(B, L, 8, 128).transpose(1, 2)
        pos = torch.randint(0, 700, (cos_batch, L), device=dev)
        cos, sin = rot(q, pos)
        got, ref = kernels.apply_rope(q, k, cos, sin), original(q, k, cos, sin)
        for g, r in zip(got, ref):
            _bf16_step_close(g, r, 0.999)
    g, u = torch.randn(7, 11008, device=dev, dtype=bf) * 4, torch.randn(7, 11008, device=dev, dtype=bf)
    _bf16_step_close(kernels.silu_mul(g, u), kernels.silu_mul_ref(g, u), 0.99)
    x = torch.randn(4, 64, device=dev, requires_grad=True)  # autograd: the reference path, gradients flow
    kernels.rms_norm(x, torch.ones(64, device=dev), 1e-6).sum().backward()
    assert x.grad is not None
    assert not kernels.FAILED  # every comparison above ran the Triton kernels, not the fallback


def test_fused_model_matches_plain_bf16(tiny_base, monkeypatch):
    """A bf16 model with fused kernels: last-token logits within bf16 tolerance of the plain model's, and the
    same greedy answers."""
    from cl_service.data.synth import BENCHMARKS
    from cl_service.models import kernels
    from cl_service.models.mllm import load_mllm

    monkeypatch.setattr(kernels, "MIN_ELEMENTS", 0)  # the tiny model's tensors all take the kernels

    samples = list(BENCHMARKS.get("dcl-mini").generate("test", 4, 2))[:16]
    plain = load_mllm(tiny_base, dtype="bfloat16", device="cuda")
    fused = load_mllm(tiny_base, dtype="bfloat16", device="cuda")
    assert fused.fuse_kernels()["mlps"] > 0
    batch = fused.collate(samples, train=False)
    with torch.no_grad():
        ref, got = plain(batch).logits[:, -1], fused(batch).logits[:, -1]
    assert _rel(got, ref) < BF16_REL
    a, b = plain.generate(samples, max_new_tokens=6), fused.generate(samples, max_new_tokens=6)
    assert sum(x == y for x, y in zip(a, b)) >= len(samples) - 1, (a, b)
    assert not kernels.FAILED
