"""KeepLoRA (Luo et al., ICLR 2026, "KeepLoRA: Continual Learning with Residual Gradient Adaptation"): jobs of kind
``keeplora``, as the authors' LLaVA code (their repository's MCITlib port) runs it.

Every adapted Linear keeps a *protected subspace* of its input space, orthonormal rows ``U`` ``[k, in]``:

- **Before the first task**, the top right singular vectors of the pretrained weight ``W_0`` whose squared singular
  values hold ``base_energy`` (0.6) of the total (the reference's rule: the leading directions whose cumulative
  share stays below it, at least one): where general knowledge sits.
- **Each task** (the family's preparation pass, on the model merged so far): the gradients of the answer loss with
  respect to every adapted weight, averaged over a seeded ``grad_fraction`` (20%) of the task's training samples
  (the mean over micro-batches of their token-mean loss; the reference takes batches of one sample), with the
  protected subspace projected out on the input side, ``G <- G - G U^T U`` (the reference's ``G^T - U^T U G^T``); the
  top ``r`` right singular vectors of the result are the new block's ``A``, which stays frozen, and only ``B``
  (zero at the start, so the stage starts as the model merged so far) trains. Rows for directions the projected
  gradient does not have (rank below ``r``) are zero.
- **After the task** (when the stage is saved): the same gradient pass on the newly merged model; its directions
  outside ``U`` are appended until ``U`` holds ``task_energy`` (0.99) of that gradient's energy (the energy ``U``
  already holds counts), so later tasks keep out of them.

The gradient with respect to an adapted base weight, taken with the stacked LoRA attached, is the gradient with
respect to the merged weight (:mod:`cl_service.adapters.merged`): no weight is merged in place, and the stage is
the merged model as one peft LoRA. Merging is cumulative (each task's block on top of the earlier ones), as the
paper and the authors' scripts merge; one MCITlib v3 script merges a task's LoRA onto the original base instead,
which would drop every earlier task from the model: not done here.

Saved next to the peft LoRA: ``keeplora_subspace.safetensors`` (module path -> ``U`` after this task, float16,
orthonormalised again in float32 when read) and ``keeplora_config.json`` (the settings and each Linear's ``k``).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors.torch import load_file, save_file

from cl_service.adapters.family import FAMILIES, TRAIN_ADAPTER, Attached, JobData
from cl_service.adapters.lora import load_adapter, remove_lora, save_adapter, target_regex, used_vision_layers
from cl_service.adapters.merged import Block, attach_stacked, blocks, saved_rank
from cl_service.models.mllm import MLLM
from cl_service.train.loop import autocast_kind

SUBSPACE = "keeplora_subspace.safetensors"
KEEPLORA_CONFIG = "keeplora_config.json"
_PREVIOUS = "keeplora-merged"


def energy_count(s: torch.Tensor, energy: float) -> int:
    """How many leading singular values ``s`` (descending) keep their cumulative share of ``sum(s^2)`` below
    ``energy``, at least one (the reference's rule for the pretrained weights)."""
    e = s.double().pow(2)
    return max(1, int(((e.cumsum(0) / e.sum()) < energy).sum()))


def weight_subspace(weight: torch.Tensor, energy: float) -> torch.Tensor:
    """The protected input directions of a pretrained weight ``[out, in]``: its top right singular vectors by
    :func:`energy_count`, ``[k, in]`` float32."""
    _, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    return vh[:energy_count(s, energy)].contiguous()


def project_out(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``g - g u^T u``: ``g`` ``[out, in]`` without its part in the input directions ``u`` ``[k, in]``."""
    return g - (g @ u.T) @ u


def init_a(g: torch.Tensor, u: torch.Tensor, rank: int) -> torch.Tensor:
    """A new block's frozen ``A`` ``[rank, in]``: the top right singular vectors of ``g`` with ``u`` projected out,
    projected once more (exactly orthogonal to ``u`` in float32), each row's largest entry positive; rows past the
    projected gradient's rank are zero."""
    m = project_out(g.float(), u)
    _, s, vh = torch.linalg.svd(m, full_matrices=False)
    a = torch.zeros(rank, g.shape[1], dtype=torch.float32, device=g.device)
    n = min(rank, vh.shape[0])
    keep = s[:n] > s[0] * 1e-6 if s.numel() and s[0] > 0 else torch.zeros(n, dtype=torch.bool, device=g.device)
    a[:n] = vh[:n] * keep[:, None]
    a = project_out(a, u)
    # A singular vector's sign is arbitrary, and which one an SVD returns flips under float rounding (the same task
    # trained on 1 or 2 workers): fix it, each row's largest entry positive, so that A depends on the gradient alone.
    top = a.abs().argmax(dim=1, keepdim=True)
    return a * torch.where(a.gather(1, top) < 0, -1.0, 1.0)


def extend(u: torch.Tensor, g: torch.Tensor, energy: float) -> torch.Tensor:
    """``u`` ``[k, in]`` with the input directions of ``g`` ``[out, in]`` outside it appended, largest first, until
    ``u`` holds ``energy`` of ``g``'s energy ``||g||_F^2`` (what ``u`` holds already counts); at most ``in`` rows."""
    g = g.float()
    total = float(g.pow(2).sum())
    if total == 0.0:
        return u
    m = project_out(g, u)
    _, s, vh = torch.linalg.svd(m, full_matrices=False)
    held = (total - float(m.pow(2).sum())) / total
    shares = (s.double().pow(2) / total).tolist()
    r = 0
    while held < energy and r < len(shares):
        held += shares[r]
        r += 1
    return torch.cat([u, vh[:r]])[: g.shape[1]].contiguous()


def orthonormal(u: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning ``u``'s rows (QR in float32): a subspace read back from float16."""
    q, _ = torch.linalg.qr(u.float().T)
    return q.T.contiguous()


def gradient_pass(mllm: MLLM, weights: dict[str, torch.nn.Parameter], batches: Iterable[dict], n: int,
                  each: Callable[[str, torch.Tensor], None], autocast: str = "none") -> None:
    """The mean over ``n`` micro-batches of the answer loss's gradient with respect to each of ``weights`` (base
    weights), given to ``each(name, grad)`` as float32 ``[out, in]`` one weight at a time. Only these weights take
    gradients (dropout off); every parameter's ``requires_grad`` and the train/eval mode are restored after.
    ``autocast``: ``bfloat16`` runs the passes under autocast, as training does on GPUs."""
    flags = [(p, p.requires_grad) for p in mllm.model.parameters()]
    was_training = mllm.model.training
    cast = (torch.autocast(mllm.device.type, dtype=torch.bfloat16) if autocast == "bfloat16"
            else contextlib.nullcontext())
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for w in weights.values():
            w.grad = None
            w.requires_grad_(True)
        mllm.model.eval()
        for batch in batches:
            with cast:
                loss = mllm.loss(batch) / n
            loss.backward()
        for name, w in weights.items():
            if w.grad is None:
                raise ValueError(f"keeplora: no gradient reached {name}")
            g, w.grad = w.grad.float(), None
            each(name, g)
    finally:
        for w in weights.values():
            w.grad = None
        for p, flag in flags:
            p.requires_grad_(flag)
        mllm.model.train(was_training)


def read_subspace(folder: str | Path) -> dict[str, torch.Tensor]:
    """Module path -> protected subspace ``[k, in]`` (orthonormal, float32) saved with a KeepLoRA stage."""
    path = Path(folder) / SUBSPACE
    if not path.is_file():
        raise ValueError(f"{folder} holds no KeepLoRA protected subspace ({SUBSPACE})")
    return {name: orthonormal(u) for name, u in load_file(str(path)).items()}


def _target_linears(mllm: MLLM, job) -> dict[str, torch.nn.Parameter]:
    """The base weights the job's LoRA adapts, by module path: the Linears its target regex names (no LoRA
    attached) or the base layers of the attached LoRA."""
    if mllm.peft is not None:
        return {b.name: b.weight for b in blocks(mllm, _PREVIOUS)}
    regex = re.compile(target_regex(job.lora, used_vision_layers(mllm)))
    out = {n: m.weight for n, m in mllm.model.named_modules()
           if isinstance(m, torch.nn.Linear) and regex.fullmatch(n)}
    if not out:
        raise ValueError(f"{job.name}: the LoRA targets name no Linear of the model")
    return out


def _gradients(job, mllm: MLLM, weights: dict[str, torch.nn.Parameter], data: JobData, chosen: list,
               each: Callable[[str, torch.Tensor], None]) -> None:
    """:func:`gradient_pass` over the samples ``chosen`` in the job's micro-batches and autocast."""
    gradient_pass(mllm, weights, data.batches(chosen), math.ceil(len(chosen) / data.batch_size), each,
                  autocast_kind(job.train, mllm.device.type == "cuda"))


class KeepLoRAFamily:
    """Jobs of kind ``keeplora`` (module docstring). Options: ``grad_fraction``, ``base_energy``, ``task_energy``.
    Saved and answered as a plain peft LoRA (the merged model) plus the protected subspace."""

    name = "keeplora"
    reuses_base = True

    def prepare(self, job, mllm: MLLM, data: JobData) -> dict[str, Any]:
        """The protected subspace the task starts with and its new block's ``A`` (module docstring)."""
        if job.init_adapter:
            protected = read_subspace(job.init_adapter)
            load_adapter(mllm, job.init_adapter, _PREVIOUS)  # the model merged so far, frozen
        else:
            protected = None
        try:
            weights = _target_linears(mllm, job)
            if protected is None:
                energy = float(job.option("base_energy"))
                protected = {name: weight_subspace(w.detach(), energy).cpu() for name, w in weights.items()}
            if set(protected) != set(weights):
                raise ValueError(f"{job.name}: the protected subspace and the adapted Linears differ")
            chosen = data.subset(float(job.option("grad_fraction")), seed=job.seed)
            a: dict[str, torch.Tensor] = {}
            _gradients(job, mllm, weights, data, chosen, lambda name, g: a.__setitem__(
                name, init_a(g, protected[name].to(g.device), job.lora.rank).cpu()))
        finally:
            if job.init_adapter:
                remove_lora(mllm)
        return {"A": a, "protected": protected, "samples": chosen, "data": data}

    def attach(self, job, mllm: MLLM, prepared: dict[str, Any]) -> Attached:
        if job.train.weight_decay:
            raise ValueError("keeplora needs weight_decay=0 (decay would move the merged blocks of earlier tasks)")
        params, found = attach_stacked(mllm, job.init_adapter, job.lora, TRAIN_ADAPTER, seed=job.seed, train_a=False)
        if {b.name for b in found} != set(prepared["A"]):
            raise ValueError(f"{job.name}: the prepared A blocks and the adapted Linears differ")
        with torch.no_grad():
            for b in found:
                b.A[b.r_old:].copy_(prepared["A"][b.name])
        return Attached(params, extra={**prepared, "found": found})

    def save(self, job, mllm: MLLM, folder: Path, attached: Attached) -> None:
        save_adapter(mllm, folder, TRAIN_ADAPTER)
        found: list[Block] = attached.extra["found"]
        protected, data = attached.extra["protected"], attached.extra["data"]
        energy = float(job.option("task_energy"))
        grown: dict[str, torch.Tensor] = {}
        chosen = attached.extra["samples"]
        _gradients(job, mllm, {b.name: b.weight for b in found}, data, chosen,
                   lambda name, g: grown.__setitem__(name, extend(protected[name].to(g.device), g, energy).cpu()))
        save_file({name: u.to(torch.float16).contiguous() for name, u in grown.items()}, str(Path(folder) / SUBSPACE),
                  metadata={"format": "pt"})
        (Path(folder) / KEEPLORA_CONFIG).write_text(json.dumps({
            "method": "keeplora", "block_rank": job.lora.rank,
            "blocks": (saved_rank(job.init_adapter) // job.lora.rank if job.init_adapter else 0) + 1,
            "grad_fraction": float(job.option("grad_fraction")), "base_energy": float(job.option("base_energy")),
            "task_energy": energy, "grad_samples": len(chosen),
            "protected_rank": {name: int(u.shape[0]) for name, u in grown.items()},
            "subspace": "per adapted Linear: orthonormal input directions U [k, in] later tasks' A keep out of (the "
                        "pretrained weight's top singular directions, then each task's gradient directions)",
        }, indent=2))

    def release(self, mllm: MLLM) -> None:
        remove_lora(mllm)


FAMILIES.register("keeplora", KeepLoRAFamily())
