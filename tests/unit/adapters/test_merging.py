"""Methods that merge a task's LoRA into the model after every task (SEFE's RegLoRA, KeepLoRA), kept as one peft
LoRA of stacked blocks: the stack is the merged model, earlier blocks never move, and each method's own terms on
hand-made numbers (SEFE's key positions and penalty; KeepLoRA's energy rule, frozen A and protected subspace)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from cl_service.adapters.keeplora import energy_count, extend, init_a, project_out, weight_subspace
from cl_service.adapters.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraCfg, attach_lora, load_adapter, \
    remove_lora, save_adapter
from cl_service.adapters.merged import Block, attach_stacked, block_cfg
from cl_service.adapters.sefe import KEY_POSITIONS, SEFE_CONFIG, key_penalty, pack_positions, unpack_positions, \
    union_key_positions

pytestmark = pytest.mark.timeout(120)

BLOCK = LoraCfg(rank=4, alpha=8.0, dropout=0.0)


def _perturb(params, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * (scale if p.dim() == 2 else 0.05))


@pytest.fixture
def stage0(build, tmp_path):
    """A saved first-task LoRA (decoder Linears + its projector copy), trained away from B = 0."""
    m = build()
    _perturb(attach_lora(m, BLOCK, "s0", seed=1), 7)
    save_adapter(m, tmp_path / "s0", "s0")
    return tmp_path / "s0"


def _logits(m, batch) -> torch.Tensor:
    m.model.eval()
    with torch.no_grad():
        return m.forward(batch).logits


def test_the_stacked_lora_is_the_model_merged_in_float32(build, samples, stage0, tmp_path):
    """Stage 1 = stage 0's block frozen + a new block: it starts as the model merged after stage 0 (new B = 0), and
    once trained it computes what the base with every block merged into its weights (W + s B_1 A_1 + s B_2 A_2, in
    float32) and the adapter's projector computes, up to float rounding."""
    batch = build().collate(samples[:4], train=True)
    m = build()
    params, found = attach_stacked(m, stage0, BLOCK, "job", seed=2)
    assert {b.r_old for b in found} == {4} and all(b.A.shape[0] == 8 for b in found)
    assert all(torch.equal(b.B[:, 4:], torch.zeros_like(b.B[:, 4:])) for b in found)
    prev = build()
    load_adapter(prev, stage0, "prev")
    assert torch.allclose(_logits(m, batch), _logits(prev, batch), atol=1e-6)  # starts as the merged model

    _perturb([b.B for b in found], 11)  # as if trained
    save_adapter(m, tmp_path / "s1", "job")
    cfg = json.loads((tmp_path / "s1" / ADAPTER_CONFIG).read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16.0  # alpha grows with the rank: every block keeps scale 2
    stacked = _logits(m, batch)

    merged = build()
    weights = dict(merged.model.named_modules())
    with torch.no_grad():
        for b in found:
            weights[b.name].weight.add_(2.0 * (b.B.float() @ b.A.float()))
        mine = {n.replace(".modules_to_save.job", ""): p for n, p in m.model.named_parameters() if ".modules_to_save.job." in n}
        for n, p in merged.model.named_parameters():
            if n in mine:
                p.copy_(mine[n])
    assert mine  # the projector copy came along
    got = _logits(merged, batch)
    assert not torch.allclose(got, _logits(build(), batch), atol=1e-3)  # the blocks do change the model
    assert (got - stacked).abs().max() < 1e-5


def test_lora_dropout_reaches_only_the_new_block_as_in_a_merged_model(build, samples, stage0):
    """In training mode with dropout 0.5, the earlier blocks act as the merged weights they stand for: with the new
    B = 0 the stack computes the merged model exactly (peft's dropout on the whole stack's input would drop out the
    earlier blocks' input too), while the new block's input is dropped out (two passes differ once it is non-zero).
    O-LoRA's stack (``merged_dropout=False``) keeps peft's dropout."""
    import dataclasses

    batch = build().collate(samples[:4], train=True)
    prev = build()
    load_adapter(prev, stage0, "prev")
    merged = _logits(prev, batch)
    m = build()
    _, found = attach_stacked(m, stage0, dataclasses.replace(BLOCK, dropout=0.5), "job", seed=2)
    m.model.train()
    with torch.no_grad():
        assert torch.allclose(m.forward(batch).logits, merged, atol=1e-5)
        _perturb([b.B for b in found], 11)
        one, two = m.forward(batch).logits, m.forward(batch).logits
    assert not torch.allclose(one, two, atol=1e-4)
    olora = build()
    attach_stacked(olora, stage0, dataclasses.replace(BLOCK, dropout=0.5), "job", seed=2, merged_dropout=False)
    olora.model.train()
    with torch.no_grad():
        assert not torch.allclose(olora.forward(batch).logits, merged, atol=1e-3)


def test_earlier_blocks_never_move_and_a_frozen_a_stays_as_set(build, samples, stage0):
    """AdamW steps (no weight decay) on the grown stack change only the new block (and the projector copy, which
    continues); with ``train_a=False`` no A is even a trainable parameter."""
    for train_a in (True, False):
        m = build()
        params, found = attach_stacked(m, stage0, BLOCK, "job", seed=2, train_a=train_a)
        assert (found[0].A.requires_grad, any(p is found[0].A for p in params)) == (train_a, train_a)
        before = {id(p): p.detach().clone() for b in found for p in (b.A, b.B)}
        proj = [p for p in params if p.dim() >= 1 and not any(p is q for b in found for q in (b.A, b.B))]
        proj_before = [p.detach().clone() for p in proj]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
        batch = m.collate(samples[:4], train=True)
        m.model.train()
        for _ in range(3):
            m.loss(batch).backward()
            opt.step()
            opt.zero_grad()
        for b in found:
            assert torch.equal(b.A[:4], before[id(b.A)][:4]) and torch.equal(b.B[:, :4], before[id(b.B)][:, :4])
            assert torch.equal(b.A[4:], before[id(b.A)][4:]) != train_a
        assert any(not torch.equal(b.B[:, 4:], before[id(b.B)][:, 4:]) for b in found)
        assert proj and all(not torch.equal(p, q) for p, q in zip(proj, proj_before))


def test_a_lora_of_another_scale_is_no_stack_of_blocks(build, stage0):
    with pytest.raises(ValueError, match="no stack of blocks of rank 4, alpha 16"):
        attach_stacked(build(), stage0, LoraCfg(rank=4, alpha=16.0), "job")
    with pytest.raises(ValueError, match="no stack of blocks of rank 3"):
        attach_stacked(build(), stage0, LoraCfg(rank=3, alpha=6.0), "job")


def test_block_cfg_takes_the_references_alpha_ratio_when_only_the_rank_is_set():
    base = LoraCfg(rank=16, alpha=20.0)
    assert block_cfg(base, None, None) is base
    assert (block_cfg(base, 32, None).rank, block_cfg(base, 32, None).alpha) == (32, 64.0)
    assert (block_cfg(base, None, 5.0).rank, block_cfg(base, None, 5.0).alpha) == (16, 5.0)


# ---------------------------------------------------------------------------------------------------- SEFE


def test_key_positions_pack_into_a_bitmask_and_back():
    idx = torch.tensor([0, 3, 8, 17, 36])
    packed = pack_positions(idx, 37)
    assert packed.dtype == torch.uint8 and packed.numel() == 5
    assert packed[0].item() == 0b1001 and packed[1].item() == 1  # bit i of byte j = entry 8j + i
    assert torch.equal(unpack_positions(packed, 37), idx)
    with pytest.raises(ValueError, match="past the matrix's 30 entries"):
        unpack_positions(packed, 30)


def _saved_stack(folder, a, b, earlier=None, shape=None) -> None:
    """A saved peft LoRA of one Linear ``model.x`` (rank = rows of ``a``), optionally with SEFE key positions."""
    folder.mkdir()
    save_file({"base_model.model.model.x.lora_A.weight": a.contiguous(), "base_model.model.model.x.lora_B.weight": b.contiguous()},
              str(folder / ADAPTER_WEIGHTS))
    (folder / ADAPTER_CONFIG).write_text(json.dumps({"r": a.shape[0], "lora_alpha": 2.0 * a.shape[0]}))
    if earlier is not None:
        save_file({"model.x": pack_positions(earlier, shape[0] * shape[1])}, str(folder / KEY_POSITIONS))
        (folder / SEFE_CONFIG).write_text(json.dumps({"shapes": {"model.x": list(shape)}}))


def test_key_positions_are_the_top_share_of_the_last_block_joined_with_the_earlier_ones(tmp_path):
    """A [4 x 5] Linear, blocks of rank 1, 10%: the last block's B A = b a^T with b = (1, 0, 0, 2), a = (0, 3, 0, 0,
    -1) has its two largest |entries| at (3, 1) = 6 and (0, 1) = 3 (flat 16 and 1); the earlier key positions were
    {1, 7}: the union is {1, 7, 16}. The first block (huge) is not the last task's and plays no part."""
    a = torch.tensor([[9.0, 9.0, 9.0, 9.0, 9.0], [0.0, 3.0, 0.0, 0.0, -1.0]])
    b = torch.tensor([[9.0, 1.0], [9.0, 0.0], [9.0, 0.0], [9.0, 2.0]])
    _saved_stack(tmp_path / "first", a[1:], b[:, 1:])
    assert union_key_positions(tmp_path / "first", 1, 0.1)["model.x"].tolist() == [1, 16]
    _saved_stack(tmp_path / "second", a, b, earlier=torch.tensor([1, 7]), shape=(4, 5))
    assert union_key_positions(tmp_path / "second", 1, 0.1)["model.x"].tolist() == [1, 7, 16]


def _block(name, a_new, b_new, r_old=2) -> Block:
    """A Block whose frozen earlier rank-``r_old`` part is random and whose new part is the given factors."""
    g = torch.Generator().manual_seed(0)
    a = torch.cat([torch.randn(r_old, a_new.shape[1], generator=g), a_new])
    b = torch.cat([torch.randn(b_new.shape[0], r_old, generator=g), b_new], dim=1)
    return Block(name, torch.nn.Parameter(a), torch.nn.Parameter(b), torch.nn.Parameter(torch.zeros(b.shape[0], a.shape[1])),
                 r_old)


def test_the_penalty_is_zero_off_the_key_positions_and_their_mean_abs_on_them():
    """With A_new = I the new block's B A is B_new itself: the penalty is the mean over Linears of the mean |B_new| at
    their key positions; entries off them change nothing and get no gradient."""
    eye = torch.eye(3)
    x = _block("x", eye, torch.tensor([[0.0, 0.0, 5.0], [1.0, -2.0, 7.0]]))
    y = _block("y", eye, torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    pos = {"x": torch.tensor([0, 1, 4]), "y": torch.tensor([5])}  # x: (0,0), (0,1), (1,1); y: (1,2)
    pen = key_penalty([x, y], pos)
    assert pen.item() == pytest.approx(((0 + 0 + 2) / 3 + 0 / 1) / 2)
    pen.backward()
    for blk, p in ((x, pos["x"]), (y, pos["y"])):
        g = blk.B.grad[:, 2:].reshape(-1)
        off = torch.ones_like(g, dtype=torch.bool)
        off[p] = False
        assert torch.equal(g[off], torch.zeros_like(g[off]))  # zero off the key positions
        assert torch.equal(blk.B.grad[:, :2], torch.zeros_like(blk.B.grad[:, :2]))  # the frozen part: no term
    assert x.B.grad[1, 3].item() == pytest.approx(-1 / 6)  # d/dB of |-2| / 3 / 2 at (1, 1)
    with torch.no_grad():
        x.B[1, 4] = 100.0  # (1, 2): off the key positions
        y.B[0, 2] = 100.0  # (0, 0): off
    assert key_penalty([x, y], pos).item() == pytest.approx(pen.item())
    zero = _block("x", eye, torch.tensor([[0.0, 0.0, 5.0], [1.0, 0.0, 7.0]]))
    assert key_penalty([zero], {"x": pos["x"]}).item() == 0.0


# ---------------------------------------------------------------------------------------------------- KeepLoRA


def test_the_energy_rule_counts_leading_directions_below_the_share():
    """s = (3, 2, 1, 1): squared shares 9, 4, 1, 1 of 15, cumulative 0.6, 0.867, 0.933, 1 (the reference keeps the
    directions whose cumulative share is below the threshold, at least one)."""
    s = torch.tensor([3.0, 2.0, 1.0, 1.0])
    assert [energy_count(s, e) for e in (0.5, 0.6, 0.61, 0.87, 0.95, 1.0)] == [1, 1, 1, 2, 3, 3]


def _orth(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


def test_the_protected_subspace_of_a_weight_is_its_top_right_singular_directions():
    q1, q2 = _orth(5, 1), _orth(6, 2)
    w = (q1[:, :4] * torch.tensor([4.0, 3.0, 1.0, 0.5], dtype=torch.float64)) @ q2[:, :4].T  # [5, 6]
    u = weight_subspace(w, 0.9)  # shares 16, 9, 1, .25 of 26.25: 0.61, 0.952 -> keep 1 ... below 0.9: 1
    assert u.shape == (1, 6)
    assert torch.allclose((u.T @ u).double(), q2[:, :1] @ q2[:, :1].T, atol=1e-5)
    u2 = weight_subspace(w, 0.96)
    assert u2.shape == (2, 6) and torch.allclose((u2.T @ u2).double(), q2[:, :2] @ q2[:, :2].T, atol=1e-5)


def test_a_is_the_top_gradient_directions_outside_the_protected_subspace():
    """G = 10 o0 e0^T + 5 o1 e2^T + 1 o2 e3^T with e0, e1 protected: A's rows are e2 and e3 (the projected gradient's
    directions, largest first), further rows zero (it has rank 2), and every row is orthogonal to e0, e1."""
    e = torch.eye(6)
    o = _orth(4, 3).float()
    g = 10 * torch.outer(o[:, 0], e[0]) + 5 * torch.outer(o[:, 1], e[2]) + torch.outer(o[:, 2], e[3])
    u = e[:2]
    a = init_a(g, u, 4)
    assert a.shape == (4, 6)
    assert torch.allclose(a[0].abs(), e[2], atol=1e-6) and torch.allclose(a[1].abs(), e[3], atol=1e-6)
    assert torch.equal(a[2:], torch.zeros(2, 6))
    assert (a @ u.T).abs().max() < 1e-6
    assert torch.allclose(project_out(g, u), 5 * torch.outer(o[:, 1], e[2]) + torch.outer(o[:, 2], e[3]), atol=1e-6)


def test_a_depends_on_the_gradient_alone_not_on_the_sign_an_svd_picks():
    """Each row's largest entry is positive, so A of a gradient and of that gradient flipped or rounded differently
    (as on 1 or 2 data-parallel workers) is the same A, not one with rows of the opposite sign."""
    g0 = torch.randn(6, 9, generator=torch.Generator().manual_seed(5))
    u = torch.linalg.qr(torch.randn(9, 2, generator=torch.Generator().manual_seed(6)))[0].T
    a = init_a(g0, u, 3)
    top = a.abs().argmax(dim=1)
    assert (a[torch.arange(3), top] > 0).all()
    for g in (-g0, g0 * (1 + 1e-6 * torch.randn(6, 9, generator=torch.Generator().manual_seed(7)))):
        assert torch.allclose(init_a(g, u, 3), a, atol=1e-4)


def test_the_protected_subspace_grows_until_it_holds_the_tasks_gradient_energy():
    """G = 3 o0 e0^T + 2 o1 e2^T + 1 o2 e3^T (energy 14) with e0 protected (9/14 = 0.64 held): 0.5 adds nothing,
    0.9 adds e2 (13/14 = 0.93), 0.99 adds e2 and e3."""
    e = torch.eye(5)
    o = _orth(3, 4).float()
    g = 3 * torch.outer(o[:, 0], e[0]) + 2 * torch.outer(o[:, 1], e[2]) + torch.outer(o[:, 2], e[3])
    u = e[:1]
    assert torch.equal(extend(u, g, 0.5), u)
    grown = extend(u, g, 0.9)
    assert grown.shape == (2, 5) and torch.allclose(grown[1].abs(), e[2], atol=1e-6)
    full = extend(u, g, 0.99)
    assert full.shape == (3, 5) and torch.allclose(full[2].abs(), e[3], atol=1e-6)
    assert torch.allclose(full @ full.T, torch.eye(3), atol=1e-6)
    assert torch.equal(extend(u, torch.zeros(3, 5), 0.99), u)  # no gradient: nothing to protect
