"""Cross-adapter batched LoRA inference: rows of one batch use different experts in one base forward.

Every loaded adapter gets a *slot*; slot 0 is the plain base (no LoRA, base projector). For each adapted
decoder Linear the adapters' weights are stacked once (rank padded with zeros to the largest rank,
``alpha / r`` folded into B)::

    A   [S*r, in]     rows s*r .. s*r+r-1 = slot s's lora_A
    Bt  [S*r, out]    rows s*r .. s*r+r-1 = (slot s's lora_B * scale)^T

and a forward hook on the base Linear adds the row's own update to ``base(x)`` (``x [B, L, in]``, row
``b`` uses slot ``idx[b]``):

* one slot for the whole batch: two thin matmuls (``x @ A_s^T @ Bt_s``), as peft would;
* decode (``L == 1``) with ``B >= S``: all slots at once, ``((x @ A^T) * onehot(idx)) @ Bt`` (reads each
  stacked weight once per step, instead of a gathered copy per row);
* otherwise (prefill): gather each row's A/B and two batched matmuls (``bmm``), no Python loop.

A row may also mix adapters (:meth:`MultiLoRA.mixture`): a soft weight vector over the slots in place of the one-hot
gives ``sum_t w_t B_t A_t x`` (``((x @ A^T) * w) @ Bt``), and chosen modules can apply the product of sums
``(sum_t B_t)(sum_t A_t) x`` instead, the same for every row (HiDe-LLaVA's fused layers).

Each expert's own projector (peft ``modules_to_save``) is applied per group of images of the same slot
(a loop over the distinct slots, once per forward, not per layer). CLIP states are shared across slots
unless an adapter also adapts the vision tower; then that slot's images go through the tower with its
LoRA (uniform fast path). Nothing here knows of peft's module wrappers beyond finding the base Linear.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cl_service.models.mllm import MLLM

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_PROJECTOR = "model.multi_modal_projector"


@dataclass
class _Adapter:
    key: str
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A [r, in], B*scale [out, r])
    projector: dict[str, torch.Tensor] | None            # projector params (names relative to it) or None
    rank: int
    projector_module: torch.nn.Module | None = None      # its own copy of the projector holding those params

    @property
    def vision(self) -> bool:
        return any(".vision_tower." in m for m in self.lora)


@dataclass
class RowPlan:
    """Which slot each row of the running pass uses (one :meth:`MultiLoRA.rows` block)."""
    stacks: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    vision: bool
    idx: torch.Tensor                     # [B] slot per row
    uniform: int | None                   # the one slot of all rows, if so
    onehot: torch.Tensor | None = None    # [B, 1, S*r] for the decode path
    weights: torch.Tensor | None = None   # [B, 1, S*r] soft slot weights per row (a mixture; idx unused)
    fused: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # path -> (A [r, in], Bt [r, out]) for all rows


def read_lora(folder: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[dict, dict | None, int]:
    """A saved peft LoRA adapter as plain tensors: ``({module: (A, B·scale)}, projector params | None, rank)``.

    Module paths are relative to the ``LlavaForConditionalGeneration`` (``model.language_model.layers.0...``).
    """
    folder = Path(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder}: not a LoRA adapter ({cfg.get('peft_type')})")
    for unsupported in ("use_dora", "lora_bias"):
        if cfg.get(unsupported):
            raise ValueError(f"{folder}: {unsupported} adapters are not supported by multi-adapter batching")
    r_default, alpha_default = int(cfg["r"]), float(cfg["lora_alpha"])
    rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora"))
    state = load_file(str(folder / "adapter_model.safetensors"))
    halves: dict[str, dict[str, torch.Tensor]] = {}
    projector: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        m = _LORA_KEY.match(k)
        if m:
            halves.setdefault(m["mod"], {})[m["ab"]] = v
            continue
        name = k.removeprefix("base_model.model.")
        if name.startswith(_PROJECTOR + "."):
            projector[name[len(_PROJECTOR) + 1:]] = v.to(device, dtype)
        else:
            raise ValueError(f"{folder}: unexpected tensor {k!r} (only LoRA A/B and the projector are supported)")
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    rank = 0
    for mod, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{folder}: module {mod} lacks lora_{'B' if 'A' in ab else 'A'}")
        r = ab["A"].shape[0]
        pat_r = next((int(v) for p, v in rank_pat.items() if re.search(p, mod)), r_default)
        alpha = next((float(v) for p, v in alpha_pat.items() if re.search(p, mod)), alpha_default)
        scale = alpha / (pat_r ** 0.5 if rslora else pat_r)
        lora[mod] = (ab["A"].to(device, torch.float32).to(dtype), (ab["B"].float() * scale).to(device, dtype))
        rank = max(rank, r)
    return lora, (projector or None), rank


_LAYER = re.compile(r"(?:^|\.)language_model\.(?:.*\.)?layers\.(\d+)\.")


def decoder_layer(path: str) -> int | None:
    """The decoder layer index of an adapted module path (``model.language_model.layers.3.self_attn.q_proj``: 3);
    None for a vision-tower module."""
    m = _LAYER.search(path)
    return int(m.group(1)) if m and ".vision_tower." not in path else None


def _moved(a: _Adapter, device: torch.device, pin: bool = False) -> _Adapter:
    """``a`` with its LoRA tensors and projector on ``device`` (pinned host memory with ``pin``: faster copies
    back to the GPU). Blocking copies: the two stages of a server may page on different CUDA streams, and
    a copy still in flight on one must not be read on the other."""
    def mv(t: torch.Tensor) -> torch.Tensor:
        if pin:  # straight into page-locked memory: one copy, not a pageable one then a pinned one
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
        return t.to(device)

    lora = {m: (mv(A), mv(B)) for m, (A, B) in a.lora.items()}
    module, projector = a.projector_module, a.projector
    if module is not None:  # the module holds the projector tensors (loaded with assign=True): move it alone
        module = module.to(device)
        held = dict(module.named_parameters()) | dict(module.named_buffers())
        projector = {k: held[k].data for k in a.projector or {}}
    return _Adapter(a.key, lora, projector, a.rank, module)


class MultiLoRA:
    """Stacked LoRA adapters over one frozen base, applied per row.

    Use::

        ml = MultiLoRA(mllm); ml.load("expert-a", folder_a); ml.load("expert-b", folder_b)
        with mllm.adapters_disabled(), ml.rows(["expert-a", None, "expert-b"]):
            texts = mllm.generate(samples, 16, len(samples), image_features=ml.features_fn(keys))
    """

    def __init__(self, mllm: MLLM) -> None:
        self.mllm = mllm
        self._adapters: dict[str, _Adapter] = {}
        # (stacks {module path: (A, Bt)}, slots {key: slot}, rank), replaced whole on a (re)build, so a pass
        # in flight keeps the stacks it started with while another thread loads or drops an adapter.
        self._built: tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, int], int] | None = None
        self._lock = threading.RLock()
        self._local = threading.local()  # per thread: the stack of active row plans (rows() blocks nest)
        self._active = 0                  # rows() blocks open in all threads; hooks are attached while > 0
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._parked: dict[str, _Adapter] = {}  # out of the stacks, tensors in host memory (see park)

    # ------------------------------------------------------------------ adapters
    def __contains__(self, key: str) -> bool:
        return key in self._adapters

    def keys(self) -> list[str]:
        return list(self._adapters)

    def load(self, key: str, folder: str | Path) -> None:
        """Read the adapter in ``folder`` (peft layout) into a new slot named ``key``."""
        if key in self._adapters:
            raise ValueError(f"adapter {key!r} already loaded")
        a = self._read(key, folder, self.mllm.device)
        with self._lock:
            self._adapters[key] = a
            self._built = None

    def fetch(self, key: str, folder: str | Path) -> _Adapter:
        """The adapter in ``folder`` read into host memory (pinned when the base is on a GPU), not yet in the
        set: :meth:`add_parked` puts it where :meth:`unpark` brings it onto the device from. Touches nothing
        shared, so it may run in a thread of its own while passes run."""
        a = self._read(key, folder, torch.device("cpu"))
        return _moved(a, torch.device("cpu"), pin=self.mllm.device.type == "cuda")

    def add_parked(self, a: _Adapter) -> None:
        """A host copy from :meth:`fetch`, as if parked."""
        self._parked[a.key] = a

    def _read(self, key: str, folder: str | Path, device: torch.device) -> _Adapter:
        lora, projector, rank = read_lora(folder, self.mllm.dtype, device)
        module = None
        if projector:
            # Its own module (not functional_call on the base one, which swaps the base module's
            # parameters during the call and so races with a pass in another thread).
            base = self._base_projector()
            # copied straight onto ``device`` (a host copy made in a loader thread touches no device memory)
            memo = {id(t): (torch.nn.Parameter(t.detach().to(device, copy=True), t.requires_grad)
                            if isinstance(t, torch.nn.Parameter) else t.detach().to(device, copy=True))
                    for t in [*base.parameters(), *base.buffers()]}
            module = copy.deepcopy(base, memo)
            missing, unexpected = module.load_state_dict(projector, strict=False, assign=True)
            if unexpected:
                raise ValueError(f"{folder}: projector tensors {unexpected} do not fit the base's projector")
        return _Adapter(key, lora, projector, rank, module)

    def drop(self, key: str) -> None:
        with self._lock:
            if self._adapters.pop(key, None) is None:
                raise KeyError(f"no adapter {key!r}; loaded: {self.keys()}")
            self._built = None

    def park(self, key: str) -> None:
        """Take adapter ``key`` out of the stacks but keep its tensors in host memory (pinned when the base is
        on a GPU), so :meth:`unpark` brings it back without reading and verifying its files again."""
        with self._lock:
            a = self._adapters.pop(key, None)
            if a is None:
                raise KeyError(f"no adapter {key!r}; loaded: {self.keys()}")
            self._built = None
        self._parked[key] = _moved(a, torch.device("cpu"), pin=self.mllm.device.type == "cuda")

    def unpark(self, key: str) -> bool:
        """Back into the stacks from host memory; False when ``key`` is not parked."""
        a = self._parked.pop(key, None)
        if a is None:
            return False
        a = _moved(a, self.mllm.device)
        with self._lock:
            self._adapters[key] = a
            self._built = None
        return True

    def forget(self, key: str) -> None:
        """Drop the host copy of ``key`` (if parked)."""
        self._parked.pop(key, None)

    @property
    def parked(self) -> list[str]:
        return list(self._parked)

    def is_vision(self, key: str | None) -> bool:
        return key is not None and self._adapters[key].vision

    def _build(self) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, int], int]:
        """The stacked weights of every module (slot 0 = zeros, the base; slots 1.. = adapters in load
        order), built when an adapter was loaded or dropped since the last call."""
        with self._lock:
            if self._built is not None:
                return self._built
            slots = {k: i + 1 for i, k in enumerate(self._adapters)}
            S = len(self._adapters) + 1
            r = max([a.rank for a in self._adapters.values()], default=1)
            mods: dict[str, tuple[int, int]] = {}
            for a in self._adapters.values():
                for m, (A, B) in a.lora.items():
                    mods[m] = (A.shape[1], B.shape[0])
            dev, dt = self.mllm.device, self.mllm.dtype
            stacks = {}
            for m, (d_in, d_out) in mods.items():
                A = torch.zeros(S, r, d_in, device=dev, dtype=dt)
                Bt = torch.zeros(S, r, d_out, device=dev, dtype=dt)
                for key, s in slots.items():
                    ab = self._adapters[key].lora.get(m)
                    if ab is not None:
                        A[s, : ab[0].shape[0]] = ab[0]
                        Bt[s, : ab[1].shape[1]] = ab[1].T
                stacks[m] = (A.view(S * r, d_in), Bt.view(S * r, d_out))
            self._built = (stacks, slots, r)
            return self._built

    def _slot_of(self, key: str | None, slots: dict[str, int]) -> int:
        if key is None:
            return 0
        if key not in slots:
            raise KeyError(f"adapter {key!r} is not loaded; loaded: {list(slots)}")
        return slots[key]

    # ------------------------------------------------------------------ per-row LoRA
    def _base_linear(self, path: str) -> torch.nn.Module:
        mod = self.mllm.model.get_submodule(path)
        return getattr(mod, "base_layer", mod)  # inside a peft LoraLayer: its wrapped Linear

    @contextlib.contextmanager
    def rows(self, keys: Sequence[str | None], vision: bool = False) -> Iterator[None]:
        """Forward passes inside this block apply adapter ``keys[b]`` to batch row ``b`` (None = base).

        Decoder Linears only, unless ``vision`` (then the vision-tower Linears, rows = images).
        Run the model with peft's own adapters disabled (:meth:`MLLM.adapters_disabled`).

        Thread-safe: the plan is this thread's own (the hooks read it from thread-local state), so two
        threads may run passes with different rows at once, e.g. a router batch on one CUDA stream while
        an expert batch decodes on another (:class:`cl_service.engine.pipeline.Pipeline`).
        """
        stacks, slots, r = self._build()
        idx_list = [self._slot_of(k, slots) for k in keys]
        S = len(slots) + 1
        dev = self.mllm.device
        plan = RowPlan(stacks=stacks, rank=r, vision=vision,
                     idx=torch.tensor(idx_list, device=dev, dtype=torch.long),
                     uniform=idx_list[0] if len(set(idx_list)) == 1 else None)
        if plan.uniform is None:
            oh = torch.zeros(len(idx_list), S, device=dev, dtype=self.mllm.dtype)
            oh[torch.arange(len(idx_list), device=dev), plan.idx] = 1
            plan.onehot = oh.repeat_interleave(r, dim=1).unsqueeze(1)  # [B, 1, S*r]
        stack = self._plans()
        stack.append(plan)
        self._attach(stacks)
        try:
            yield
        finally:
            stack.pop()
            self._detach()

    @contextlib.contextmanager
    def mixture(self, keys: Sequence[str], weights: torch.Tensor, mixed_from: int = 0) -> Iterator[None]:
        """Forward passes inside this block add to row ``b`` of every adapted decoder Linear the mixture
        ``sum_t weights[b, t] * B_t A_t x`` of adapters ``keys`` (``weights [B, T]``), in decoder layers
        ``mixed_from`` and up (negative: counted from the last layer, ``-1`` = the last one). Below it every row gets
        the product of sums ``(sum_t B_t)(sum_t A_t) x`` (weight 1 each): HiDe-LLaVA's fused lower layers. Each
        adapter's ``alpha / r`` is folded into its B, so the fused B sums the scaled ones. Row images go through
        :meth:`image_features` as for :meth:`rows`; run the model with peft's adapters disabled."""
        stacks, slots, r = self._build()
        if not keys or len(set(keys)) != len(keys):
            raise ValueError(f"a mixture needs distinct adapters, got {list(keys)}")
        if any(self.is_vision(k) for k in keys if k in slots):
            raise ValueError("mixtures run over decoder Linears: an adapter with vision-tower LoRA cannot be mixed")
        idx = [self._slot_of(k, slots) for k in keys]
        if weights.dim() != 2 or weights.shape[1] != len(keys):
            raise ValueError(f"weights {tuple(weights.shape)} do not give each row a weight per adapter ({len(keys)})")
        S, dev, dt = len(slots) + 1, self.mllm.device, self.mllm.dtype
        w = torch.zeros(weights.shape[0], S, device=dev, dtype=dt)
        w[:, idx] = weights.to(dev, dt)
        n = int(self.mllm.model.config.text_config.num_hidden_layers)
        start = mixed_from if mixed_from >= 0 else n + mixed_from
        if not 0 <= start < n:
            raise ValueError(f"mixed_from={mixed_from}: the base has decoder layers 0..{n - 1}")
        unplaced = [p for p in stacks if decoder_layer(p) is None and ".vision_tower." not in p]
        if start > 0 and unplaced:  # a layer split we cannot place would silently mix the wrong layers
            raise ValueError(f"adapted modules {unplaced[:3]} have no decoder layer index: cannot fuse the layers "
                             f"below {start}")
        sel = torch.tensor(idx, device=dev)
        fused = {p: (A.view(S, r, -1)[sel].sum(0), Bt.view(S, r, -1)[sel].sum(0)) for p, (A, Bt) in stacks.items()
                 if (layer := decoder_layer(p)) is not None and layer < start}
        plan = RowPlan(stacks=stacks, rank=r, vision=False, uniform=None,
                     idx=torch.zeros(weights.shape[0], device=dev, dtype=torch.long),
                     weights=w.repeat_interleave(r, dim=1).unsqueeze(1), fused=fused)
        with self.plan_block(plan):
            yield

    def active_plan(self) -> "RowPlan | None":
        """This thread's innermost :meth:`rows` plan (None outside any)."""
        plans = getattr(self._local, "plans", None)
        return plans[-1] if plans else None

    @contextlib.contextmanager
    def plan_block(self, plan: "RowPlan") -> Iterator[None]:
        """Passes inside this block use ``plan`` as given: with ``uniform=None`` and ``idx``/``onehot`` in
        static buffers, the per-row update reads only those buffers, so a CUDA graph captured inside the
        block replays for any rows written into them (:mod:`cl_service.engine.cudagraphs`)."""
        stack = self._plans()
        stack.append(plan)
        self._attach(plan.stacks)
        try:
            yield
        finally:
            stack.pop()
            self._detach()

    def _plans(self) -> list["RowPlan"]:
        stack = getattr(self._local, "plans", None)
        if stack is None:
            stack = self._local.plans = []
        return stack

    def _attach(self, stacks: dict) -> None:
        """One hook per adapted base Linear while any thread is inside :meth:`rows`."""
        with self._lock:
            self._active += 1
            for path in stacks:
                if path not in self._handles:
                    self._handles[path] = self._base_linear(path).register_forward_hook(self._hook(path))

    def _detach(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                for h in self._handles.values():
                    h.remove()
                self._handles.clear()

    def _hook(self, path: str):
        is_vision = ".vision_tower." in path

        def hook(module, args, out):
            plans = getattr(self._local, "plans", None)
            if not plans:
                return out  # another thread's rows() block: this thread's pass is a plain one
            plan = plans[-1]
            ab = plan.stacks.get(path)
            if ab is None or plan.vision != is_vision or plan.uniform == 0:
                return out
            if plan.fused is not None and path in plan.fused:
                return out + F.linear(args[0], plan.fused[path][0]) @ plan.fused[path][1]
            return out + self.delta(args[0], *ab, plan=plan)
        return hook

    def delta(self, x: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, plan: "RowPlan | None" = None) -> torch.Tensor:
        """The LoRA update of every row: ``x [B, L, in]`` (or ``[B, in]``) -> ``[B, L, out]``.

        ``plan``: the row plan (default: this thread's innermost :meth:`rows` block)."""
        plan = plan or self._plans()[-1]
        r = plan.rank
        if plan.weights is not None:  # a mixture: every row its own weights over all slots
            return (F.linear(x, A) * (plan.weights if x.dim() == 3 else plan.weights.squeeze(1))) @ Bt
        if plan.uniform is not None:
            s = plan.uniform
            return F.linear(x, A[s * r:(s + 1) * r]) @ Bt[s * r:(s + 1) * r]
        x3 = x if x.dim() == 3 else x.unsqueeze(1)
        B, L, _ = x3.shape
        S = A.shape[0] // r
        if L == 1 and B >= S:
            d = (F.linear(x3, A) * plan.onehot) @ Bt
        else:
            Ag = A.view(S, r, -1)[plan.idx]         # [B, r, in]
            Bg = Bt.view(S, r, -1)[plan.idx]        # [B, r, out]
            d = torch.bmm(torch.bmm(x3, Ag.transpose(1, 2)), Bg)
        return d if x.dim() == 3 else d.squeeze(1)

    # ------------------------------------------------------------------ per-row projector
    def _base_projector(self) -> torch.nn.Module:
        p = self.mllm.model.get_submodule(_PROJECTOR)
        return getattr(p, "original_module", p)  # inside a peft ModulesToSaveWrapper: the base copy

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor | None, image_keys: Sequence[str | None],
                       vision_states: torch.Tensor | None = None) -> torch.Tensor:
        """Projected features ``[N_img, k, H]``: image ``i`` through adapter ``image_keys[i]``'s projector.

        ``vision_states`` (base CLIP states of the same images) are reused for every adapter that leaves
        the vision tower alone; adapters with vision LoRA run the tower on their own images.
        """
        mllm = self.mllm
        if vision_states is None and any(not self.is_vision(k) for k in image_keys):
            if pixel_values is None:
                raise ValueError("need pixel_values or vision_states")
            with mllm.adapters_disabled():
                vision_states = mllm.vision_states(pixel_values)
        proj = self._base_projector()
        out: torch.Tensor | None = None
        for key in dict.fromkeys(image_keys):
            sel = [i for i, k in enumerate(image_keys) if k == key]
            idx = torch.tensor(sel, device=mllm.device)
            if self.is_vision(key):
                if pixel_values is None:
                    raise ValueError(f"adapter {key!r} adapts the vision tower: pixel_values are needed")
                with mllm.adapters_disabled(), self.rows([key] * len(sel), vision=True):
                    vs = mllm.vision_states(pixel_values.to(mllm.device)[idx])
            else:
                vs = vision_states.to(mllm.device)[idx]
            own = self._adapters[key].projector_module if key is not None else None
            f = (own if own is not None else proj)(vs)
            if out is None:
                out = f.new_empty((len(image_keys), *f.shape[1:]))
            out[idx] = f
        assert out is not None
        return out
