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

Each expert's own projector (peft ``modules_to_save``) is applied per group of images of the same slot
(a loop over the distinct slots, once per forward, not per layer). CLIP states are shared across slots
unless an adapter also adapts the vision tower; then that slot's images go through the tower with its
LoRA (uniform fast path). Nothing here knows of peft's module wrappers beyond finding the base Linear.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.func import functional_call

from cl_service.models.mllm import MLLM

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_PROJECTOR = "model.multi_modal_projector"


@dataclass
class _Adapter:
    key: str
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A [r, in], B*scale [out, r])
    projector: dict[str, torch.Tensor] | None            # projector params (names relative to it) or None
    rank: int

    @property
    def vision(self) -> bool:
        return any(".vision_tower." in m for m in self.lora)


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
        self._slots: dict[str, int] = {}
        self._stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._rank = 0
        self._idx: torch.Tensor | None = None     # [B] slot per row
        self._uniform: int | None = None          # the one slot of all rows, if so
        self._onehot: torch.Tensor | None = None  # [B, 1, S*r] for the decode path

    # ------------------------------------------------------------------ adapters
    def __contains__(self, key: str) -> bool:
        return key in self._adapters

    def keys(self) -> list[str]:
        return list(self._adapters)

    def load(self, key: str, folder: str | Path) -> None:
        """Read the adapter in ``folder`` (peft layout) into a new slot named ``key``."""
        if key in self._adapters:
            raise ValueError(f"adapter {key!r} already loaded")
        lora, projector, rank = read_lora(folder, self.mllm.dtype, self.mllm.device)
        self._adapters[key] = _Adapter(key, lora, projector, rank)
        self._stacks = None

    def drop(self, key: str) -> None:
        if self._adapters.pop(key, None) is None:
            raise KeyError(f"no adapter {key!r}; loaded: {self.keys()}")
        self._stacks = None

    def is_vision(self, key: str | None) -> bool:
        return key is not None and self._adapters[key].vision

    def _build(self) -> None:
        """(Re)stack every module's weights: slot 0 = zeros (base), slots 1.. = adapters in load order."""
        self._slots = {k: i + 1 for i, k in enumerate(self._adapters)}
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
            for key, s in self._slots.items():
                ab = self._adapters[key].lora.get(m)
                if ab is not None:
                    A[s, : ab[0].shape[0]] = ab[0]
                    Bt[s, : ab[1].shape[1]] = ab[1].T
            stacks[m] = (A.view(S * r, d_in), Bt.view(S * r, d_out))
        self._stacks, self._rank = stacks, r

    def _slot_of(self, key: str | None) -> int:
        if key is None:
            return 0
        if key not in self._adapters:
            raise KeyError(f"adapter {key!r} is not loaded; loaded: {self.keys()}")
        return self._slots[key]

    # ------------------------------------------------------------------ per-row LoRA
    def _base_linear(self, path: str) -> torch.nn.Module:
        mod = self.mllm.model.get_submodule(path)
        return getattr(mod, "base_layer", mod)  # inside a peft LoraLayer: its wrapped Linear

    @contextlib.contextmanager
    def rows(self, keys: Sequence[str | None], vision: bool = False) -> Iterator[None]:
        """Forward passes inside this block apply adapter ``keys[b]`` to batch row ``b`` (None = base).

        Decoder Linears only, unless ``vision`` (then the vision-tower Linears, rows = images).
        Run the model with peft's own adapters disabled (:meth:`MLLM.adapters_disabled`).
        """
        if self._stacks is None:
            self._build()
        assert self._stacks is not None
        slots = [self._slot_of(k) for k in keys]
        S, r = len(self._adapters) + 1, self._rank
        dev = self.mllm.device
        saved = (self._idx, self._uniform, self._onehot)  # blocks nest (a vision pass inside a text pass)
        self._idx = torch.tensor(slots, device=dev, dtype=torch.long)
        self._uniform = slots[0] if len(set(slots)) == 1 else None
        self._onehot = None
        if self._uniform is None:
            oh = torch.zeros(len(slots), S, device=dev, dtype=self.mllm.dtype)
            oh[torch.arange(len(slots), device=dev), self._idx] = 1
            self._onehot = oh.repeat_interleave(r, dim=1).unsqueeze(1)  # [B, 1, S*r]
        handles = []
        try:
            if self._uniform != 0:
                for path, (A, Bt) in self._stacks.items():
                    if (".vision_tower." in path) != vision:
                        continue
                    handles.append(self._base_linear(path).register_forward_hook(self._hook(A, Bt)))
            yield
        finally:
            for h in handles:
                h.remove()
            self._idx, self._uniform, self._onehot = saved

    def _hook(self, A: torch.Tensor, Bt: torch.Tensor):
        def hook(module, args, out):
            return out + self.delta(args[0], A, Bt)
        return hook

    def delta(self, x: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor) -> torch.Tensor:
        """The LoRA update of every row: ``x [B, L, in]`` (or ``[B, in]``) -> ``[B, L, out]``."""
        r = self._rank
        if self._uniform is not None:
            s = self._uniform
            return F.linear(x, A[s * r:(s + 1) * r]) @ Bt[s * r:(s + 1) * r]
        x3 = x if x.dim() == 3 else x.unsqueeze(1)
        B, L, _ = x3.shape
        S = A.shape[0] // r
        if L == 1 and B >= S:
            d = (F.linear(x3, A) * self._onehot) @ Bt
        else:
            Ag = A.view(S, r, -1)[self._idx]         # [B, r, in]
            Bg = Bt.view(S, r, -1)[self._idx]        # [B, r, out]
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
            params = self._adapters[key].projector if key is not None else None
            f = functional_call(proj, params, (vs,), strict=False) if params else proj(vs)
            if out is None:
                out = f.new_empty((len(image_keys), *f.shape[1:]))
            out[idx] = f
        assert out is not None
        return out
