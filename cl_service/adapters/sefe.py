"""SEFE's RegLoRA (Chen et al., ICML 2025, "SEFE: Superficial and Essential Forgetting Eliminator") as the MLLM-CL
reference code (MCITlib) runs it: jobs of kind ``sefe``.

Per task ``t`` (after the first):

1. **Key positions.** For every adapted Linear, the previous task's LoRA block gives ``dW = B A`` (unscaled); its
   key positions are the ``key_fraction`` (2%) entries of largest ``|dW|``. They join the key positions of the
   tasks before (the union; the reference concatenates the index lists, so a position two tasks share counts
   twice in its mean: here once).
2. **Training.** A fresh LoRA block is trained on the model merged so far (:mod:`cl_service.adapters.merged`: the
   earlier blocks frozen) with the answer loss plus ``reg_weight * mean over adapted Linears of mean |(B A)[key
   positions]|`` of the new block (unscaled ``B A``, as the reference; 2.5e3 there). The penalty is zero wherever
   the new block leaves the key positions alone: it holds the entries where earlier tasks' knowledge sits.
3. **Merge.** The block stays in the stack: the stage's adapter is the merged model (base + every block).

The first task is a plain LoRA (the method trains it as a ``sequential`` job; this family also trains it when a
job has no ``init_adapter``). Saved next to the peft LoRA: ``sefe_key_positions.safetensors`` (per adapted Linear,
by module path, the key positions as a bitmask of its ``out x in`` entries in row-major order, bit ``i`` of byte
``j`` = entry ``8 j + i``, ``uint8``) and ``sefe_config.json``. A bitmask is ``out * in / 8`` bytes whatever the
number of tasks; flat int32 indices would take 4 bytes per position, less only while the union holds under 3.1%
of the entries (one or two tasks).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cl_service.adapters.family import FAMILIES, TRAIN_ADAPTER, Attached, JobData
from cl_service.adapters.lora import ADAPTER_WEIGHTS, remove_lora, save_adapter
from cl_service.adapters.merged import Block, attach_stacked, saved_pairs, saved_rank
from cl_service.models.mllm import MLLM

KEY_POSITIONS = "sefe_key_positions.safetensors"
SEFE_CONFIG = "sefe_config.json"
_BITS = 1 << torch.arange(8, dtype=torch.int32)


def key_positions(delta: torch.Tensor, fraction: float) -> torch.Tensor:
    """The flat (row-major) indices of the ``fraction`` largest ``|delta|`` entries (at least one), sorted, int64."""
    k = max(1, int(fraction * delta.numel()))
    return torch.topk(delta.detach().abs().reshape(-1).float(), k).indices.sort().values


def pack_positions(idx: torch.Tensor, numel: int) -> torch.Tensor:
    """Flat indices into ``numel`` entries as a bitmask, ``uint8 [ceil(numel / 8)]`` (bit ``i`` of byte ``j``:
    entry ``8 j + i``)."""
    bits = torch.zeros(-(-numel // 8) * 8, dtype=torch.int32)
    bits[idx.long().cpu()] = 1
    return (bits.view(-1, 8) * _BITS).sum(1).to(torch.uint8)


def unpack_positions(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The flat indices, sorted int64, that :func:`pack_positions` packed."""
    bits = (packed.to(torch.int32).view(-1, 1) & _BITS).ne(0).reshape(-1)
    if bits[numel:].any():
        raise ValueError(f"key positions past the matrix's {numel} entries")
    return bits[:numel].nonzero().view(-1)


def read_key_positions(folder: str | Path) -> dict[str, torch.Tensor]:
    """Module path -> flat key positions (sorted int64) of a stage saved by this family (empty for the first
    task's plain LoRA, which has none)."""
    folder = Path(folder)
    if not (folder / KEY_POSITIONS).is_file():
        return {}
    shapes = json.loads((folder / SEFE_CONFIG).read_text())["shapes"]
    return {name: unpack_positions(packed, shapes[name][0] * shapes[name][1])
            for name, packed in load_file(str(folder / KEY_POSITIONS)).items()}


def union_key_positions(previous: str | Path, block_rank: int, fraction: float) -> dict[str, torch.Tensor]:
    """The key positions a task after ``previous`` is regularised on: per adapted Linear, those of the last block
    of ``previous``'s stack (rank ``block_rank``) joined with the ones ``previous`` was itself trained against."""
    earlier = read_key_positions(previous)
    if saved_rank(previous) % block_rank:
        raise ValueError(f"{previous}: rank {saved_rank(previous)} is not a multiple of the block rank {block_rank}")
    out = {}
    for name, (a, b) in saved_pairs(load_file(str(Path(previous) / ADAPTER_WEIGHTS))).items():
        new = key_positions(b[:, -block_rank:].float() @ a[-block_rank:].float(), fraction)
        out[name] = torch.unique(torch.cat([earlier[name], new])) if name in earlier else new
    missing = set(earlier) - set(out)
    if missing:
        raise ValueError(f"{previous}: key positions of {len(missing)} Linears the LoRA does not adapt")
    return out


def key_penalty(found: list[Block], positions: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over the adapted Linears of the mean ``|B_new A_new|`` at their key positions (unscaled)."""
    terms = [b.new_delta().reshape(-1)[positions[b.name]].abs().mean() for b in found]
    return torch.stack(terms).mean()


class SEFEFamily:
    """Jobs of kind ``sefe`` (module docstring). Options: ``key_fraction``, ``reg_weight``. Saved and answered as a
    plain peft LoRA (the merged model) plus the key positions."""

    name = "sefe"
    reuses_base = True

    def prepare(self, job, mllm: MLLM, data: JobData) -> dict[str, torch.Tensor]:
        """The key positions this task is regularised on (none for the first task)."""
        if not job.init_adapter:
            return {}
        return union_key_positions(job.init_adapter, job.lora.rank, float(job.option("key_fraction")))

    def attach(self, job, mllm: MLLM, positions: dict[str, torch.Tensor]) -> Attached:
        if job.train.weight_decay:
            raise ValueError("sefe needs weight_decay=0 (decay would move the merged blocks of earlier tasks)")
        params, found = attach_stacked(mllm, job.init_adapter, job.lora, TRAIN_ADAPTER, seed=job.seed)
        if not positions:
            return Attached(params, extra={"positions": {}, "found": found})
        if {b.name for b in found} != set(positions):
            raise ValueError(f"{job.name}: key positions and adapted Linears differ")
        on_device = {name: idx.to(mllm.device) for name, idx in positions.items()}
        weight = float(job.option("reg_weight"))
        return Attached(params, penalty=lambda: weight * key_penalty(found, on_device),
                        extra={"positions": positions, "found": found})

    def save(self, job, mllm: MLLM, folder: Path, attached: Attached) -> None:
        save_adapter(mllm, folder, TRAIN_ADAPTER)
        positions = attached.extra["positions"]
        if not positions:
            return
        shapes = {b.name: list(b.weight.shape) for b in attached.extra["found"]}
        save_file({name: pack_positions(idx, shapes[name][0] * shapes[name][1]) for name, idx in positions.items()},
                  str(Path(folder) / KEY_POSITIONS), metadata={"format": "pt"})
        (Path(folder) / SEFE_CONFIG).write_text(json.dumps({
            "method": "sefe (RegLoRA)", "block_rank": job.lora.rank,
            "blocks": saved_rank(job.init_adapter) // job.lora.rank + 1,
            "key_fraction": float(job.option("key_fraction")), "reg_weight": float(job.option("reg_weight")),
            "shapes": shapes,
            "key_positions": "per adapted Linear: the union over the earlier tasks' blocks of the key_fraction largest "
                             "|B A| entries; a bitmask of the out x in entries, row-major, bit i of byte j = entry 8j+i",
            "positions": {name: int(idx.numel()) for name, idx in positions.items()},
        }, indent=2))

    def release(self, mllm: MLLM) -> None:
        remove_lora(mllm)


FAMILIES.register("sefe", SEFEFamily())
