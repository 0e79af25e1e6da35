"""CL-MoE (Huai et al., CVPR 2025, "Dual Momentum Mixture-of-Experts") as an adapter family: jobs of kind ``clmoe``.

As the MLLM-CL reference code (MCITlib) runs it, CL-MoE is a MoE-LoRA (:mod:`cl_service.adapters.moelora`): on every
adapted decoder Linear ``job.moe_experts`` LoRA experts of rank ``r / experts`` mixed per token by a softmax gate,
warm-started from the previous task's adapter, every expert and gate trained. That is this family without options.

With ``job.option("paper")`` it adds the paper's two mechanisms (the paper's, not the reference code's, which has
neither: only a commented-out line). Read from the paper's formulas and the authors' released code; simplified where
noted:

- **Dual router.** Each gate is ``beta * G_I(x) + (1 - beta) * G_T``: ``G_I`` the token-level (instance) gate, ``G_T``
  a task-level expert weighting. ``G_T(t)`` of task ``t`` is, per adapted Linear, the share of the task's training
  tokens whose top-``top_k`` experts under the instance gate include each expert (the statistic the authors' code
  collects), measured by a pass over the task's training samples with the adapter the task starts from (the
  previous task's, as it answers; a fresh one at the first task), before training. Simplification: the paper's
  task router is not learned here, and is measured before (not during) training. While task ``t`` trains its
  gates mix in ``G_T(t)``; at test time no task identity is given (MLLM-CL evaluates without task labels), so the
  mean of the seen tasks' ``G_T`` is mixed in.
- **Momentum between tasks.** After task ``t`` trains, each expert's ``A`` and ``B`` become
  ``lambda_e * theta_{t-1} + (1 - lambda_e) * phi_t`` (``theta_{t-1}``: the previous task's adapter, ``phi_t``: the
  trained weights; the gate keeps its trained value). ``lambda_e = 1 - momentum`` for experts among the previous
  task's top-``top_k`` but not the current task's, ``momentum`` for the others, as the authors' released merge
  script sets them; here per adapted Linear (that script ranks experts once over all layers).

Saved: the MoE-LoRA files (``moelora_config.json`` naming method ``clmoe``), and with ``paper``
``clmoe_task_gates.safetensors`` (``<Linear path>`` -> ``[tasks, experts]``, the task gates of every task seen, in
stream order) and ``clmoe_config.json`` (beta, momentum, top_k, the tasks).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors.torch import load_file, save_file

from cl_service.adapters.family import FAMILIES, Attached, JobData
from cl_service.adapters.lora import ADAPTER_WEIGHTS
from cl_service.adapters.moelora import (ATTR, MoELoRA, MoELoRASpec, attach_moelora, describe, moelora_active,
                                         save_moelora)
from cl_service.models.mllm import MLLM

TASK_GATES = "clmoe_task_gates.safetensors"
CLMOE_CONFIG = "clmoe_config.json"


def gate_usage(moe: MoELoRA, mllm: MLLM, batches: Iterable[dict], top_k: int) -> dict[str, torch.Tensor]:
    """Per adapted Linear, the share of the batches' tokens (padding left out) whose top-``top_k`` experts under
    ``moe``'s instance gate include each expert: ``path -> [E]`` float32, summing to 1. ``moe`` must be the
    MoE-LoRA the model runs with (hooked in, or with zero updates)."""
    experts = moe.spec.experts
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k={top_k} must be between 1 and the {experts} experts")
    counts = {name: torch.zeros(experts, dtype=torch.float64) for name, _, _ in moe.linears()}
    mask: dict[str, torch.Tensor] = {}

    def recorder(name: str, layer: Any):
        def pre(_module, args) -> None:
            x, m = args[0], mask["m"]
            if x.shape[:-1] != m.shape:
                raise RuntimeError(f"{name}: input {tuple(x.shape)} does not match the attention mask {tuple(m.shape)}")
            top = layer.gates(x).topk(top_k, dim=-1).indices
            hits = torch.zeros(*x.shape[:-1], experts, device=x.device).scatter_(-1, top, 1.0)
            counts[name] += hits[m].sum(0).to(device="cpu", dtype=torch.float64)
        return pre

    handles = [lin.register_forward_pre_hook(recorder(name, layer)) for name, lin, layer in moe.linears()]
    was_training = mllm.model.training
    mllm.model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                mask["m"] = batch["attention_mask"].to(mllm.device).bool()
                mllm.loss(batch)
    finally:
        for h in handles:
            h.remove()
        mllm.model.train(was_training)
    return {name: (c / c.sum()).to(torch.float32) for name, c in counts.items()}


def momentum_merge(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor], prev_gate: dict[str, torch.Tensor],
                   cur_gate: dict[str, torch.Tensor], top_k: int, momentum: float) -> dict[str, torch.Tensor]:
    """The momentum update of MoE-LoRA tensors (:meth:`MoELoRA.state` layout): for each adapted Linear and expert
    ``e``, ``A_e`` and ``B_e`` become ``lam_e * old + (1 - lam_e) * new`` with ``lam_e = 1 - momentum`` when ``e``
    is among the top-``top_k`` of ``prev_gate`` and not of ``cur_gate``, else ``momentum``; gates keep ``new``."""
    out = dict(new)
    for name, cur in cur_gate.items():
        prev_top = set(prev_gate[name].topk(top_k).indices.tolist())
        cur_top = set(cur.topk(top_k).indices.tolist())
        lam = torch.full((cur.numel(),), float(momentum), dtype=torch.float64)
        for e in prev_top - cur_top:
            lam[e] = 1.0 - momentum
        for p in ("A", "B"):
            key = f"{name}.{p}"
            o, n = old[key], new[key]
            w = lam.view(-1, *([1] * (o.dim() - 1)))
            out[key] = (w * o.to(torch.float64) + (1 - w) * n.to(torch.float64)).to(n.dtype)
    return out


def read_task_gates(path: str | Path) -> tuple[list[str], dict[str, torch.Tensor], dict[str, Any]]:
    """``(tasks, path -> [tasks, E] task gates, clmoe_config.json)`` of a CL-MoE adapter saved with the paper's
    mechanisms; ``ValueError`` for one without."""
    path = Path(path)
    try:
        cfg = json.loads((path / CLMOE_CONFIG).read_text())
        gates = load_file(str(path / TASK_GATES))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} holds no CL-MoE task gates ({CLMOE_CONFIG}, {TASK_GATES}): {e}") from None
    tasks = list(cfg["tasks"])
    if any(g.shape[0] != len(tasks) for g in gates.values()):
        raise ValueError(f"{path}: task gates do not cover the {len(tasks)} tasks of {CLMOE_CONFIG}")
    return tasks, gates, cfg


def _mix_seen(moe: MoELoRA, path: Path) -> None:
    """At test time (no task identity): the mean of the seen tasks' gates mixed into every gate."""
    if not (path / CLMOE_CONFIG).is_file():
        return
    _, gates, cfg = read_task_gates(path)
    moe.mix({name: g.mean(0) for name, g in gates.items()}, cfg["beta"])


class CLMoEFamily:
    """Jobs of kind ``clmoe`` (module docstring). Options: ``paper`` (bool), ``beta``, ``momentum``, ``top_k``."""

    name = "clmoe"
    reuses_base = False  # as MoE-LoRA: its hooks stay on the model

    def _paper(self, job) -> dict[str, Any] | None:
        if not job.option("paper"):
            return None
        return {"beta": float(job.option("beta")), "momentum": float(job.option("momentum")),
                "top_k": int(job.option("top_k"))}

    def prepare(self, job, mllm: MLLM, data: JobData) -> dict[str, Any] | None:
        """With ``paper``: the task gate of ``job.task`` (module docstring), appended to those of the tasks before."""
        paper = self._paper(job)
        if paper is None:
            return None
        spec = MoELoRASpec.of(job.lora, job.moe_experts)
        with contextlib.ExitStack() as stack:
            if job.init_adapter:
                tasks, before, _ = read_task_gates(job.init_adapter)
                moe = stack.enter_context(self.active(mllm, job.init_adapter, {}, None))
            else:  # the fresh MoE-LoRA attach builds (same seed): its updates are zero, its gates are not
                tasks, before = [], {}
                moe = MoELoRA(mllm, spec, seed=job.seed).to(device=mllm.device)
            usage = gate_usage(moe, mllm, data.batches(), paper["top_k"])
        gates = {name: torch.cat([before[name], g[None]]) if before else g[None] for name, g in usage.items()}
        return {**paper, "tasks": tasks + [job.task], "gates": gates}

    def attach(self, job, mllm: MLLM, prepared: dict[str, Any] | None) -> Attached:
        params = attach_moelora(mllm, MoELoRASpec.of(job.lora, job.moe_experts), seed=job.seed, init=job.init_adapter)
        if prepared is not None:  # training task t: its own task gate mixed in
            getattr(mllm.model, ATTR).mix({name: g[-1] for name, g in prepared["gates"].items()}, prepared["beta"])
        return Attached(params, extra=prepared)

    def save(self, job, mllm: MLLM, folder: Path, attached: Attached) -> None:
        p = attached.extra
        moe = getattr(mllm.model, ATTR)
        if p is not None and job.init_adapter:  # the momentum update against the previous task's adapter
            old = load_file(str(Path(job.init_adapter) / ADAPTER_WEIGHTS))
            gates = p["gates"]
            moe.load_state(momentum_merge(old, moe.state(), {n: g[-2] for n, g in gates.items()},
                                          {n: g[-1] for n, g in gates.items()}, p["top_k"], p["momentum"]),
                           "the momentum update")
        save_moelora(mllm, folder, method="clmoe")
        if p is not None:
            save_file({n: g.contiguous() for n, g in p["gates"].items()}, str(Path(folder) / TASK_GATES),
                      metadata={"format": "pt"})
            (Path(folder) / CLMOE_CONFIG).write_text(json.dumps({
                "paper": True, "beta": p["beta"], "momentum": p["momentum"], "top_k": p["top_k"], "tasks": p["tasks"],
                "gate": "beta * softmax(gate @ x) + (1 - beta) * task gate (training: its task's; test: the mean "
                        "over the tasks)",
                "task_gate": "per Linear: share of the task's training tokens whose top_k experts include each "
                             "expert, before training the task",
                "momentum_update": "A, B of expert e: lam_e * previous + (1 - lam_e) * trained; lam_e = 1 - momentum "
                                   "for the previous task's top_k experts not in the current task's, else momentum",
            }, indent=2))

    def active(self, mllm: MLLM, path: str | Path, cache: dict, verify: Callable[[Path], object] | None):
        return moelora_active(mllm, path, cache, verify, setup=_mix_seen)

    def describe(self, path: str | Path) -> str:
        return "a CL-MoE adapter, " + describe(path)


FAMILIES.register("clmoe", CLMoEFamily())
