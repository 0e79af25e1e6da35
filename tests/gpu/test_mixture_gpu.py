"""Soft mixtures of LoRA adapters (HiDe-LLaVA, DISCO) on the GPU answer as on the CPU, and CUDA graphs never replay
them (skipped without a GPU). float32 on both devices: identical greedy answers."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

WEIGHTS = [(0.7, 0.2, 0.1), (0.05, 0.05, 0.9), (1 / 3, 1 / 3, 1 / 3), (0.0, 1.0, 0.0), (0.5, 0.5, 0.0)]


def _task_loras(tiny_base, root):
    """Three random task LoRAs of one shape, the last with the stream's projector copy."""
    from cl_service.adapters.lora import LoraCfg, attach_lora, remove_lora, save_adapter
    from cl_service.adapters.registry import finalize_adapter
    from cl_service.models.mllm import load_mllm

    mllm = load_mllm(tiny_base, dtype="float32")
    out = []
    for i in range(3):
        cfg = LoraCfg(rank=4, alpha=8.0, dropout=0.0, train_projector=i == 2)
        params = attach_lora(mllm, cfg, "x", seed=i)
        g = torch.Generator().manual_seed(300 + i)
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g) * (0.4 if p.dim() == 2 else 0.05))
        out.append(str(save_adapter(mllm, root / f"t{i}", "x")))
        finalize_adapter(out[-1], id=f"t{i}", kind="expert", task=f"t{i}", description="", base="b", job_key=f"t{i}")
        remove_lora(mllm)
    return tuple(out)


@pytest.mark.parametrize("mixed_from", [0, -1], ids=["every-layer", "last-layer"])
def test_mixtures_answer_on_the_gpu_as_on_the_cpu_and_never_through_graphs(tiny_base, tmp_path, mixed_from):
    from cl_service.data.synth import BENCHMARKS
    from cl_service.engine.engine import Engine
    from cl_service.engine.mixture import Mixture
    from cl_service.models.mllm import load_mllm

    folders = _task_loras(tiny_base, tmp_path)
    samples = list(BENCHMARKS.get("dcl-mini").generate("test", 8, 1))[:len(WEIGHTS)]
    mixtures = [Mixture(folders, w, mixed_from, folders[-1]) for w in WEIGHTS]
    cpu = Engine(load_mllm(tiny_base, dtype="float32")).answer_mixture(samples, mixtures, 8)
    gpu = Engine(load_mllm(tiny_base, dtype="float32", device="cuda"))
    assert gpu.cuda_graphs == "auto"
    assert gpu.answer_mixture(samples, mixtures, 8) == cpu
    # a decode handed the graph decoder inside a mixture block declines it and decodes eagerly, to the same answers
    dec = gpu._decoder()
    assert dec is not None and dec.reason is None, getattr(dec, "reason", None)
    keys = gpu.hold_adapters(folders)
    try:
        with torch.no_grad(), gpu.base_passes(), gpu.multi.mixture(keys, torch.tensor(WEIGHTS), mixed_from):
            got = gpu.mllm.generate(samples, 8, len(samples), decoder=dec,
                                    image_features=lambda px: gpu.multi.image_features(px, [keys[-1]] * len(px)))
    finally:
        gpu.release_adapters(keys)
    assert got == cpu and dec.stats["declined_mixture"] == 1 and dec.stats["replays"] == 0
