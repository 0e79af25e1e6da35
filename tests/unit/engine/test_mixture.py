"""Soft mixtures of LoRA adapters through the stacked path: each row's answer equals the hand-built computation
``W x + sum_t w_t B_t A_t x`` (and, below the mixed layers, ``W x + (sum_t B_t)(sum_t A_t) x``), float32."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cl_service.adapters.lora import LoraCfg
from cl_service.engine.engine import Engine
from cl_service.engine.mixture import Mixture
from cl_service.engine.multilora import MultiLoRA, decoder_layer
from cl_service.models.mllm import load_mllm

pytestmark = pytest.mark.timeout(180)

# Three task LoRAs of one shape (the methods' case); only the last carries a projector copy (the stream's).
SPECS = {"t0": LoraCfg(rank=4, alpha=8.0, dropout=0.0, train_projector=False),
         "t1": LoraCfg(rank=4, alpha=8.0, dropout=0.0, train_projector=False),
         "t2": LoraCfg(rank=4, alpha=8.0, dropout=0.0, train_projector=True)}
# Per-row weights over (t0, t1, t2): four requests of one batch, each its own.
WEIGHTS = [(0.7, 0.2, 0.1), (0.05, 0.05, 0.9), (1 / 3, 1 / 3, 1 / 3), (0.0, 1.0, 0.0)]


@pytest.fixture(scope="module")
def task_loras(random_adapters):
    return random_adapters(SPECS, seed=10, scale=0.4)


def _factors(folder: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """``{Linear path: (A, B * alpha / r)}`` and the projector copy, read straight from the saved files."""
    cfg = json.loads((Path(folder) / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    state = load_file(str(Path(folder) / "adapter_model.safetensors"))
    ab: dict[str, dict[str, torch.Tensor]] = {}
    projector = {}
    for k, v in state.items():
        k = k.removeprefix("base_model.model.")
        if ".lora_A." in k or ".lora_B." in k:
            path, half = k.split(".lora_")[0], k.split(".lora_")[1][0]
            ab.setdefault(path, {})[half] = v
        else:
            projector[k.split("multi_modal_projector.", 1)[1]] = v
    return {p: (d["A"], d["B"] * scale) for p, d in ab.items()}, projector


def _reference(tiny_base, folders, weights, mixed_from, samples, n_tokens):
    """Logits of the prompts and greedy answers of the plain base with hooks adding, to row ``b`` of each adapted
    Linear, ``sum_t w[b, t] B_t A_t x`` in layers >= the mixed ones and ``(sum_t B_t)(sum_t A_t) x`` below; the
    images through the last folder's projector copy."""
    mllm = load_mllm(tiny_base)
    mllm.model.eval()
    factors = [_factors(f) for f in folders]
    n_layers = mllm.model.config.text_config.num_hidden_layers
    start = mixed_from if mixed_from >= 0 else n_layers + mixed_from
    w = torch.tensor(weights, dtype=torch.float32)
    handles = []
    for path in factors[0][0]:
        fused = decoder_layer(path) < start
        A_sum = sum(f[0][path][0] for f in factors)
        B_sum = sum(f[0][path][1] for f in factors)

        def hook(module, args, out, path=path, fused=fused, A_sum=A_sum, B_sum=B_sum):
            x = args[0]
            if fused:
                return out + x @ A_sum.T @ B_sum.T
            rows = [sum(w[b, t] * (x[b] @ f[0][path][0].T @ f[0][path][1].T) for t, f in enumerate(factors))
                    for b in range(x.shape[0])]
            return out + torch.stack(rows)
        handles.append(mllm.model.get_submodule(path).register_forward_hook(hook))
    projector = copy.deepcopy(mllm.model.model.multi_modal_projector)
    projector.load_state_dict(factors[-1][1])
    try:
        with torch.no_grad():
            batch = mllm.collate(samples, train=False)
            feats = projector(mllm.vision_states(batch["pixel_values"]))
            logits = mllm.model(inputs_embeds=mllm.embed(batch, image_features=feats),
                                attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
            answers = mllm.generate(samples, n_tokens, len(samples),
                                    image_features=lambda px: projector(mllm.vision_states(px)))
    finally:
        for h in handles:
            h.remove()
    return logits, answers


@pytest.mark.parametrize("mixed_from", [0, -1], ids=["every-layer", "last-layer"])
def test_mixture_equals_the_hand_built_sum_of_weighted_deltas(tiny_base, task_loras, samples, mixed_from):
    """``mixed_from=0`` (DISCO): every adapted Linear adds the row's weighted deltas. ``-1`` (HiDe-LLaVA): the layers
    below the last add the fused sum of A's times sum of B's, the last the weighted deltas. Four rows of one batch,
    each with its own weights: logits within float rounding of the hand-built model, the same greedy answers."""
    folders = [task_loras[k] for k in SPECS]
    rows = samples[:len(WEIGHTS)]
    ref_logits, ref_answers = _reference(tiny_base, folders, WEIGHTS, mixed_from, rows, 6)

    eng = Engine(tiny_base)
    mixtures = [Mixture(tuple(folders), w, mixed_from, folders[-1]) for w in WEIGHTS]
    assert eng.answer_mixture(rows, mixtures, 6) == ref_answers
    assert eng.answer_mixture(rows, mixtures, 6, vision_states=eng.vision_states(rows)) == ref_answers
    eng.batch_size = 3  # two chunks: a row's answer does not depend on the rows beside it
    assert eng.answer_mixture(rows, mixtures, 6) == ref_answers

    ml = MultiLoRA(eng.mllm)
    for k in SPECS:
        ml.load(k, task_loras[k])
    batch = eng.mllm.collate(rows, train=False)
    with torch.no_grad(), eng.mllm.adapters_disabled(), \
            ml.mixture(list(SPECS), torch.tensor(WEIGHTS, dtype=torch.float64), mixed_from):
        feats = ml.image_features(batch["pixel_values"], ["t2"] * len(rows))
        got = eng.mllm.model(inputs_embeds=eng.mllm.embed(batch, image_features=feats),
                             attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
    torch.testing.assert_close(got, ref_logits, rtol=1e-5, atol=1e-5)
    plain = load_mllm(tiny_base)
    with torch.no_grad():
        base = plain.model(**{k: batch[k] for k in ("attention_mask", "position_ids")},
                           inputs_embeds=plain.embed(batch)).logits
    assert (got - base).abs().amax() > 1e-2  # the mixture does change the model (else nothing is tested)
    assert (got[0] - got[1]).abs().amax() > 0  # and rows differ by their weights


def test_the_two_layer_plans_differ_and_the_one_hot_mixture_is_the_adapter_alone(tiny_base, task_loras, samples):
    """Weight 1 on one adapter with every layer mixed is that adapter as peft answers it; the HiDe plan with the same
    weights is not (its lower layers add every task's A and B)."""
    folders = tuple(task_loras[k] for k in SPECS)
    rows = samples[:4]
    eng = Engine(tiny_base)
    alone = eng.answer(rows, folders[2], 6)
    one_hot = [Mixture(folders, (0.0, 0.0, 1.0), 0, folders[2])] * len(rows)
    assert eng.answer_mixture(rows, one_hot, 6) == alone
    batch = eng.mllm.collate(rows, train=False)
    out = {}
    for mixed_from in (0, -1):
        with torch.no_grad(), eng.base_passes(), eng.multi.mixture(
                [str(Path(f).resolve()) for f in folders], torch.tensor([[0.0, 0.0, 1.0]] * len(rows)), mixed_from):
            out[mixed_from] = eng.mllm.model(inputs_embeds=eng.mllm.embed(batch), attention_mask=batch["attention_mask"],
                                             position_ids=batch["position_ids"]).logits
    assert (out[0] - out[-1]).abs().amax() > 1e-3


def test_bad_mixtures_are_refused(tiny_base, task_loras, adapters, samples):
    """Refused before any pass: weights that are not one finite number per adapter, repeated adapters, a layer
    split outside the base's decoder layers, an adapter with vision-tower LoRA (the mixture runs over decoder
    Linears)."""
    folders = tuple(task_loras[k] for k in SPECS)
    with pytest.raises(ValueError, match="one finite weight per adapter"):
        Mixture(folders, (0.5, 0.5))
    with pytest.raises(ValueError, match="one finite weight per adapter"):
        Mixture(folders, (0.5, float("nan"), 0.5))
    with pytest.raises(ValueError, match="distinct adapters"):
        Mixture((folders[0], folders[0]), (0.5, 0.5))
    eng = Engine(tiny_base)
    with pytest.raises(ValueError, match="2 samples but 1 mixtures"):
        eng.answer_mixture(samples[:2], [Mixture(folders, (1.0, 0.0, 0.0))])
    assert eng.answer_mixture([], []) == []
    with pytest.raises(ValueError, match="mixed_from=2: the base has decoder layers 0..1"):
        eng.answer_mixture(samples[:1], [Mixture(folders, (1.0, 0.0, 0.0), mixed_from=2)])
    with pytest.raises(ValueError, match="vision-tower LoRA cannot be mixed"):
        eng.answer_mixture(samples[:1], [Mixture((folders[0], adapters["vis"]), (0.5, 0.5))])
    with pytest.raises(ValueError, match="do not give each row a weight per adapter"):
        with eng.multi.mixture(eng.hold_adapters(folders[:2]), torch.ones(1, 3)):
            pass
