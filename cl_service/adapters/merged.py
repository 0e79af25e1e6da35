"""A model merged with a task's LoRA after every task, kept as one peft LoRA of stacked blocks (SEFE, KeepLoRA).

Merging task ``k``'s LoRA into the weights after the task, ``W_k = W_{k-1} + s B_k A_k``, makes the model after
task ``t``

    W_t = W_0 + s (B_1 A_1 + ... + B_t A_t) = W_0 + s [B_1 .. B_t] [A_1; ..; A_t]

one peft LoRA of rank ``t r`` on the unchanged base ``W_0``: its blocks (rows of A, columns of B) are the tasks'
LoRAs, every block with the scale ``s = alpha / r`` (alpha grows with the rank). Training task ``t + 1`` on the
merged model is training one more block with the earlier ones frozen: the forward pass is the merged model's, and
the gradient with respect to ``W_0`` equals the gradient with respect to the merged weight ``W_t`` (the output of
a Linear depends on it only through ``W_t x``). So a merging method stores no merged model per stage: it publishes
a plain peft LoRA that the engine answers through its fast paths (batched with other adapters), that exports to
peft as it is, and that is served as one adapter. The only difference from merging in the weights is float
rounding (``x (W + dW)`` against ``x W + x dW``; in float32 about 1e-6 of the logits, a test measures it). LoRA
dropout is the one place where the stack must not act as one LoRA: peft drops out the input of the whole ``A``,
which would drop it out for the earlier blocks too, while in a merged model they are weights that see the input as
it is. The grown stack's ``A`` therefore applies the dropout to the new block's rows only (:class:`NewRowsDropout`).

The adapter's own projector copy (``LoraCfg.train_projector``), where there is one, is a full parameter: it
continues from the previous stage and trains at every task, as a merged model's projector does. O-LoRA
(:mod:`cl_service.adapters.olora`) grows the same structure but freezes the projector after the first task and
adds an orthogonality penalty; the merging methods add their own terms (:mod:`cl_service.adapters.sefe`,
:mod:`cl_service.adapters.keeplora`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from cl_service.adapters.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraCfg, attach_lora, check_adapter_name
from cl_service.models.mllm import MLLM

_PREFIX = "base_model.model."


@dataclass
class Block:
    """One adapted Linear of a stacked LoRA: ``name`` (its module path under ``mllm.model``), the LoRA ``A``
    ``[R, in]`` and ``B`` ``[out, R]`` of the whole stack, the base ``weight`` ``[out, in]`` and ``r_old``, the rank
    of the frozen blocks before the newest one (rows ``A[r_old:]``, columns ``B[:, r_old:]``)."""

    name: str
    A: torch.nn.Parameter
    B: torch.nn.Parameter
    weight: torch.nn.Parameter
    r_old: int

    def new_delta(self) -> torch.Tensor:
        """``B_new A_new`` of the newest block, ``[out, in]``, unscaled."""
        return self.B[:, self.r_old:] @ self.A[self.r_old:]


class NewRowsDropout(torch.nn.Module):
    """The ``lora_A`` of a grown stack whose dropout reaches only the new block: rows ``[:r_old]`` (the frozen,
    merged blocks) see the input ``[..., in]`` as it is, rows ``[r_old:]`` its dropped-out copy; ``[..., R]``. It
    holds the same ``weight`` Parameter under the same name, so training, DDP, checkpoints and saving see what they
    saw; peft's own dropout of the adapter is then the identity."""

    def __init__(self, weight: torch.nn.Parameter, r_old: int, p: float) -> None:
        super().__init__()
        self.weight, self.r_old, self.drop = weight, r_old, torch.nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return torch.cat([F.linear(x, w[:self.r_old]), F.linear(self.drop(x), w[self.r_old:])], dim=-1)


def block_cfg(cfg: LoraCfg, rank: int | None, alpha: float | None) -> LoraCfg:
    """The LoRA of one task's block: ``cfg`` with ``rank`` and ``alpha`` replaced where set; with only ``rank`` set,
    alpha is ``2 * rank`` (the ratio of the SEFE and KeepLoRA reference recipes: rank 32, alpha 64)."""
    if rank is None and alpha is None:
        return cfg
    r = rank if rank is not None else cfg.rank
    a = alpha if alpha is not None else (2.0 * r if rank is not None else cfg.alpha)
    return dataclasses.replace(cfg, rank=r, alpha=a)


def require_no_weight_decay(method: str, weight_decay: float) -> None:
    """Refuse weight decay for a method whose stages keep earlier tasks' blocks merged (decay would move them);
    called when the method declares its jobs, so a run is refused before its first stage trains."""
    if weight_decay:
        raise ValueError(f"{method} needs expert.train.weight_decay=0 (decay would move the merged blocks of earlier "
                         "tasks)")


def saved_rank(folder: str | Path) -> int:
    """The rank of the saved peft LoRA in ``folder``."""
    return int(json.loads((Path(folder) / ADAPTER_CONFIG).read_text())["r"])


def saved_pairs(weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The ``(A, B)`` of every adapted Linear of a saved peft LoRA's tensors, by module path (as :class:`Block`
    names them)."""
    out = {}
    for key, a in weights.items():
        if key.endswith(".lora_A.weight"):
            name = key[len(_PREFIX):-len(".lora_A.weight")] if key.startswith(_PREFIX) else key[:-len(".lora_A.weight")]
            out[name] = (a, weights[key.replace(".lora_A.weight", ".lora_B.weight")])
    return out


def blocks(mllm: MLLM, adapter_name: str, r_old: int = 0) -> list[Block]:
    """The adapted Linears of the attached LoRA ``adapter_name``, in module order."""
    out = []
    for name, module in mllm.model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            out.append(Block(name, module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight,
                             module.get_base_layer().weight, r_old))
    if not out:
        raise ValueError(f"no LoRA {adapter_name!r} is attached")
    return out


def attach_stacked(mllm: MLLM, previous: str | Path | None, block: LoraCfg, adapter_name: str, seed: int = 0,
                   train_a: bool = True, merged_dropout: bool = True) -> tuple[list[torch.nn.Parameter], list[Block]]:
    """Attach the model merged so far plus one new trainable block of ``block``'s rank: ``previous``'s stacked LoRA
    (a saved peft LoRA whose rank is a multiple of ``block.rank`` and whose alpha / rank is ``block``'s) grown by
    one block, its earlier blocks frozen (their gradients are zeroed, so AdamW without weight decay leaves them
    exactly as they were; LoRA dropout reaches only the new block), the projector copy continuing; without
    ``previous`` a fresh LoRA (the first task).
    The new block starts as peft starts a LoRA: ``A`` from ``seed``, ``B = 0``, so the model starts as the
    merged model. ``train_a=False`` freezes every ``A`` (only ``B`` and the projector train). ``merged_dropout=False``
    leaves peft's dropout on the whole stack's input (O-LoRA's blocks are adapters, not merged weights).

    Returns the trainable parameters and the adapted Linears."""
    check_adapter_name(adapter_name)
    if previous is None:
        params = attach_lora(mllm, block, adapter_name, seed=seed)
        r_old = 0
    else:
        previous = Path(previous)
        old_cfg = json.loads((previous / ADAPTER_CONFIG).read_text())
        r_old, r = int(old_cfg["r"]), block.rank
        if r_old % r or abs(float(old_cfg["lora_alpha"]) / r_old - block.alpha / r) > 1e-9 * block.alpha / r:
            raise ValueError(f"{previous}: a LoRA of rank {r_old}, alpha {old_cfg['lora_alpha']} is no stack of blocks "
                             f"of rank {r}, alpha {block.alpha}")
        grown = dataclasses.replace(block, rank=r_old + r, alpha=block.alpha * (r_old + r) / r)
        params = attach_lora(mllm, grown, adapter_name, seed=seed)
        old = load_file(str(previous / ADAPTER_WEIGHTS))
        used = set()
        with torch.no_grad():
            for name, p in mllm.model.named_parameters():
                if not p.requires_grad:  # attach_lora left only this adapter's parameters trainable
                    continue
                key = _PREFIX + name.replace(f".{adapter_name}.", ".").replace(".modules_to_save.", ".")
                if key not in old:
                    raise ValueError(f"{previous}: no saved tensor {key} for the grown adapter")
                used.add(key)
                if ".lora_A." in name:
                    p[:r_old].copy_(old[key])
                    p.register_hook(_zero_rows(r_old))
                elif ".lora_B." in name:
                    p[:, :r_old].copy_(old[key])
                    p.register_hook(_zero_cols(r_old))
                else:  # the projector copy: a full parameter, it continues
                    p.copy_(old[key])
        if set(old) - used:
            raise ValueError(f"{previous}: {len(set(old) - used)} saved tensors have no place in the grown adapter")
        if merged_dropout and block.dropout > 0:
            for module in mllm.model.modules():
                if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                    module.lora_A[adapter_name] = NewRowsDropout(module.lora_A[adapter_name].weight, r_old,
                                                                 block.dropout)
                    module.lora_dropout[adapter_name] = torch.nn.Identity()
    found = blocks(mllm, adapter_name, r_old)
    if not train_a:
        frozen = {id(b.A) for b in found}
        for b in found:
            b.A.requires_grad_(False)
        params = [p for p in params if id(p) not in frozen]
    return params, found


def _zero_rows(k: int):
    def hook(g: torch.Tensor) -> torch.Tensor:
        g = g.clone()
        g[:k] = 0
        return g
    return hook


def _zero_cols(k: int):
    def hook(g: torch.Tensor) -> torch.Tensor:
        g = g.clone()
        g[:, :k] = 0
        return g
    return hook
