"""The training loop: schedule, accumulation, stopping, and exact resumption from a TrainState."""

import math

import pytest
import torch

from cl_service.adapters.lora import LoraCfg, attach_lora
from cl_service.data.synth import BENCHMARKS
from cl_service.models.config import ModelCfg
from cl_service.models.mllm import build_mllm, prompt_text, target_text
from cl_service.models.tokenizer import train_tokenizer
from cl_service.train.loop import Batches, TrainCfg, TrainState, total_steps, train_steps

pytestmark = pytest.mark.timeout(120)


class Linear:
    """Least squares on fixed data: batches are (x, y) pairs."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.model = torch.nn.Linear(4, 1)
        with torch.no_grad():
            self.model.weight.copy_(torch.randn(1, 4, generator=g))
            self.model.bias.zero_()

    def loss(self, batch):
        x, y = batch
        return ((self.model(x).squeeze(-1) - y) ** 2).mean()


def _data(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return list(zip(x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1))


def _collate(rows):
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def test_loss_goes_down_and_history_is_kept():
    m = Linear()
    cfg = TrainCfg(lr=0.3, epochs=10, batch_size=4, warmup_ratio=0.1)
    st = train_steps(m, Batches(_data(), _collate, 4), list(m.model.parameters()), cfg)
    assert st.step == st.total_steps == 60 and st.micro_step == 60 and len(st.losses) == 60 and st.done
    assert st.losses[-1] < 0.05 * st.losses[0]


def test_warmup_then_cosine_schedule():
    m = Linear()
    lrs = []
    cfg = TrainCfg(lr=1.0, max_steps=20, batch_size=4, warmup_ratio=0.2, min_lr_ratio=0.1)
    train_steps(m, Batches(_data(), _collate, 4), list(m.model.parameters()), cfg,
                on_step=lambda s: lrs.append(s.scheduler["_last_lr"][0]))
    warm = math.ceil(0.2 * 20)
    assert all(a < b for a, b in zip(lrs[: warm - 1], lrs[1:warm]))  # rising during warmup
    assert lrs[warm - 1] == pytest.approx(1.0)  # the peak right after warmup
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # then decaying
    assert lrs[-1] == pytest.approx(0.1, abs=1e-6)  # down to the floor


def test_grad_accumulation_matches_a_bigger_batch():
    data = _data(16)
    a, b = Linear(), Linear()
    cfg = TrainCfg(lr=0.05, max_steps=6, warmup_ratio=0.0, max_grad_norm=0.0)
    train_steps(a, Batches(data, _collate, 8, shuffle=False), list(a.model.parameters()),
                TrainCfg(**{**cfg.__dict__, "batch_size": 8}))
    train_steps(b, Batches(data, _collate, 4, shuffle=False), list(b.model.parameters()),
                TrainCfg(**{**cfg.__dict__, "batch_size": 4, "grad_accum": 2}))
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_steps_from_epochs_and_max_steps():
    b = Batches(_data(10), _collate, 4)  # 3 micro-batches per epoch, the last one short
    assert len(b) == 3 and [len(x[1]) for x in b.epoch(0)] == [4, 4, 2]
    assert total_steps(TrainCfg(epochs=2, grad_accum=2), b) == 3
    assert total_steps(TrainCfg(epochs=2, max_steps=7), b) == 7
    assert b.order(0) != b.order(1) and b.order(1) == Batches(_data(10), _collate, 4).order(1)
    with pytest.raises(ValueError, match="max_steps"):
        total_steps(TrainCfg(), iter([]))


def test_plain_list_of_batches_and_early_stop():
    m = Linear()
    batches = [_collate(_data()[i:i + 4]) for i in range(0, 24, 4)]
    st = train_steps(m, batches, list(m.model.parameters()), TrainCfg(lr=0.05, epochs=2),
                     on_step=lambda s: s.step == 5)
    assert st.step == 5 and st.total_steps == 12 and not st.done


def test_non_finite_loss_raises():
    class Bad(Linear):
        def loss(self, batch):
            return super().loss(batch) * float("nan")

    m = Bad()
    with pytest.raises(FloatingPointError):
        train_steps(m, Batches(_data(), _collate, 4), list(m.model.parameters()), TrainCfg(max_steps=2))


def test_param_groups_scale_the_lr():
    m = Linear()
    groups = [{"params": [m.model.weight]}, {"params": [m.model.bias], "lr_scale": 0.0}]
    bias = m.model.bias.detach().clone()
    train_steps(m, Batches(_data(), _collate, 4), groups, TrainCfg(lr=0.1, max_steps=3))
    assert torch.equal(m.model.bias, bias)


# ---------------------------------------------------------------- exact resume with a real tiny MLLM + LoRA
CFG = ModelCfg(name="unit", image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=2,
               vision_intermediate=64, text_hidden=64, text_layers=1, text_heads=2, text_kv_heads=2,
               text_intermediate=128, vocab_size=400, max_length=128)


@pytest.fixture(scope="module")
def samples():
    torch.set_num_threads(1)
    return list(BENCHMARKS.get("dcl-mini").generate("train", 3, 0))  # 15 samples


@pytest.fixture(scope="module")
def tok(samples):
    return train_tokenizer([prompt_text(s.question) + target_text(s.answer) for s in samples], CFG.vocab_size)


def _run(tok, samples, cfg, state=None, stop_at=None, mllm=None, lora_state=None):
    if mllm is None:
        mllm = build_mllm(CFG, tok, seed=0)
        params = attach_lora(mllm, LoraCfg(dropout=0.3, vision=True), "e", seed=0)
    else:
        params = [p for p in mllm.model.parameters() if p.requires_grad]
    batches = Batches(samples, lambda b: mllm.collate(b, train=True), cfg.batch_size, seed=cfg.seed)
    st = train_steps(mllm, batches, params, cfg, state=state,
                     on_step=(lambda s: s.step == stop_at) if stop_at else None)
    return mllm, st


def test_resume_from_state_equals_uninterrupted_run(tok, samples, tmp_path):
    # 4 micro-batches per epoch (the last short), accumulation 2, dropout on: order, schedule and RNG all matter
    cfg = TrainCfg(lr=5e-3, epochs=3, batch_size=4, grad_accum=2, warmup_ratio=0.2, seed=5)
    full, st_full = _run(tok, samples, cfg)
    assert st_full.step == 6

    part, st_part = _run(tok, samples, cfg, stop_at=3)
    assert st_part.step == 3 and st_part.micro_step == 6  # stopped mid-epoch
    st_part.save(tmp_path / "state.pt")
    weights = {n: p.detach().clone() for n, p in part.model.named_parameters() if p.requires_grad}

    # a new process: rebuild the base, re-attach, restore the trainable weights and the state
    again = build_mllm(CFG, tok, seed=0)
    attach_lora(again, LoraCfg(dropout=0.3, vision=True), "e", seed=99)  # init is overwritten below
    with torch.no_grad():
        for n, p in again.model.named_parameters():
            if p.requires_grad:
                p.copy_(weights[n])
    torch.manual_seed(1234)  # whatever the global RNG holds, the state restores it
    _, st_resumed = _run(tok, samples, cfg, state=TrainState.load(tmp_path / "state.pt"), mllm=again)

    assert st_resumed.step == 6 and st_resumed.losses == st_full.losses
    for (n, p), (_, q) in zip(full.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(p, q), n
