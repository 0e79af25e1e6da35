"""MoE-LoRA (the MoELoRA baseline of the MLLM-CL comparison): every adapted Linear holds ``E`` small LoRA
experts and a token gate; the update for token ``x`` is ``scale · Σ_e softmax(G x)_e · B_e A_e x``. The rank
is split: each expert has rank ``r / E`` of the configured ``r``, so the adapter has one LoRA's parameter
count (plus the gates), with ``scale = alpha / r`` as for the whole LoRA.

Trained sequentially over the stream like ``lora_ft`` (all experts and gates shared by every task); the
gate lets tokens of different tasks lean on different experts, which is how it is meant to forget less
than one LoRA. It adapts the decoder Linears of ``LoraCfg.targets``; the projector and the CLIP tower stay
frozen.

The experts live in one module tree, :class:`MoELoRA`, registered on the model as ``mllm.model.moelora``
(so optimizers and DDP see its parameters) and applied through forward hooks on the base Linears: active
only inside :func:`moelora_active` or while attached for training. Saved layout: ``moelora_config.json``
(method, experts, rank, alpha, dropout, targets, the update's formula and tensor shapes: no plain peft LoRA
expresses a token-gated mixture, so tools other than cl-service cannot load it) + ``adapter_model.safetensors`` (``<module path>.{A,B,gate}``), checksummed by the adapter registry like
any adapter; :func:`is_moelora` tells the folders apart.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from cl_service.adapters.family import FAMILIES, Attached
from cl_service.adapters.lora import ADAPTER_WEIGHTS, TEXT_TARGETS, LoraCfg
from cl_service.models.mllm import MLLM

MOELORA_CONFIG = "moelora_config.json"
ATTR = "moelora"


@dataclass(frozen=True)
class MoELoRASpec:
    """What a saved MoE-LoRA is: experts per Linear, the total rank ``rank`` (each expert has ``rank /
    experts``), alpha, dropout, and the adapted Linears."""

    experts: int
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    @property
    def expert_rank(self) -> int:
        return self.rank // self.experts

    @classmethod
    def of(cls, lora: LoraCfg, experts: int) -> "MoELoRASpec":
        if experts < 1:
            raise ValueError(f"moelora needs at least 1 expert per Linear, got {experts}")
        if lora.rank % experts:
            raise ValueError(f"moelora splits the LoRA rank over its experts: rank {lora.rank} is not a multiple "
                             f"of {experts} experts")
        unknown = sorted(set(lora.targets) - set(TEXT_TARGETS))
        if unknown or not lora.targets:
            raise ValueError(f"unknown LoRA targets {unknown or '(none given)'}; known: {sorted(TEXT_TARGETS)}")
        return cls(int(experts), int(lora.rank), float(lora.alpha), float(lora.dropout), tuple(lora.targets))


class _MoELinear(torch.nn.Module):
    def __init__(self, d_in: int, d_out: int, spec: MoELoRASpec, gen: torch.Generator) -> None:
        super().__init__()
        E, r = spec.experts, spec.expert_rank
        bound = 1.0 / d_in ** 0.5  # A like nn.Linear's (kaiming-uniform) init, B zero: starts as the base
        self.A = torch.nn.Parameter((torch.rand(E, r, d_in, generator=gen) * 2 - 1) * bound)
        self.B = torch.nn.Parameter(torch.zeros(E, d_out, r))
        self.gate = torch.nn.Parameter((torch.rand(E, d_in, generator=gen) * 2 - 1) * bound)
        self.scale = spec.alpha / spec.rank  # the whole LoRA's scale (rank split over the experts)
        self.dropout = torch.nn.Dropout(spec.dropout)
        # A fixed expert weighting mixed into the gate (CL-MoE's task-level gate): beta * gate + (1 - beta) * prior.
        self.register_buffer("prior", None, persistent=False)
        self.beta = 1.0

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """The token gate ``softmax(gate @ x)`` of inputs ``x`` ``[..., in]``: ``[..., E]``."""
        return torch.softmax(x.to(self.gate.dtype) @ self.gate.T, dim=-1)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.A.dtype)
        g = self.gates(x)                                                # [..., E]
        if self.prior is not None:
            g = self.beta * g + (1 - self.beta) * self.prior.to(g.dtype)
        h = torch.einsum("...i,eri->...er", self.dropout(x), self.A)     # [..., E, r]
        y = torch.einsum("...er,eor->...eo", h * g.unsqueeze(-1), self.B)  # [..., E, out]
        return self.scale * y.sum(-2)


class MoELoRA(torch.nn.Module):
    """The experts and gates of every adapted Linear (keys: the Linear's module path, dots as ``__``)."""

    def __init__(self, mllm: MLLM, spec: MoELoRASpec, seed: int = 0) -> None:
        super().__init__()
        self.spec = spec
        gen = torch.Generator().manual_seed(seed)
        self.layers = torch.nn.ModuleDict()
        self._targets: dict[str, torch.nn.Module] = {}
        for name, lin in _target_linears(mllm, spec.targets):
            self.layers[name.replace(".", "__")] = _MoELinear(lin.in_features, lin.out_features, spec, gen)
            self._targets[name] = lin
        if not self._targets:
            raise ValueError(f"no decoder Linears match targets {spec.targets}")
        self._hooks: list = []

    def attach(self) -> None:
        """Add the experts' updates to the base Linears' outputs (idempotent)."""
        if self._hooks:
            return
        for name, lin in self._targets.items():
            moe = self.layers[name.replace(".", "__")]
            self._hooks.append(lin.register_forward_hook(lambda _m, args, out, moe=moe: out + moe.delta(args[0]).to(out.dtype)))

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def linears(self) -> Iterator[tuple[str, torch.nn.Linear, _MoELinear]]:
        """``(module path, base Linear, its experts and gate)`` of every adapted Linear."""
        for name, lin in self._targets.items():
            yield name, lin, self.layers[name.replace(".", "__")]

    def mix(self, priors: dict[str, torch.Tensor] | None, beta: float = 1.0) -> None:
        """Mix a fixed expert weighting into every gate: ``beta * softmax(gate @ x) + (1 - beta) * priors[path]``
        (``priors``: module path -> ``[E]``); None: the plain token gate."""
        for name, _, moe in self.linears():
            moe.prior = None if priors is None else priors[name].to(device=moe.gate.device, dtype=torch.float32)
            moe.beta = 1.0 if priors is None else float(beta)

    def state(self) -> dict[str, torch.Tensor]:
        """``<module path>.{A,B,gate}`` -> a CPU copy of each tensor (the saved layout)."""
        return {f"{name}.{p}": getattr(self.layers[name.replace('.', '__')], p).detach().contiguous().cpu()
                for name in self._targets for p in ("A", "B", "gate")}

    def load_state(self, saved: dict[str, torch.Tensor], source: str = "the given tensors") -> None:
        """Copy tensors of :meth:`state`'s layout in place; every tensor must be there, of the model's shapes."""
        mine = self.state()
        if set(saved) != set(mine):
            diff = sorted(set(saved) ^ set(mine))
            raise ValueError(f"{source}: MoE-LoRA tensors do not match this model ({len(diff)} differ, e.g. {diff[0]})")
        with torch.no_grad():
            for key, t in saved.items():
                name, _, p = key.rpartition(".")
                target = getattr(self.layers[name.replace(".", "__")], p)
                if target.shape != t.shape:
                    raise ValueError(f"{source}: {key} has shape {tuple(t.shape)}, the model needs {tuple(target.shape)}")
                target.copy_(t)


def _target_linears(mllm: MLLM, targets: tuple[str, ...]) -> Iterator[tuple[str, torch.nn.Linear]]:
    """The decoder's base Linears of ``targets`` (inside peft wrappers when peft is attached)."""
    suffixes = tuple("." + TEXT_TARGETS[t] for t in targets)
    for name, m in mllm.model.named_modules():
        if "language_model" not in name or ".layers." not in name:
            continue
        if name.endswith(suffixes) and isinstance(m, torch.nn.Linear):
            yield name, m
        elif name.endswith(tuple(s + ".base_layer" for s in suffixes)) and isinstance(m, torch.nn.Linear):
            yield name[: -len(".base_layer")], m


def attach_moelora(mllm: MLLM, spec: MoELoRASpec, seed: int = 0, init: str | Path | None = None
                   ) -> list[torch.nn.Parameter]:
    """Register a fresh MoE-LoRA on the model (or one loaded from ``init``, to continue it), hooked in and the
    only trainable part. Returns its parameters."""
    if hasattr(mllm.model, ATTR):
        raise ValueError("the model already holds a MoE-LoRA; detach_moelora first")
    if init is not None:
        saved = read_spec(init)
        if saved != spec:
            raise ValueError(f"{init}: saved MoE-LoRA {saved} differs from the requested {spec}")
    for p in mllm.model.parameters():
        p.requires_grad_(False)
    moe = MoELoRA(mllm, spec, seed)
    if init is not None:
        _load_weights(moe, init)
    moe.to(device=mllm.device)
    setattr(mllm.model, ATTR, moe)  # a submodule: optimizers, DDP and .to() see it
    moe.attach()
    params = list(moe.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def detach_moelora(mllm: MLLM) -> None:
    moe = getattr(mllm.model, ATTR, None)
    if moe is not None:
        moe.detach()
        delattr(mllm.model, ATTR)


def save_moelora(mllm: MLLM, path: str | Path, method: str = "moelora") -> Path:
    """Write the model's MoE-LoRA (weights + ``moelora_config.json`` naming ``method``) into ``path``."""
    moe = getattr(mllm.model, ATTR, None)
    if moe is None:
        raise KeyError("the model holds no MoE-LoRA to save")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(moe.state(), str(path / ADAPTER_WEIGHTS), metadata={"format": "pt", "kind": "moelora"})
    # Self-describing, like peft's adapter_config.json: what it is, and that no plain-LoRA tool loads it.
    described = {"method": method, **asdict(moe.spec), "expert_rank": moe.spec.expert_rank, "peft_compatible": False,
                 "update": "per token x: (alpha/rank) * sum_e softmax(gate @ x)_e * B_e @ A_e @ x",
                 "tensors": "<Linear path>.A [experts, expert_rank, in], .B [experts, out, expert_rank], .gate [experts, in]"}
    (path / MOELORA_CONFIG).write_text(json.dumps(described, indent=2))
    return path


def is_moelora(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / MOELORA_CONFIG).is_file()


def read_spec(path: str | Path) -> MoELoRASpec:
    path = Path(path)
    try:
        d = json.loads((path / MOELORA_CONFIG).read_text())
        return MoELoRASpec(int(d["experts"]), int(d["rank"]), float(d["alpha"]), float(d["dropout"]),
                           tuple(d["targets"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} holds no readable MoE-LoRA ({MOELORA_CONFIG}): {e}") from e


def _load_weights(moe: MoELoRA, path: str | Path) -> None:
    moe.load_state(load_file(str(Path(path) / ADAPTER_WEIGHTS)), str(path))


@contextlib.contextmanager
def moelora_active(mllm: MLLM, path: str | Path, cache: dict | None = None,
                   verify: Callable[[Path], object] | None = None, setup: Callable[[MoELoRA, Path], None] | None = None):
    """Inside the block, forward passes run base + the saved MoE-LoRA at ``path`` (frozen; peft adapters
    disabled). ``cache``: keeps the last few loaded MoE-LoRAs for reuse. ``verify(path)``: called before a
    load (not on a cache hit), e.g. the adapter registry's checksum check. ``setup(moe, path)``: called once per
    load, after the weights (e.g. to :meth:`MoELoRA.mix` in a saved task-level gate)."""
    path = Path(path).resolve()
    weights = path / ADAPTER_WEIGHTS
    key = f"{path}@{weights.stat().st_mtime_ns}" if weights.is_file() else None  # republished: load afresh
    moe = cache.get(key) if cache is not None and key is not None else None
    if moe is None:
        if verify is not None:
            verify(path)  # e.g. the registry's clear error for a missing or half-written adapter
        moe = MoELoRA(mllm, read_spec(path))
        _load_weights(moe, path)
        if setup is not None:
            setup(moe, path)
        moe.to(device=mllm.device).eval()
        for p in moe.parameters():
            p.requires_grad_(False)
        if cache is not None and key is not None:
            cache[key] = moe
            while len(cache) > 4:
                cache.pop(next(iter(cache)))
    with mllm.adapters_disabled():
        moe.attach()
        try:
            yield moe
        finally:
            moe.detach()


def describe(path: str | Path) -> str:
    """What the MoE-LoRA at ``path`` is, and why no plain peft LoRA or merged weight holds it."""
    try:
        spec = json.loads((Path(path) / MOELORA_CONFIG).read_text())
    except (OSError, ValueError):
        spec = {}
    return (f"a MoE-LoRA ({spec.get('experts')} token-gated LoRA experts per Linear, total rank {spec.get('rank')}): "
            f"its update depends on each token through a softmax gate, so it is not a plain peft LoRA and does not "
            f"merge into fixed weights (its folder, described by {MOELORA_CONFIG}, loads in cl-service only)")


class MoELoRAFamily:
    """Jobs of kind ``moelora``: a MoE-LoRA of ``job.moe_experts`` experts per Linear, fresh from the job's seed or
    continuing ``job.init_adapter``; all experts and gates train. Answered through its own hooks."""

    name = "moelora"
    reuses_base = False  # its hooks and registered module stay on the model: the next job loads a fresh base

    def attach(self, job, mllm: MLLM, prepared) -> Attached:
        return Attached(attach_moelora(mllm, MoELoRASpec.of(job.lora, job.moe_experts), seed=job.seed,
                                       init=job.init_adapter))

    def save(self, job, mllm: MLLM, folder: Path, attached: Attached) -> None:
        save_moelora(mllm, folder)

    def active(self, mllm: MLLM, path: str | Path, cache: dict, verify: Callable[[Path], object] | None):
        return moelora_active(mllm, path, cache, verify)

    def describe(self, path: str | Path) -> str:
        return describe(path)


MOELORA = MoELoRAFamily()
FAMILIES.register("moelora", MOELORA)
