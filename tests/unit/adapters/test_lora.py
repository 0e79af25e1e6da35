"""Task LoRA experts: what they cover, that only they train, and that they reload exactly."""

import re

import pytest
import torch

from cl_service.adapters.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraCfg,
    adapter_names,
    attach_lora,
    delete_adapter,
    load_adapter,
    save_adapter,
    set_active,
    target_regex,
)

pytestmark = pytest.mark.timeout(120)

LM_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture
def base(build):
    return build()


def _lora_modules(m) -> set[str]:
    return {n.rsplit(".lora_A", 1)[0] for n, _ in m.model.named_parameters() if ".lora_A." in n}


def _train(m, params, batch, steps=3):
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    m.model.train()
    for _ in range(steps):
        m.loss(batch).backward()
        opt.step()
        opt.zero_grad()
    m.model.eval()


def test_targets_only_language_model_linears(base, unit_cfg):
    attach_lora(base, LoraCfg(), "e")
    mods = _lora_modules(base)
    assert mods and all(".language_model." in n for n in mods)
    assert {n.rsplit(".", 1)[1] for n in mods} == LM_LINEARS
    assert len(mods) == 7 * unit_cfg.text_layers
    assert not any("lm_head" in n or "multi_modal_projector" in n for n in mods)


def test_vision_option_targets_the_used_clip_layers(base):
    attach_lora(base, LoraCfg(vision=True, targets=("q", "v", "up")), "e")
    vis = {n for n in _lora_modules(base) if ".vision_tower." in n}
    # feature layer -2 of 3 layers: the decoder sees the output of layers 0 and 1, never layer 2
    assert {re.search(r"layers\.(\d+)\.", n).group(1) for n in vis} == {"0", "1"}
    assert {n.rsplit(".", 1)[1] for n in vis} == {"q_proj", "v_proj", "fc1"}
    lm = {n.rsplit(".", 1)[1] for n in _lora_modules(base) - vis}
    assert lm == {"q_proj", "v_proj", "up_proj"}


def test_unknown_target_is_rejected():
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        target_regex(LoraCfg(targets=("q", "qkv")))


@pytest.mark.parametrize("lora", [LoraCfg(), LoraCfg(vision=True), LoraCfg(train_projector=False, rank=4, alpha=8)])
def test_only_adapter_and_projector_change(base, samples, lora):
    batch = base.collate(samples[:6], train=True)
    with torch.no_grad():
        before_logits = base.forward(batch).logits
    params = attach_lora(base, lora, "e")
    assert params and all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in base.model.parameters()) == len(params)
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    _train(base, params, batch)
    changed = {n for n, p in base.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed
    allowed = re.compile(r".*(\.lora_[AB]\.e\.|\.modules_to_save\.e\.).*")
    assert all(allowed.match(n) for n in changed), sorted(n for n in changed if not allowed.match(n))
    assert any("modules_to_save" in n for n in changed) == lora.train_projector
    with torch.no_grad(), base.adapters_disabled():
        assert torch.equal(base.forward(batch).logits, before_logits)  # the frozen base is untouched


def test_saved_adapter_reloads_to_identical_logits(base, build, samples, tmp_path):
    batch = base.collate(samples[:6], train=True)
    _train(base, attach_lora(base, LoraCfg(vision=True), "task-a"), batch)
    with torch.no_grad():
        trained = base.forward(batch).logits
    save_adapter(base, tmp_path / "a", "task-a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])

    fresh = build()
    assert load_adapter(fresh, tmp_path / "a", "x") == []  # frozen unless asked
    with torch.no_grad():
        assert torch.equal(fresh.forward(batch).logits, trained)
    assert fresh.generate(samples[:4], 4) == base.generate(samples[:4], 4)
    again = load_adapter(fresh, tmp_path / "a", "y", trainable=True)
    assert again and all(".y." in n for n, p in fresh.model.named_parameters() if p.requires_grad)


def test_several_experts_switch_and_delete(base, samples):
    batch = base.collate(samples[:6], train=True)
    with torch.no_grad():
        plain = base.forward(batch).logits
    _train(base, attach_lora(base, LoraCfg(), "one"), batch)
    with torch.no_grad():
        la = base.forward(batch).logits
    params_b = attach_lora(base, LoraCfg(), "two")
    with torch.no_grad():
        assert torch.allclose(base.forward(batch).logits, plain, atol=1e-6)  # a new expert starts as the base
    _train(base, params_b, batch)
    set_active(base, "one")
    with torch.no_grad():
        assert torch.equal(base.forward(batch).logits, la)  # training "two" left "one" alone
    assert adapter_names(base) == ["one", "two"]
    with pytest.raises(ValueError, match="already exists"):
        attach_lora(base, LoraCfg(), "one")
    for bad in ("a", "x.y", ""):
        with pytest.raises(ValueError, match="invalid adapter name"):
            attach_lora(base, LoraCfg(), bad)
    with pytest.raises(KeyError, match="known"):
        set_active(base, "zzz")
    delete_adapter(base, "one")
    delete_adapter(base, "two")
    assert base.peft is None and adapter_names(base) == []
    with torch.no_grad():
        assert torch.equal(base.forward(batch).logits, plain)  # back to the plain base
    attach_lora(base, LoraCfg(), "c")  # and ready for new experts
    assert adapter_names(base) == ["c"]


def test_lora_seed_makes_init_deterministic(build):
    a, b = build(), build()
    pa, pb = attach_lora(a, LoraCfg(), "e", seed=3), attach_lora(b, LoraCfg(), "e", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
