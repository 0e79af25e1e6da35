"""A tiny MLLM the adapter tests build from scratch (a tokenizer trained on a few generated samples)."""

import pytest
import torch

from cl_service.data.synth import BENCHMARKS
from cl_service.models.config import ModelCfg
from cl_service.models.mllm import build_mllm, prompt_text, target_text
from cl_service.models.tokenizer import train_tokenizer

UNIT_CFG = ModelCfg(name="unit", image_size=32, patch_size=8, vision_hidden=32, vision_layers=3, vision_heads=2,
                    vision_intermediate=64, text_hidden=64, text_layers=2, text_heads=2, text_kv_heads=1,
                    text_intermediate=128, vocab_size=400, max_length=160)


@pytest.fixture(scope="module")
def unit_cfg():
    return UNIT_CFG


@pytest.fixture(scope="module")
def samples():
    return list(BENCHMARKS.get("dcl-mini").generate("train", 3, 0))


@pytest.fixture(scope="module")
def tok(samples):
    torch.set_num_threads(1)
    return train_tokenizer([prompt_text(s.question) + target_text(s.answer) for s in samples], UNIT_CFG.vocab_size)


@pytest.fixture
def build(tok):
    """``build(seed=0)``: a fresh tiny MLLM."""
    return lambda seed=0: build_mllm(UNIT_CFG, tok, seed=seed)
