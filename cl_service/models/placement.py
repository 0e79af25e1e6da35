"""Where a run's models live and in what precision: the one place the ``auto`` settings are decided.

``ray.use_gpu`` says a run trains on GPUs; with it, ``base.dtype=auto`` means bfloat16 and the ``auto``
training options mean the fast GPU path (bf16 autocast over float32 adapters, no fp32 copies of LoRA
inputs, fused AdamW). On CPUs everything stays the plain float32 path, bit for bit what it was.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def resolve_base_dtype(cfg: Any) -> str | None:
    """The base's dtype for a ``RunCfg``: ``base.dtype``, with ``auto`` = ``bfloat16`` when the run trains
    on GPUs and None (the checkpoint's own dtype) otherwise."""
    d = cfg.base.dtype
    if d != "auto":
        return d
    return "bfloat16" if cfg.ray.use_gpu else None


def resolve_run_cfg(cfg: Any) -> Any:
    """``cfg`` with the ``auto`` options of ``expert.train`` and ``router.train`` decided for its device (see
    :func:`cl_service.train.loop.resolve_train_cfg`), so job keys and ``config.resolved.json`` say what ran."""
    from cl_service.train.loop import resolve_train_cfg

    gpu = bool(cfg.ray.use_gpu)
    return dataclasses.replace(
        cfg,
        expert=dataclasses.replace(cfg.expert, train=resolve_train_cfg(cfg.expert.train, gpu)),
        router=dataclasses.replace(cfg.router, train=resolve_train_cfg(cfg.router.train, gpu)))


def eval_device(cfg: Any) -> str:
    """Where the driver's own evaluation engine runs: ``cuda`` when ``eval.use_gpu`` (default: as
    ``ray.use_gpu``) and a GPU is visible to this process, else ``cpu``."""
    use = cfg.eval.use_gpu if cfg.eval.use_gpu is not None else cfg.ray.use_gpu
    return "cuda" if use and torch.cuda.is_available() else "cpu"


def train_device(cfg: Any) -> str:
    """Where in-process training (``ray.num_workers=0``) runs: ``cuda`` with ``ray.use_gpu``."""
    if cfg.ray.use_gpu and not torch.cuda.is_available():
        raise RuntimeError("ray.use_gpu=true with ray.num_workers=0 trains in this process, which sees no GPU")
    return "cuda" if cfg.ray.use_gpu else "cpu"
