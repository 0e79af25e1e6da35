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

from pathlib import Path
from typing import Callable

import torch

from cl_service.adapters.family import FAMILIES, TRAIN_ADAPTER, Attached
from cl_service.adapters.lora import LORA, LoraCfg
from cl_service.adapters.merged import attach_stacked
from cl_service.models.mllm import MLLM


def grow_lora(mllm: MLLM, previous: str | Path, cfg: LoraCfg, adapter_name: str, seed: int = 0
              ) -> tuple[list[torch.nn.Parameter], Callable[[], torch.Tensor]]:
    """Attach ``previous``'s LoRA grown by one rank-``cfg.rank`` block (:func:`~cl_service.adapters.merged.
    attach_stacked`: earlier blocks frozen) with the projector copy frozen too; returns the trainable parameters
    (the new blocks) and ``orth()``: the summed squared overlap of the new A blocks with the frozen ones, a scalar
    to add to the loss."""
    params, found = attach_stacked(mllm, previous, cfg, adapter_name, seed=seed, merged_dropout=False)
    lora = {id(p) for b in found for p in (b.A, b.B)}
    for p in params:
        if id(p) not in lora:  # the projector copy: the first task's, frozen
            p.requires_grad_(False)

    def orth() -> torch.Tensor:
        return sum((b.A[:b.r_old].detach() @ b.A[b.r_old:].T).pow(2).sum() for b in found)

    return [p for p in params if id(p) in lora], orth


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
