"""Fused GPU kernels (Triton) for the Llama decoder's memory-bound steps, with transformers' math as fallback.

A 7B prefill spends ~40% of its GPU time outside the matrix products (H100 profile, BENCHMARKS.md): the
RMSNorm is six float32 passes over the activations, rotary embedding four multiplies, a negation and a
concatenation on strided views, the SwiGLU two passes. Each kernel here does its step in one pass and
reproduces transformers' rounding (bf16 after every operation that rounds there), so results stay within
one bf16 step of the plain model's, almost all of them bitwise equal (``tests/gpu/test_fastpaths.py``).

Training: under autograd each fused step is a ``torch.autograd.Function`` whose backward is one kernel too
(RMSNorm: the input's gradient from the saved input, the frozen scale takes none; SwiGLU: both inputs' gradients
in one pass; rotary embedding: the same rotation by ``-sin``). The backward kernels compute in float32 and round
once, so gradients are within bf16 rounding of eager autograd's (``tests/gpu/test_fastpaths.py``).

Every function falls back to the reference formula (transformers' own) on the CPU, without Triton, when a
gradient is needed that the kernels do not give (a trainable RMSNorm scale), for layouts it does not cover, and
for good once a kernel failed to compile or launch (with a warning; :data:`FAILED` says why).
"""

from __future__ import annotations

import warnings

import torch

try:  # Triton ships with CUDA builds of torch; CPU installs do not have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


#: Smallest input (elements) that takes a fused kernel. Below it a step is bound by kernel launches rather than
#: memory traffic, so fusing saves little and a Triton launch's Python argument handling is the larger cost: a
#: 7B decode batch (64 x 4096) stays on the eager path, a prefill (64 x 637 x 4096) takes the kernels. (Decode
#: step times on the H100 were too noisy across processes, 35-56 ms, to measure the threshold's own effect.)
MIN_ELEMENTS = 1 << 21


#: Set to the first error when a kernel fails to compile or launch (an unsupported GPU, a Triton bug): from then
#: on every call takes the reference path, so a model stays correct, only slower.
FAILED: list[str] = []


def _failed(name: str, err: Exception) -> None:
    if not FAILED:
        FAILED.append(f"{name}: {type(err).__name__}: {err}"[:400])
        warnings.warn(f"fused kernel {FAILED[0]}; using transformers' math from now on", RuntimeWarning, stacklevel=3)


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels can run on these tensors (CUDA, Triton present, no kernel failed, the first one
    at least :data:`MIN_ELEMENTS` large)."""
    return not (triton is None or FAILED or not all(t.is_cuda for t in tensors)
                or tensors[0].numel() < max(1, MIN_ELEMENTS))


def _grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on these tensors."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ---------------------------------------------------------------- references (transformers' Llama math)
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm.forward``: normalise in float32, round to the input dtype, then scale."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary_pos_emb``: ``x * cos + rotate_half(x) * sin`` for queries and keys."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The SwiGLU middle of ``LlamaMLP``: ``silu(gate) * up``."""
    return torch.nn.functional.silu(gate) * up


# ---------------------------------------------------------------- Triton kernels
if triton is not None:

    @triton.jit
    def _round(x, MODE: tl.constexpr):
        """Round float32 ``x`` to the tensor dtype and back, as an eager op's output does (MODE 0: float32,
        1: bfloat16, round to nearest even on the bits, 2: float16)."""
        if MODE == 1:
            u = x.to(tl.uint32, bitcast=True)
            u = u + (0x7FFF + ((u >> 16) & 1))
            return ((u >> 16) << 16).to(tl.float32, bitcast=True)
        elif MODE == 2:
            return x.to(tl.float16).to(tl.float32)
        else:
            return x

    @triton.jit
    def _rms_norm_kernel(X, W, Y, stride_x, stride_y, N, eps, BLOCK: tl.constexpr, MODE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        h = _round(x * r, MODE)  # transformers rounds before the scale
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (w * h).to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _rms_norm_bwd_kernel(X, W, DY, DX, stride_x, stride_dy, stride_dx, N, eps, BLOCK: tl.constexpr,
                             MODE: tl.constexpr):
        """``dx`` of ``y = w * round(x * rsqrt(mean(x²) + eps))`` (the scale ``w`` frozen): with ``g = round(dy * w)``
        and ``x̂ = x * r``, ``dx = r * (g - x̂ * mean(g * x̂))``, float32 throughout, rounded once."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        g = _round(tl.load(DY + row * stride_dy + cols, mask=m, other=0.0).to(tl.float32) * w, MODE)
        xh = x * r
        dx = r * (g - xh * (tl.sum(g * xh, axis=0) / N))
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_heads(X, O, b, l, sxb, sxh, sxl, sob, soh, sol, H, c1, c2, s1, s2, HALF: tl.constexpr, BH: tl.constexpr,
                    MODE: tl.constexpr):
        h = tl.arange(0, BH)[:, None]
        d = tl.arange(0, HALF)[None, :]
        m = h < H
        src = X + b * sxb + l * sxl + h * sxh + d
        x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
        ty = O.dtype.element_ty
        # x*cos + rotate_half(x)*sin, rounded after each multiply and the add, as eager bf16 does
        o1 = _round(_round(x1 * c1, MODE) + _round(-x2 * s1, MODE), MODE).to(ty)
        o2 = _round(_round(x2 * c2, MODE) + _round(x1 * s2, MODE), MODE).to(ty)
        dst = O + b * sob + l * sol + h * soh + d
        tl.store(dst, o1, mask=m)
        tl.store(dst + HALF, o2, mask=m)

    @triton.jit
    def _rope_kernel(Q, K, QO, KO, C, S, L, Hq, Hk,
                     sqb, sqh, sql, skb, skh, skl, soqb, soqh, soql, sokb, sokh, sokl, scb, scl,
                     HALF: tl.constexpr, BH: tl.constexpr, MODE: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        b, l = pid // L, pid % L
        d = tl.arange(0, HALF)[None, :]
        cs = C + b * scb + l * scl + d
        ss = S + b * scb + l * scl + d
        c1 = tl.load(cs).to(tl.float32)
        c2 = tl.load(cs + HALF).to(tl.float32)
        s1 = tl.load(ss).to(tl.float32)
        s2 = tl.load(ss + HALF).to(tl.float32)
        _rope_heads(Q, QO, b, l, sqb, sqh, sql, soqb, soqh, soql, Hq, c1, c2, s1, s2, HALF, BH, MODE)
        _rope_heads(K, KO, b, l, skb, skh, skl, sokb, sokh, sokl, Hk, c1, c2, s1, s2, HALF, BH, MODE)

    @triton.jit
    def _silu_mul_kernel(G, U, Y, n, BLOCK: tl.constexpr, MODE: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
        s = _round(g / (1.0 + tl.exp(-g)), MODE)
        tl.store(Y + offs, _round(s * u, MODE).to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _silu_mul_bwd_kernel(G, U, DY, DG, DU, n, BLOCK: tl.constexpr, MODE: tl.constexpr):
        """``y = silu(g) * u``: ``du = dy * silu(g)``, ``dg = dy * u * σ(g) * (1 + g * (1 - σ(g)))``."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-g))
        tl.store(DU + offs, (dy * _round(g * sig, MODE)).to(DU.dtype.element_ty), mask=m)
        tl.store(DG + offs, (_round(dy * u, MODE) * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=m)


# ---------------------------------------------------------------- entry points
_MODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    N = x.shape[-1]
    x2 = _rows(x, N)
    y = torch.empty((x2.shape[0], N), dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(N)
    _rms_norm_kernel[(x2.shape[0],)](x2, weight.contiguous(), y, x2.stride(0), y.stride(0), N, float(eps),
                                     BLOCK=block, MODE=_MODE[x.dtype], num_warps=8 if block >= 4096 else 4)
    return y.view(x.shape)


def _rms_norm_bwd(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, eps: float) -> torch.Tensor:
    N = x.shape[-1]
    x2, dy2 = _rows(x, N), _rows(dy, N)
    dx = torch.empty((x2.shape[0], N), dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(N)
    _rms_norm_bwd_kernel[(x2.shape[0],)](x2, weight.contiguous(), dy2, dx, x2.stride(0), dy2.stride(0), dx.stride(0),
                                         N, float(eps), BLOCK=block, MODE=_MODE[x.dtype],
                                         num_warps=8 if block >= 4096 else 4)
    return dx.view(x.shape)


class _RMSNorm(torch.autograd.Function):
    """Fused RMSNorm with a fused backward for the input (the scale is frozen)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return _rms_norm_fwd(x, weight, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        return _rms_norm_bwd(x, weight, dy, ctx.eps), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (one pass per row on the GPU; under autograd one more for the input's
    gradient, when the scale is frozen)."""
    N = x.shape[-1]
    if (not usable(x, weight) or x.dtype not in _MODE or weight.dtype != x.dtype or weight.shape != (N,)
            or N > 65536 or (weight.requires_grad and torch.is_grad_enabled())):
        return rms_norm_ref(x, weight, eps)
    try:
        return _RMSNorm.apply(x, weight, eps) if _grad(x) else _rms_norm_fwd(x, weight, eps)
    except Exception as e:  # noqa: BLE001 - any compile/launch failure: stay correct
        _failed("rms_norm", e)
        return rms_norm_ref(x, weight, eps)


def _rope_launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    B, Hq, L, D = q.shape
    Hk = k.shape[1]
    qo, ko = torch.empty_like(q), torch.empty_like(k)  # same strides as the inputs (dense views)
    if qo.stride(-1) != 1 or ko.stride(-1) != 1:
        qo, ko = q.new_empty(q.shape), k.new_empty(k.shape)
    scb = cos.stride(0) if cos.shape[0] > 1 else 0
    _rope_kernel[(B * L,)](q, k, qo, ko, cos, sin, L, Hq, Hk,
                           q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                           qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
                           scb, cos.stride(1), HALF=D // 2, BH=triton.next_power_of_2(max(Hq, Hk)),
                           MODE=_MODE[q.dtype], num_warps=4)
    return qo, ko


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _Rope(torch.autograd.Function):
    """Fused rotary embedding; its backward is the rotation by ``-sin`` (Llama's ``cos``/``sin`` repeat their
    first half, so the transposed rotation is the inverse one)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_launch(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        gq, gk = _rope_launch(_unit_last(dq), _unit_last(dk), cos, _unit_last(-sin))
        return gq, gk, None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of queries ``[B, Hq, L, D]`` and keys ``[B, Hk, L, D]`` (any strides with a unit
    last stride, e.g. the transposed projections) by ``cos``/``sin`` ``[B or 1, L, D]``, in one kernel."""
    if (not usable(q, k, cos, sin) or unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3
            or cos.shape != sin.shape or cos.stride() != sin.stride() or q.dtype != k.dtype
            or cos.dtype != q.dtype or q.dtype not in _MODE or _grad(cos, sin)):
        return rope_ref(q, k, cos, sin, unsqueeze_dim)
    B, Hq, L, D = q.shape
    if (k.shape[0] != B or k.shape[2:] != (L, D) or D % 2 or cos.shape[1:] != (L, D) or cos.shape[0] not in (1, B)
            or (D // 2) & (D // 2 - 1) or q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1):
        return rope_ref(q, k, cos, sin, unsqueeze_dim)
    try:
        # Under autograd the backward is the inverse rotation, which needs cos/sin to repeat their first half, as
        # Llama's rotary embedding makes them (cat(freqs, freqs)); only Llama's attention is patched to come here.
        return _Rope.apply(q, k, cos, sin) if _grad(q, k) else _rope_launch(q, k, cos, sin)
    except Exception as e:  # noqa: BLE001
        _failed("apply_rope", e)
        return rope_ref(q, k, cos, sin, unsqueeze_dim)


def _silu_mul_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(gate)
    n = gate.numel()
    _silu_mul_kernel[(triton.cdiv(n, 2048),)](gate, up, y, n, BLOCK=2048, MODE=_MODE[gate.dtype], num_warps=8)
    return y


class _SiluMul(torch.autograd.Function):
    """Fused SwiGLU middle with both inputs' gradients in one backward pass."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _silu_mul_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _silu_mul_bwd_kernel[(triton.cdiv(n, 2048),)](gate, up, dy, dg, du, n, BLOCK=2048, MODE=_MODE[gate.dtype],
                                                      num_warps=8)
        return dg, du


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in one pass (and one more for both gradients under autograd)."""
    if (not usable(gate, up) or gate.shape != up.shape or gate.dtype != up.dtype or gate.dtype not in _MODE
            or not gate.is_contiguous() or not up.is_contiguous()):
        return silu_mul_ref(gate, up)
    try:
        return _SiluMul.apply(gate, up) if _grad(gate, up) else _silu_mul_fwd(gate, up)
    except Exception as e:  # noqa: BLE001
        _failed("silu_mul", e)
        return silu_mul_ref(gate, up)


# ---------------------------------------------------------------- patching a transformers Llama
def _norm_forward(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, module.weight, module.variance_epsilon)


def _mlp_forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module.down_proj(silu_mul(module.gate_proj(x), module.up_proj(x)))


#: transformers' own ``apply_rotary_pos_emb``, once :func:`_patch_rope` replaced it (None before)
ORIGINAL_ROPE = None


def _patch_rope() -> int:
    """Point the Llama attention's ``apply_rotary_pos_emb`` at :func:`apply_rope` (it looks the name up in its
    module at call time); 1 if patched now. Process-wide, but the same rounding as transformers' own, and the
    CPU and small (decode) inputs keep the original path."""
    global ORIGINAL_ROPE
    from transformers.models.llama import modeling_llama as ml

    original = getattr(ml, "apply_rotary_pos_emb", None)
    if ORIGINAL_ROPE is not None or original is None:
        return 0

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if args or set(kwargs) - {"unsqueeze_dim"} or not q.is_cuda:
            return original(q, k, cos, sin, *args, **kwargs)
        return apply_rope(q, k, cos, sin, kwargs.get("unsqueeze_dim", 1))

    ORIGINAL_ROPE = original
    ml.apply_rotary_pos_emb = apply_rotary_pos_emb
    return 1


def fuse_llama(model: torch.nn.Module) -> dict[str, int]:
    """Route a transformers Llama's RMSNorms, SwiGLU MLPs and rotary embedding through the fused kernels.

    Idempotent; returns how many modules of each kind were patched now. Modules keep their weights and
    hooks (LoRA hooks on the Linears still run); on the CPU they run the reference math.
    """
    counts = {"norms": 0, "mlps": 0, "rope": 0}
    llama = False
    for m in model.modules():
        kind = type(m).__name__
        llama |= kind == "LlamaAttention"
        if getattr(m, "_clsvc_fused", False):
            continue
        if kind == "LlamaRMSNorm":
            m.forward = _norm_forward.__get__(m)
        elif kind == "LlamaMLP" and m.config.hidden_act == "silu" and not getattr(m.config, "mlp_bias", False):
            m.forward = _mlp_forward.__get__(m)
        else:
            continue
        m._clsvc_fused = True
        counts["norms" if kind == "LlamaRMSNorm" else "mlps"] += 1
    if llama:
        counts["rope"] = _patch_rope()
    return counts
