"""Task LoRA experts on a frozen MLLM: attach, select, save and load (peft, safetensors).

An expert = LoRA on the language model's Linears (q,k,v,o,gate,up,down; never ``lm_head``), optionally
on the CLIP tower's Linears too (``vision=True``, as the paper's ability experts), plus — with
``train_projector`` — the expert's own copy of the multimodal projector (peft ``modules_to_save``), which
is saved inside the expert, as in the reference code. Several experts can live in one model under
different adapter names; :func:`set_active` picks the one a forward pass uses.

Saved layout (flat, whatever the adapter name): ``adapter_config.json`` + ``adapter_model.safetensors``
(peft's format; the projector copy is in the same file).

:class:`LoRAFamily` is the adapter family (:mod:`cl_service.adapters.family`) of the jobs that train one: kinds
``expert``, ``router``, ``joint`` and ``sequential``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import save_file

from cl_service._cfgload import check_ranges
from cl_service.adapters.family import FAMILIES, TRAIN_ADAPTER, Attached
from cl_service.models.mllm import MLLM

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PROJECTOR = "multi_modal_projector"

# Short target names -> Linear names in the Llama decoder and in the CLIP tower.
TEXT_TARGETS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_VISION = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
           "up": "mlp.fc1", "down": "mlp.fc2"}


@dataclass(frozen=True)
class LoraCfg:
    """One LoRA adapter's shape and what it covers."""

    rank: int = 16
    """LoRA rank r (the paper: 128 on a 7B model)."""
    alpha: float = 32.0
    """LoRA alpha; the update is scaled by ``alpha / rank`` (the paper: alpha = 2·rank)."""
    dropout: float = 0.05
    """Dropout on the LoRA branch input."""
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    """Decoder Linears to adapt, by short name: q, k, v, o, gate, up, down."""
    vision: bool = False
    """Also adapt the CLIP tower's Linears (q, k, v, o→out_proj, up→fc1, down→fc2 among ``targets``)."""
    train_projector: bool = True
    """Train (and save with the adapter) the adapter's own copy of the multimodal projector."""

    def __post_init__(self) -> None:
        check_ranges(self, rank=(1, None), alpha=(0, None, "open"), dropout=(0, 1))
        if self.dropout >= 1:
            raise ValueError(f"dropout={self.dropout!r} is out of range (expected >= 0 and < 1)")


def target_regex(cfg: LoraCfg, vision_layers: Sequence[int] | None = None) -> str:
    """The peft ``target_modules`` regex (full match on module names): decoder layers only, plus the CLIP
    encoder layers when ``cfg.vision`` (the CLIP tower also has q/k/v_proj, hence a regex, not names).
    ``vision_layers`` limits the CLIP layers (those below the feature layer; the rest never reach the
    decoder); None = all."""
    unknown = sorted(set(cfg.targets) - set(TEXT_TARGETS))
    if unknown or not cfg.targets:
        raise ValueError(f"unknown LoRA targets {unknown or '(none given)'}; known: {sorted(TEXT_TARGETS)}")
    text = "|".join(TEXT_TARGETS[t].replace(".", r"\.") for t in cfg.targets)
    parts = [rf".*language_model\.(?:.*\.)?layers\.\d+\.(?:{text})"]
    vis = [_VISION[t].replace(".", r"\.") for t in cfg.targets if t in _VISION]
    if cfg.vision and vis:
        idx = r"\d+" if vision_layers is None else "(?:" + "|".join(str(i) for i in vision_layers) + ")"
        parts.append(rf".*vision_tower\.(?:.*\.)?layers\.{idx}\.(?:{'|'.join(vis)})")
    return "|".join(parts)


def used_vision_layers(mllm: MLLM) -> list[int]:
    """CLIP encoder layers whose output reaches the projector (all up to ``vision_feature_layer``)."""
    c = mllm.model.config
    n = int(c.vision_config.num_hidden_layers)
    fl = c.vision_feature_layer
    # hidden_states[i] (i taken mod n+1) is the output of the first i layers; [0] = the patch embeddings
    top = max(i % (n + 1) for i in (fl if isinstance(fl, (list, tuple)) else [fl]))
    return list(range(top))


def peft_config(cfg: LoraCfg, vision_layers: Sequence[int] | None = None) -> LoraConfig:
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=target_regex(cfg, vision_layers),
                      modules_to_save=[PROJECTOR] if cfg.train_projector else None, bias="none")


def attach_lora(mllm: MLLM, cfg: LoraCfg, adapter_name: str = "default", seed: int = 0) -> list[torch.nn.Parameter]:
    """Add a fresh LoRA adapter ``adapter_name``, make it the active one and the only trainable part.

    The LoRA A matrices are initialised from ``seed`` (the global RNG is left untouched).
    Returns the trainable parameters (LoRA A/B of this adapter + its projector copy); everything else,
    other adapters included, is frozen. LoRA B starts at zero, so the new adapter starts as the base.
    """
    check_adapter_name(adapter_name)
    pc = peft_config(cfg, used_vision_layers(mllm))
    if mllm.peft is not None and adapter_name in mllm.peft.peft_config:
        raise ValueError(f"adapter {adapter_name!r} already exists; known: {sorted(mllm.peft.peft_config)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if mllm.peft is None:
            mllm.peft = get_peft_model(mllm.model, pc, adapter_name=adapter_name)
        else:
            mllm.peft.add_adapter(adapter_name, pc)
    return set_active(mllm, adapter_name, trainable=True)


def set_active(mllm: MLLM, adapter_name: str, trainable: bool = False) -> list[torch.nn.Parameter]:
    """Route forward passes through ``adapter_name``; with ``trainable`` only its parameters get gradients.
    Returns the parameters made trainable (empty unless ``trainable``)."""
    if mllm.peft is None or adapter_name not in mllm.peft.peft_config:
        known = sorted(mllm.peft.peft_config) if mllm.peft is not None else []
        raise KeyError(f"no adapter {adapter_name!r} attached; known: {known}")
    mllm.peft.set_adapter(adapter_name)
    params = []
    for name, p in mllm.model.named_parameters():
        mine = trainable and _owned_by(name, adapter_name)
        p.requires_grad_(mine)
        if mine:
            params.append(p)
    return params


def check_adapter_name(name: str) -> str:
    """Adapter names become keys of torch ModuleDicts and peft matches them inside parameter names:
    no dots, and not a piece of ``lora_`` (peft would mistake it for its own prefix)."""
    if not name or "." in name or name in "lora_" or not name.isprintable():
        raise ValueError(f"invalid adapter name {name!r}: use a non-empty name without dots, e.g. 'expert-RS'")
    return name


def _owned_by(param_name: str, adapter_name: str) -> bool:
    return (f".lora_A.{adapter_name}." in param_name or f".lora_B.{adapter_name}." in param_name
            or f".modules_to_save.{adapter_name}." in param_name)


def adapter_names(mllm: MLLM) -> list[str]:
    return sorted(mllm.peft.peft_config) if mllm.peft is not None else []


def save_adapter(mllm: MLLM, path: str | Path, adapter_name: str = "default") -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` of one adapter into ``path``
    (flat, whatever its name). Staging/atomic publication is the caller's (adapter registry's) job."""
    if mllm.peft is None or adapter_name not in mllm.peft.peft_config:
        raise KeyError(f"no adapter {adapter_name!r} to save; known: {adapter_names(mllm)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(mllm.peft, adapter_name=adapter_name)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    mllm.peft.peft_config[adapter_name].save_pretrained(str(path))
    return path


def load_adapter(mllm: MLLM, path: str | Path, adapter_name: str = "default", trainable: bool = False
                 ) -> list[torch.nn.Parameter]:
    """Load a saved adapter under ``adapter_name`` and make it active (frozen unless ``trainable``, e.g.
    to continue it on the next task). Returns the trainable parameters (empty unless ``trainable``)."""
    path = Path(path)
    if not (path / ADAPTER_WEIGHTS).is_file() or not (path / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{path} holds no adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    check_adapter_name(adapter_name)
    if mllm.peft is None:
        mllm.peft = PeftModel.from_pretrained(mllm.model, str(path), adapter_name=adapter_name,
                                              is_trainable=trainable, local_files_only=True)
    else:
        if adapter_name in mllm.peft.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete it first")
        mllm.peft.load_adapter(str(path), adapter_name=adapter_name, is_trainable=trainable, local_files_only=True)
    return set_active(mllm, adapter_name, trainable=trainable)


def delete_adapter(mllm: MLLM, adapter_name: str) -> None:
    """Remove an adapter (and its projector copy). Removing the last one restores the plain base model
    (peft cannot hold zero adapters)."""
    if mllm.peft is None or adapter_name not in mllm.peft.peft_config:
        raise KeyError(f"no adapter {adapter_name!r}; known: {adapter_names(mllm)}")
    if len(mllm.peft.peft_config) == 1:
        remove_lora(mllm)
    else:
        mllm.peft.delete_adapter(adapter_name)


def remove_lora(mllm: MLLM) -> None:
    """Strip every adapter: LoRA layers back to their base Linears, projector copies back to the base
    projector (unlike peft's ``unload()``, which would keep the active adapter's projector copy)."""
    if mllm.peft is None:
        return
    model = mllm.model
    targets = [(n, m) for n, m in model.named_modules() if n and isinstance(m, (ModulesToSaveWrapper, BaseTunerLayer))]
    done: list[str] = []
    for name, module in targets:
        if any(name.startswith(d + ".") for d in done):
            continue  # inside a wrapper already replaced
        done.append(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, ModulesToSaveWrapper):
            setattr(parent, child, module.original_module)
        elif isinstance(module, BaseTunerLayer):
            setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    for p in model.parameters():
        p.requires_grad_(False)
    mllm.peft = None


def set_input_casting(mllm: MLLM, enabled: bool) -> None:
    """peft casts a LoRA layer's input to the adapter weights' dtype (float32 adapters on a bf16 base: an
    fp32 copy of every activation). Under ``torch.autocast`` that copy is wasted: autocast casts back
    to bf16 for the matmul. Turn it off when training with ``TrainCfg.autocast`` (adapters added later
    get peft's default, on)."""
    for module in mllm.model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = enabled


class LoRAFamily:
    """A peft LoRA (+ the adapter's projector copy): fresh from the job's seed, or continuing ``job.init_adapter``
    (a sequential stage, a continued router). Jobs of kind ``expert``, ``router``, ``joint`` and ``sequential``.
    Answered through the engine's peft paths; stripped off afterwards, so the plain base serves the next job."""

    name = "lora"
    reuses_base = True

    def attach(self, job, mllm: MLLM, prepared) -> Attached:
        if job.init_adapter:
            return Attached(load_adapter(mllm, job.init_adapter, TRAIN_ADAPTER, trainable=True))
        return Attached(attach_lora(mllm, job.lora, TRAIN_ADAPTER, seed=job.seed))

    def save(self, job, mllm: MLLM, folder: Path, attached: Attached) -> None:
        save_adapter(mllm, folder, TRAIN_ADAPTER)

    def release(self, mllm: MLLM) -> None:
        remove_lora(mllm)


LORA = LoRAFamily()
for _kind in ("expert", "router", "joint", "sequential"):
    FAMILIES.register(_kind, LORA)
