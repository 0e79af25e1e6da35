"""MoE-LoRA: token-gated LoRA experts per Linear — starts as the base, only it trains, saves and reloads
exactly, coexists with peft adapters, and refuses what does not fit."""

import json

import pytest
import torch

from cl_service.adapters.lora import ADAPTER_WEIGHTS, LoraCfg, attach_lora
from cl_service.adapters.moelora import (
    MOELORA_CONFIG,
    MoELoRASpec,
    attach_moelora,
    detach_moelora,
    is_moelora,
    moelora_active,
    read_spec,
    save_moelora,
)

pytestmark = pytest.mark.timeout(120)

SPEC = MoELoRASpec.of(LoraCfg(rank=6, alpha=12, dropout=0.0, targets=("q", "v", "down")), experts=3)


@pytest.fixture
def base(build):
    m = build()
    m.model.eval()
    return m


def _logits(m, samples):
    with torch.no_grad():
        return m.forward(m.collate(samples, train=False)).logits


def _train(m, params, samples, steps=4):
    opt = torch.optim.AdamW(params, lr=2e-2)
    m.model.train()
    batch = m.collate(samples, train=True)
    losses = []
    for _ in range(steps):
        loss = m.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    m.model.eval()
    return losses


def _train_and_save(m, samples, path):
    """Train a fresh MoE-LoRA on ``m`` a few steps, save it to ``path``; the trained logits."""
    _train(m, attach_moelora(m, SPEC, seed=1), samples)
    save_moelora(m, path)
    return _logits(m, samples)


def test_a_fresh_moelora_is_the_base_and_only_it_trains(base, samples, unit_cfg):
    before = _logits(base, samples)
    frozen = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    params = attach_moelora(base, SPEC, seed=1)
    n_lin = 3 * unit_cfg.text_layers
    assert len(params) == 3 * n_lin  # A, B, gate per adapted Linear
    assert params[0].shape[:2] == (3, 2)  # 3 experts of rank 6 / 3
    assert torch.equal(_logits(base, samples), before)  # B = 0
    losses = _train(base, params, samples)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    for n, p in base.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # the base never moves
    assert not torch.equal(_logits(base, samples), before)


def test_saved_moelora_reloads_to_identical_logits_and_the_hooks_leave_no_trace(base, samples, tmp_path, build):
    trained = _train_and_save(base, samples, tmp_path / "m")
    assert is_moelora(tmp_path / "m") and read_spec(tmp_path / "m") == SPEC
    fresh = build()
    fresh.model.eval()
    plain = _logits(fresh, samples)
    cache: dict = {}
    with moelora_active(fresh, tmp_path / "m", cache):
        assert torch.equal(_logits(fresh, samples), trained)
    with moelora_active(fresh, tmp_path / "m", cache):  # cached, same answer
        assert torch.equal(_logits(fresh, samples), trained)
    assert len(cache) == 1
    assert torch.equal(_logits(fresh, samples), plain)


def test_continuing_a_saved_moelora_starts_from_its_weights(base, samples, tmp_path, build):
    trained = _train_and_save(base, samples, tmp_path / "m")
    other = build()
    other.model.eval()
    attach_moelora(other, SPEC, seed=99, init=tmp_path / "m")
    assert torch.equal(_logits(other, samples), trained)
    detach_moelora(other)
    assert torch.equal(_logits(other, samples), _logits(build(), samples))


def test_moelora_applies_over_a_model_that_also_holds_peft_adapters(base, samples, tmp_path, build):
    trained = _train_and_save(base, samples, tmp_path / "m")
    other = build()
    other.model.eval()
    attach_lora(other, LoraCfg(rank=2), "peft-expert")  # the engine's model usually holds some
    with moelora_active(other, tmp_path / "m"):  # peft disabled inside: base + MoE-LoRA only
        assert torch.allclose(_logits(other, samples), trained, atol=1e-6)


def test_mismatches_and_broken_folders_get_clear_errors(base, samples, tmp_path):
    params = attach_moelora(base, SPEC, seed=1)
    _train(base, params, samples, steps=1)
    save_moelora(base, tmp_path / "m")
    with pytest.raises(ValueError, match="already holds a MoE-LoRA"):
        attach_moelora(base, SPEC)
    detach_moelora(base)
    other = MoELoRASpec.of(LoraCfg(rank=6, alpha=12, dropout=0.0, targets=("q", "v", "down")), experts=2)
    with pytest.raises(ValueError, match="differs from the requested"):
        attach_moelora(base, other, init=tmp_path / "m")
    (tmp_path / "m" / MOELORA_CONFIG).write_text(json.dumps({**json.loads((tmp_path / "m" / MOELORA_CONFIG).read_text()),
                                                            "experts": 2}))
    with pytest.raises(ValueError, match="shape"):
        with moelora_active(base, tmp_path / "m"):
            pass
    (tmp_path / "m" / MOELORA_CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match="no readable MoE-LoRA"):
        read_spec(tmp_path / "m")
    with pytest.raises(ValueError, match="at least 1 expert"):
        MoELoRASpec.of(LoraCfg(), experts=0)
    with pytest.raises(ValueError, match="not a multiple of 4 experts"):
        MoELoRASpec.of(LoraCfg(rank=6), experts=4)
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        MoELoRASpec.of(LoraCfg(targets=("lm_head",)), experts=2)
    assert not (tmp_path / "nothing").exists() and not is_moelora(tmp_path / "nothing")
    assert (tmp_path / "m" / ADAPTER_WEIGHTS).is_file()
