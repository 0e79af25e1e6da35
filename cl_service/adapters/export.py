"""A run's adapters in the formats other tools load (``clsvc adapters export``).

``peft``: a plain peft folder (``adapter_config.json`` + ``adapter_model.safetensors``) for
``PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base), folder)``. The LoRA
weights are ours as they are; an expert's own projector copy (``LoraCfg.train_projector``, the default) is
the adapter's peft ``modules_to_save`` entry (``multi_modal_projector``), the way peft saves and loads it,
so the loaded model computes exactly what the engine computes (same weights, same peft code). Servers that
take LoRA weights only (vLLM's LoRA loader refuses ``modules_to_save``) cannot load such an expert: export it
``merged``, or train experts with ``expert.lora.train_projector=false``. The projector is not folded into
LoRA factors: that is exact only at the projector's full rank and would still need a bias term.

``merged``: the base with the adapter merged in (each adapted Linear ``W + (alpha/r)·B·A``, the expert's
projector in place of the base's), saved as a llava-hf checkpoint that ``from_pretrained`` loads with no
peft. Merged in float32 (a 7B base needs ~28 GB of host memory for it) and saved in the dtype the run used for
the base (else the checkpoint's own); its answers equal the engine's up to float rounding (``x·(W + ΔW)``
against ``x·W + x·ΔW``; in a 16-bit dtype also the rounding of ``W + ΔW`` to it).

Adapters of a family answered through its own hooks (:mod:`cl_service.adapters.family`: MoE-LoRA, CL-MoE) are
neither: a MoE-LoRA's update depends on every token through a softmax gate, which no plain LoRA expresses and no
fixed weight holds. Their folder describes them (``moelora_config.json``: method, experts, rank, alpha, targets)
and only cl-service loads them; the export is refused with the family's description.

Each export carries ``clsvc_export.json``: the source adapter (id, kind, task, checksums), the base, the prompt
style its answers were produced with, and what is exact. Exports are written to a staging folder and renamed
into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from cl_service._atomic import atomic_write_text, replace_dir
from cl_service.adapters.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROJECTOR, load_adapter
from cl_service.adapters.family import answers_with_hooks, family_of
from cl_service.adapters.registry import (ADAPTER_META, AdapterError, AdapterInfo, AdapterRegistry, publish_dir,
                                          read_adapter)
from cl_service.resolved import read_resolved

FORMATS = ("peft", "merged")
EXPORT_META = "clsvc_export.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".msgpack", ".h5")


def export_adapter(adapter: str | Path, base: str | Path, fmt: str, out: str | Path, *, dtype: str | None = None,
                   prompt_style: str = "auto", info: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Export the adapter folder ``adapter`` (checksums verified) trained on the base checkpoint ``base`` as
    ``fmt`` (``peft`` | ``merged``) into the new folder ``out``. ``dtype``: the dtype the run loaded the base in
    (merged weights are saved in it; None = the checkpoint's own). ``info``: extra fields for ``clsvc_export.json``.
    Raises ``ValueError`` for an unknown format or an adapter that is no peft LoRA, :class:`AdapterError` for a
    broken adapter."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    adapter, base, out = Path(adapter), Path(base), Path(out)
    meta = read_adapter(adapter)
    fam = family_of(adapter)
    if answers_with_hooks(fam):
        raise ValueError(f"adapter {meta.get('id', adapter)} is {fam.describe(adapter)}; no --format {fmt} export "
                         f"exists for it")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    record = {"format": fmt, "adapter": {k: meta.get(k) for k in ("id", "kind", "task", "version", "files")},
              "base": str(base.resolve()), "prompt_style": prompt_style, **(info or {})}
    stage = publish_dir(out)
    try:
        if fmt == "peft":
            record.update(_peft(adapter, base, stage))
        else:
            record.update(_merged(adapter, base, stage, dtype))
        atomic_write_text(stage / EXPORT_META, json.dumps(record, indent=2))
        replace_dir(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def _peft(adapter: Path, base: Path, stage: Path) -> dict[str, Any]:
    cfg = json.loads((adapter / ADAPTER_CONFIG).read_text())
    cfg.update(base_model_name_or_path=str(base.resolve()), inference_mode=True)
    shutil.copyfile(adapter / ADAPTER_WEIGHTS, stage / ADAPTER_WEIGHTS)
    atomic_write_text(stage / ADAPTER_CONFIG, json.dumps(cfg, indent=2, sort_keys=True))
    projector = PROJECTOR in (cfg.get("modules_to_save") or [])
    return {"projector": "peft modules_to_save (a full copy)" if projector else "the base's (not trained)",
            "exact": "PeftModel.from_pretrained on the base computes what the engine computes (the same weights)",
            "load": "PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base), this folder)",
            "lora_only": not projector}


def _merged(adapter: Path, base: Path, stage: Path, dtype: str | None) -> dict[str, Any]:
    import torch

    from cl_service.models.mllm import load_mllm

    mllm = load_mllm(base, dtype="float32")
    load_adapter(mllm, adapter, "export")
    model = mllm.peft.merge_and_unload()  # keeps the active adapter's projector copy in place of the base's
    mllm.peft = None
    if hasattr(model, "peft_config"):
        del model.peft_config
    saved = dtype or _checkpoint_dtype(base)
    model.to(getattr(torch, saved))
    model.save_pretrained(stage)
    for f in sorted(base.iterdir()):  # tokenizer, processor, clsvc_model.json, prompt hint: as the base has them
        if f.is_file() and not f.name.startswith(".") and not f.name.endswith(_WEIGHT_SUFFIXES) \
                and f.name not in ("base.json", ADAPTER_META) and not (stage / f.name).exists():
            shutil.copyfile(f, stage / f.name)
    return {"dtype": saved, "exact": "answers equal the engine's up to float rounding (W + scale*B*A merged in float32)",
            "load": "LlavaForConditionalGeneration.from_pretrained(this folder)"}


def _checkpoint_dtype(base: Path) -> str:
    """The dtype a checkpoint's ``config.json`` names (``dtype``, or older ``torch_dtype``); float32 when none."""
    cfg = json.loads((base / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype") or "float32"
    return str(name).replace("torch.", "")


def find_adapter(run_dir: str | Path, name: str) -> AdapterInfo:
    """An adapter of a run by id (``expert:RS``, ``router:stage-3``, ``moelora:stage-2``) or by a task name
    (its expert); :class:`AdapterError` listing the known ids otherwise."""
    found = AdapterRegistry(Path(run_dir) / "adapters").scan()
    info = found.get(name) or found.get(f"expert:{name}")
    if info is None:
        raise AdapterError(f"no adapter {name!r} in {run_dir}; known: {', '.join(sorted(found)) or '(none)'}")
    return info


def export_run(run_dir: str | Path, fmt: str, out: str | Path, expert: str | None = None,
               overwrite: bool = False) -> list[Path]:
    """Export adapters of the finished (or partly finished) run ``run_dir``: ``expert`` (a task name or an
    adapter id) into ``out``; without it, every expert of the run's stream into ``out/<task>``. The base and its
    dtype and prompt style are the run's (``config.resolved.json``). Returns the folders written."""
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.resolved.json"
    if not cfg_file.is_file():
        raise AdapterError(f"{run_dir} is not a run results folder (no config.resolved.json)")
    resolved = read_resolved(run_dir)  # base and dataset as paths this process opens
    if expert is not None:
        todo = [(find_adapter(run_dir, expert), Path(out))]
    else:
        found = AdapterRegistry(run_dir / "adapters").scan()
        todo = [(found[f"expert:{t}"], Path(out) / t) for t in resolved.get("tasks", []) if f"expert:{t}" in found]
        if not todo:
            raise AdapterError(f"run {run_dir} holds no expert adapter; name one with --expert "
                               f"(known: {', '.join(sorted(found)) or '(none)'})")
    style = (resolved.get("config", {}).get("base", {}) or {}).get("prompt_style", "auto")
    return [export_adapter(info.path, resolved["base"], fmt, dest, dtype=resolved.get("base_dtype"),
                           prompt_style=style, overwrite=overwrite,
                           info={"run": str(run_dir.resolve()), "dataset": resolved.get("dataset")})
            for info, dest in todo]
