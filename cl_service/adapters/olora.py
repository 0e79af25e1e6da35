"""O-LoRA (orthogonal subspace learning, Wang et al. 2023) as one growing peft LoRA.

Task ``t`` adds a rank-``r`` block to every LoRA module: the adapter of stage ``t`` has rank
``r·(t+1)``, its first ``r·t`` rows of A / columns of B are the previous stages' blocks, frozen, and the
new block is trained with the task loss plus ``lambda_orth · Σ_modules ||A_old · A_newᵀ||²_F`` so its
input subspace stays orthogonal to the earlier tasks'. Because ``B·A = Σ_s B_s·A_s`` for stacked blocks,
the saved adapter is an ordinary peft LoRA (alpha grown with the rank so that every block keeps the
scale ``alpha / r``) that the engine loads like any other. The projector copy is trained with the
first task only and frozen afterwards (a shared trainable projector would carry forgetting past the
orthogonal LoRA blocks).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from cl_service.adapters.family import FAMILIES, TRAIN_ADAPTER, Attached
from cl_service.adapters.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA, LoraCfg, attach_lora
from cl_service.models.mllm import MLLM


def grow_lora(mllm: MLLM, previous: str | Path, cfg: LoraCfg, adapter_name: str, seed: int = 0
              ) -> tuple[list[torch.nn.Parameter], Callable[[], torch.Tensor]]:
    """Attach ``previous``'s LoRA grown by one rank-``cfg.rank`` block; returns the trainable parameters
    (the new blocks) and ``orth()``: the summed squared overlap of the new A blocks with the frozen
    ones, a scalar to add to the loss."""
    previous = Path(previous)
    old_cfg = json.loads((previous / ADAPTER_CONFIG).read_text())
    r_old, r = int(old_cfg["r"]), cfg.rank
    if r_old % r:
        raise ValueError(f"{previous}: rank {r_old} is not a multiple of the block rank {r}")
    grown = dataclasses.replace(cfg, rank=r_old + r, alpha=cfg.alpha * (r_old + r) / r)
    attach_lora(mllm, grown, adapter_name, seed=seed)
    old = load_file(str(previous / ADAPTER_WEIGHTS))
    params: list[torch.nn.Parameter] = []
    a_blocks: list[torch.nn.Parameter] = []
    used = set()
    with torch.no_grad():
        for name, p in mllm.model.named_parameters():
            if not p.requires_grad:  # only this adapter's parameters are trainable after attach_lora
                continue
            key = "base_model.model." + name.replace(f".{adapter_name}.", ".").replace(".modules_to_save.", ".")
            if key not in old:
                raise ValueError(f"{previous}: no saved tensor {key} for the grown adapter")
            used.add(key)
            if ".lora_A." in name:
                p[:r_old].copy_(old[key])
                p.register_hook(_zero_grad_rows(r_old))
                a_blocks.append(p)
                params.append(p)
            elif ".lora_B." in name:
                p[:, :r_old].copy_(old[key])
                p.register_hook(_zero_grad_cols(r_old))
                params.append(p)
            else:  # the projector copy: the first task's, frozen
                p.copy_(old[key])
                p.requires_grad_(False)
    if set(old) - used:
        raise ValueError(f"{previous}: {len(set(old) - used)} saved tensors have no place in the grown adapter")

    def orth() -> torch.Tensor:
        return sum((a[:r_old].detach() @ a[r_old:].T).pow(2).sum() for a in a_blocks)

    return params, orth


def _zero_grad_rows(k: int):
    def hook(g: torch.Tensor) -> torch.Tensor:
        g = g.clone()
        g[:k] = 0
        return g
    return hook


def _zero_grad_cols(k: int):
    def hook(g: torch.Tensor) -> torch.Tensor:
        g = g.clone()
        g[:, :k] = 0
        return g
    return hook


class OLoRAFamily:
    """Jobs of kind ``olora``: ``job.init_adapter``'s LoRA grown by one block (:func:`grow_lora`), trained with
    ``job.orth_lambda`` times the orthogonality penalty. Saved and answered as a plain peft LoRA."""

    name = "olora"
    reuses_base = True

    def attach(self, job, mllm: MLLM, prepared) -> Attached:
        if not job.init_adapter:  # the first task's block: a plain LoRA
            return LORA.attach(job, mllm, prepared)
        if job.train.weight_decay:
            raise ValueError("olora needs weight_decay=0 (decay would move the frozen blocks of earlier tasks)")
        params, orth = grow_lora(mllm, job.init_adapter, job.lora, TRAIN_ADAPTER, seed=job.seed)
        weight = job.orth_lambda
        return Attached(params, penalty=lambda: weight * orth())

    def save(self, job, mllm: MLLM, folder: Path, attached: Attached) -> None:
        LORA.save(job, mllm, folder, attached)

    def release(self, mllm: MLLM) -> None:
        LORA.release(mllm)


FAMILIES.register("olora", OLoRAFamily())
