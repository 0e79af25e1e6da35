"""Fused-kernel module on the CPU: its reference formulas are transformers' own, and a fused model falls back
to them exactly (the Triton kernels themselves are checked on the GPU, ``tests/gpu/test_fastpaths.py``)."""

import pytest
import torch
from transformers.models.llama import modeling_llama as ml

from cl_service.data.shards import ShardDataset
from cl_service.models import kernels
from cl_service.models.mllm import load_mllm

pytestmark = pytest.mark.timeout(120)


def test_references_are_transformers_math():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16) * 3
    norm = ml.LlamaRMSNorm(64, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    assert torch.equal(kernels.rms_norm_ref(x, norm.weight, 1e-5), norm(x))
    q = torch.randn(2, 7, 4, 16, dtype=torch.bfloat16).transpose(1, 2)  # [B, H, L, D] view, as attention makes it
    k = torch.randn(2, 7, 2, 16, dtype=torch.bfloat16).transpose(1, 2)
    cos, sin = torch.randn(2, 7, 16, dtype=torch.bfloat16), torch.randn(2, 7, 16, dtype=torch.bfloat16)
    original = kernels.ORIGINAL_ROPE or ml.apply_rotary_pos_emb
    for got, ref in zip(kernels.rope_ref(q, k, cos, sin), original(q, k, cos, sin)):
        assert torch.equal(got, ref)
    g, u = torch.randn(4, 32, dtype=torch.bfloat16), torch.randn(4, 32, dtype=torch.bfloat16)
    assert torch.equal(kernels.silu_mul_ref(g, u), torch.nn.functional.silu(g) * u)
    # the entry points take the reference path here: no GPU
    assert not kernels.usable(x)
    assert torch.equal(kernels.rms_norm(x, norm.weight, 1e-5), norm(x))
    assert torch.equal(kernels.silu_mul(g, u), kernels.silu_mul_ref(g, u))


def test_fused_model_on_cpu_is_unchanged_and_trains(tiny_base, dcl_shards):
    torch.set_num_threads(1)
    mllm = load_mllm(tiny_base)
    samples = ShardDataset(dcl_shards).samples("RS", "train")[:3]
    batch = mllm.collate(samples, train=True)
    with torch.no_grad():
        before = mllm(batch).logits
    layers = mllm.model.config.text_config.num_hidden_layers
    counts = mllm.fuse_kernels()
    assert counts["norms"] == 2 * layers + 1 and counts["mlps"] == layers
    assert kernels.ORIGINAL_ROPE is not None  # the attention's rotary function is routed through apply_rope now
    assert mllm.fuse_kernels() == {"norms": 0, "mlps": 0, "rope": 0}  # idempotent
    with torch.no_grad():
        assert torch.equal(mllm(batch).logits, before)
    assert mllm.generate(samples, max_new_tokens=3) == load_mllm(tiny_base).generate(samples, max_new_tokens=3)
    for p in mllm.model.parameters():
        p.requires_grad_(True)
    loss = mllm.loss(batch)  # autograd still flows through the patched modules
    loss.backward()
    grads = [p.grad for p in mllm.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_a_failing_kernel_falls_back_for_good(monkeypatch):
    """A kernel that cannot compile or launch (here: forced onto the CPU, where Triton cannot run) leaves the
    reference result, a warning, and every later call on the reference path."""
    monkeypatch.setattr(kernels, "FAILED", [])
    monkeypatch.setattr(kernels, "usable", lambda *t: not kernels.FAILED)  # as if on a GPU
    x, w = torch.randn(4, 64), torch.randn(64)
    with pytest.warns(RuntimeWarning, match="rms_norm"):
        y = kernels.rms_norm(x, w, 1e-6)
    assert torch.equal(y, kernels.rms_norm_ref(x, w, 1e-6)) and kernels.FAILED
    g, u = torch.randn(8, 16), torch.randn(8, 16)
    assert torch.equal(kernels.silu_mul(g, u), kernels.silu_mul_ref(g, u))  # no second attempt, no warning
    assert len(kernels.FAILED) == 1
