"""CL-MoE's paper mechanisms on hand-made numbers: the momentum update between tasks, the task-level gate mixed into
every token gate with weight ``1 - beta``, and the task gate's statistic (top-k expert usage over real tokens)."""

import pytest
import torch

from cl_service.adapters.clmoe import gate_usage, momentum_merge
from cl_service.adapters.family import JobData
from cl_service.adapters.lora import LoraCfg
from cl_service.adapters.moelora import MoELoRA, MoELoRASpec

pytestmark = pytest.mark.timeout(120)

SPEC = MoELoRASpec.of(LoraCfg(rank=6, alpha=12, dropout=0.0, targets=("q", "down")), experts=3)


def test_momentum_update_is_the_formula_on_a_hand_made_example():
    """3 experts, top_k 1: the previous task used expert 0 most, the new one expert 2. Expert 0 is the previous
    task's and not the new one's: it keeps 1 - momentum of its old weights; experts 1 and 2 keep momentum."""
    old = {"L.A": torch.tensor([[[1.0]], [[2.0]], [[3.0]]]), "L.B": torch.tensor([[[10.0]], [[20.0]], [[30.0]]]),
           "L.gate": torch.tensor([[1.0], [1.0], [1.0]])}
    new = {"L.A": torch.tensor([[[5.0]], [[6.0]], [[7.0]]]), "L.B": torch.zeros(3, 1, 1),
           "L.gate": torch.tensor([[4.0], [5.0], [6.0]])}
    prev, cur = {"L": torch.tensor([0.6, 0.3, 0.1])}, {"L": torch.tensor([0.1, 0.2, 0.7])}
    out = momentum_merge(old, new, prev, cur, top_k=1, momentum=0.7)
    lam = torch.tensor([0.3, 0.7, 0.7])
    assert torch.allclose(out["L.A"].flatten(), lam * torch.tensor([1.0, 2, 3]) + (1 - lam) * torch.tensor([5.0, 6, 7]))
    assert torch.allclose(out["L.A"].flatten(), torch.tensor([0.3 * 1 + 0.7 * 5, 0.7 * 2 + 0.3 * 6, 0.7 * 3 + 0.3 * 7]))
    assert torch.allclose(out["L.B"].flatten(), lam * torch.tensor([10.0, 20, 30]))
    assert torch.equal(out["L.gate"], new["L.gate"])  # the gate keeps what it learned
    # top_k 2: {0, 1} before, {2, 1} now: only expert 0 left the task's experts
    out2 = momentum_merge(old, new, prev, cur, top_k=2, momentum=0.7)
    assert torch.allclose(out2["L.A"].flatten(), out["L.A"].flatten())
    same = momentum_merge(old, new, prev, prev, top_k=1, momentum=0.7)  # the same experts: momentum everywhere
    assert torch.allclose(same["L.A"].flatten(), 0.7 * torch.tensor([1.0, 2, 3]) + 0.3 * torch.tensor([5.0, 6, 7]))


def test_the_task_gate_is_mixed_into_every_token_gate_with_weight_one_minus_beta(build):
    m = build()
    moe = MoELoRA(m, SPEC, seed=3)
    name, _, layer = next(moe.linears())
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(2, 5, layer.A.shape[-1])
    per_expert = torch.einsum("eor,eri,bti->bteo", layer.B, layer.A, x) * (SPEC.alpha / SPEC.rank)  # [B, T, E, out]
    g = torch.softmax(x @ layer.gate.T, dim=-1)
    prior = torch.tensor([0.2, 0.0, 0.8])
    priors = {n: prior for n, _, _ in moe.linears()}
    with torch.no_grad():
        assert torch.allclose(layer.delta(x), (g[..., None] * per_expert).sum(2), atol=1e-6)  # the plain token gate
        moe.mix(priors, beta=0.25)
        want = ((0.25 * g + 0.75 * prior)[..., None] * per_expert).sum(2)
        assert torch.allclose(layer.delta(x), want, atol=1e-6)
        moe.mix(priors, beta=0.0)  # the task gate alone: the token gate's weights no longer matter
        before = layer.delta(x)
        layer.gate.normal_()
        assert torch.allclose(layer.delta(x), (prior[..., None] * per_expert).sum(2), atol=1e-6)
        assert torch.allclose(layer.delta(x), before, atol=1e-6)
        moe.mix(None)
        assert torch.allclose(layer.delta(x), (torch.softmax(x @ layer.gate.T, -1)[..., None] * per_expert).sum(2),
                              atol=1e-6)


def test_the_task_gate_statistic_is_the_share_of_real_tokens_whose_top_k_experts_include_each(build, samples):
    m = build()
    m.model.eval()
    moe = MoELoRA(m, SPEC, seed=5)
    data = JobData(samples, m.collate, batch_size=2)  # 3 samples of unequal length: padding in the first batch
    seen: dict[str, list] = {n: [] for n, _, _ in moe.linears()}
    hooks = [lin.register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(a[0].detach()))
             for n, lin, _ in moe.linears()]
    masks = [b["attention_mask"].bool() for b in data.batches()]
    with torch.no_grad():
        for b in data.batches():
            m.loss(b)
    for h in hooks:
        h.remove()
    usage = gate_usage(moe, m, data.batches(), top_k=2)
    for name, _, layer in moe.linears():
        xs = torch.cat([x[mask] for x, mask in zip(seen[name], masks)])  # real tokens only
        top = torch.softmax(xs @ layer.gate.T, -1).topk(2, -1).indices
        counts = torch.stack([(top == e).any(-1).sum() for e in range(3)]).float()
        assert torch.allclose(usage[name], counts / counts.sum(), atol=1e-6)
        assert abs(float(usage[name].sum()) - 1) < 1e-6
    assert sum(int(mk.numel() - mk.sum()) for mk in masks) > 0  # there was padding to leave out
    with pytest.raises(ValueError, match="top_k=4 must be between 1 and the 3 experts"):
        gate_usage(moe, m, data.batches(), top_k=4)
