"""Saved LoRA adapters of different shapes over the tiny base, shared by the engine tests."""

from __future__ import annotations

import pytest
import torch

from cl_service.adapters.lora import LoraCfg, attach_lora, remove_lora, save_adapter
from cl_service.adapters.registry import finalize_adapter
from cl_service.data.synth import BENCHMARKS
from cl_service.models.mllm import load_mllm

# Different ranks, targets, projector on/off and one adapter with vision LoRA: all mixable in one batch.
SPECS = {
    "e1": LoraCfg(rank=4, alpha=8.0, dropout=0.0),
    "e2": LoraCfg(rank=8, alpha=4.0, dropout=0.0, targets=("q", "v")),
    "e3": LoraCfg(rank=2, alpha=2.0, dropout=0.0, train_projector=False, targets=("o", "down")),
    "vis": LoraCfg(rank=4, alpha=8.0, dropout=0.0, vision=True),
}


def save_random_adapters(tiny_base, root, specs: dict[str, LoraCfg], seed: int = 0, scale: float = 0.3) -> dict[str, str]:
    """Saved adapters ``{name: folder}`` of ``specs`` with random (non-zero) LoRA B and perturbed projectors, so
    each changes answers (``seed``: the first adapter's; the others count on from it)."""
    torch.set_num_threads(1)
    out = {}
    for i, (name, cfg) in enumerate(specs.items()):
        m = load_mllm(tiny_base)
        params = attach_lora(m, cfg, name, seed=seed + i)
        g = torch.Generator().manual_seed(100 + seed + i)
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g) * (scale if p.dim() == 2 else 0.05))
        folder = save_adapter(m, root / name, name)
        finalize_adapter(folder, id=f"expert:{name}", kind="expert", task=name, description="", base=str(tiny_base),
                         job_key=name)
        remove_lora(m)
        out[name] = str(folder)
    return out


@pytest.fixture(scope="session")
def random_adapters(tiny_base, tmp_path_factory):
    """``random_adapters(specs, seed=, scale=)``: :func:`save_random_adapters` into a fresh folder."""
    return lambda specs, **kw: save_random_adapters(tiny_base, tmp_path_factory.mktemp("adapters"), specs, **kw)


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    """Saved adapters of :data:`SPECS`, each changing answers (:func:`save_random_adapters`)."""
    return save_random_adapters(tiny_base, tmp_path_factory.mktemp("adapters"), SPECS)


@pytest.fixture(scope="module")
def samples():
    return list(BENCHMARKS.get("dcl-mini").generate("test", 2, 3))[:10]


