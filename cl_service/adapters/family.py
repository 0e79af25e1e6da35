"""Adapter families: how each kind of training job attaches, trains, saves and answers, in one object per family.

A family is registered in :data:`FAMILIES` under every job kind it trains (``TrainJob.kind``, which the adapter's
``adapter.json`` records as ``kind``). The job runner (:mod:`cl_service.train.runner`) and the inference engine
(:mod:`cl_service.engine.engine`) look the family up by that kind; shared code holds no chain of kind tests.

Training a job, in this order (the runner):

1. ``prepare(job, mllm, data) -> prepared`` (optional): a pass over the job's training samples on the plain base
   before anything is attached (per-task feature anchors or prototypes, averaged gradients, gate statistics).
   ``data`` is a :class:`JobData`: all of the job's samples, the same on every data-parallel rank, so every
   rank prepares the same thing with no communication (the pass is repeated on each rank). It runs again when
   a job resumes, so it must depend only on the job and its starting weights, never on what training changed.
2. ``attach(job, mllm, prepared) -> Attached``: the trainable modules, registered under ``mllm.model`` (so the
   optimizer, ``DistributedDataParallel`` and the resume checkpoint, which stores trainable weights by name, all
   see them), and the extra loss terms.
3. training: the loss of a micro-batch is the answer loss, plus ``Attached.penalty()``, plus
   ``Attached.batch_loss(batch)``. A resumed job gets its trainable weights back by name, and the family's
   ``Attached.state()`` (what else it keeps while training) through the same checkpoint.
4. ``save(job, mllm, folder, attached)`` (rank 0): the adapter's weights and any extra files (anchors, key
   positions, ...) into ``folder``; the adapter registry then checksums every file in it.
5. ``release(mllm)`` (only for families with ``reuses_base``): undo the attachment so that the plain base serves
   the process's next job without a reload.

At inference a family either answers through the engine's own peft LoRA paths (the peft adapter cache, the
stacked multi-LoRA batches of several adapters) — it defines no ``active`` — or defines
``active(mllm, path, cache, verify)``: a context manager inside which forward passes run base + the saved adapter
at ``path`` (frozen); ``cache`` is the engine's dict for that family's loaded adapters, ``verify(path)`` the
registry's checksum check to call before a load. Such adapters are answered one adapter per call (not in mixed
batches), and their ``describe(path)`` says what they are when a peft form is asked for (export, mixed batches).

A family of soft prompts picked per request (ModalPrompt) defines instead ``choose(mllm, path, features, cache,
verify) -> tasks`` (for each request's base routing features, :meth:`~cl_service.models.mllm.MLLM.routing_features`,
the task whose prompts answer it) and ``prompt_rows(mllm, path, tasks, cache, verify)`` (``[B, P, H]``, inserted
right after each request's BOS): the engine answers them with :meth:`~cl_service.engine.Engine.answer_prompted`,
one adapter per call, and like the families with ``active`` they have no peft form (``describe``).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

from cl_service.registry import Registry

#: The peft adapter name a training job's adapter has while it trains ("train" would clash: peft adapter names
#: become module attributes).
TRAIN_ADAPTER = "job"

#: Modules that register the built-in families (imported on the first lookup, so that importing the registry
#: costs nothing). A new family adds its module here.
BUILTIN = ("cl_service.adapters.lora", "cl_service.adapters.olora", "cl_service.adapters.moelora",
           "cl_service.adapters.clmoe", "cl_service.adapters.modalprompt", "cl_service.adapters.tasklora",
           "cl_service.adapters.sefe", "cl_service.adapters.keeplora")

FAMILIES: Registry[Any] = Registry("adapter family (job kind)")


@dataclass
class Attached:
    """What a family attached for one job: the parameters to train and the loss terms besides the answer loss.

    ``params``: tensors, or torch param groups (``{"params": [...], "lr_scale": 0.1}``). ``penalty()``: a scalar
    added to every micro-batch's loss. ``batch_loss(batch)``: a scalar from the collated micro-batch (its
    ``input_ids``, ``pixel_values``, ``attention_mask``, ``labels``), for terms that depend on the batch's own
    features. ``state()`` / ``load_state(d)``: tensors the family keeps while training besides the trainable
    weights (running means, counters), saved with every resume checkpoint and given back on resume; they must be
    equal on every rank. ``extra``: whatever :meth:`AdapterFamily.save` needs from attach or prepare."""

    params: list
    penalty: Callable[[], Any] | None = None
    batch_loss: Callable[[dict], Any] | None = None
    state: Callable[[], dict[str, Any]] | None = None
    load_state: Callable[[dict[str, Any]], None] | None = None
    extra: Any = None


class AdapterFamily(Protocol):
    """The training hook of one family (see the module docstring). Optional: ``prepare``, ``release``, ``active``
    (with ``describe``)."""

    name: str
    reuses_base: bool
    """Whether :meth:`release` gives back the plain base (the process's next job reuses it without a reload)."""

    def attach(self, job: Any, mllm: Any, prepared: Any) -> Attached: ...

    def save(self, job: Any, mllm: Any, folder: Path, attached: Attached) -> None: ...


class JobData:
    """A job's training samples for a family's preparation pass: all of them (not a rank's share), in order.

    ``collate(samples, train)`` is the model's (:meth:`cl_service.models.mllm.MLLM.collate`)."""

    def __init__(self, samples: Sequence[Any], collate: Callable[..., dict], batch_size: int) -> None:
        self.samples, self.collate, self.batch_size = list(samples), collate, batch_size

    def subset(self, fraction: float, seed: int = 0) -> list[Any]:
        """A seeded choice of ``ceil(fraction * len)`` samples (at least one), in their order."""
        import math
        import random

        if not 0 < fraction <= 1:
            raise ValueError(f"fraction={fraction!r} is out of range (expected > 0 and <= 1)")
        n = max(1, math.ceil(fraction * len(self.samples)))
        idx = sorted(random.Random(seed).sample(range(len(self.samples)), n))
        return [self.samples[i] for i in idx]

    def batches(self, samples: Sequence[Any] | None = None, train: bool = True) -> Iterator[dict]:
        """Collated micro-batches of ``samples`` (default: all) in order; ``train``: with the answers as labels."""
        todo = self.samples if samples is None else list(samples)
        for i in range(0, len(todo), self.batch_size):
            yield self.collate(todo[i:i + self.batch_size], train=train)


def running_mean(rows: Iterator[Any]) -> Any:
    """The mean of the rows of ``[B, D]`` tensors, accumulated in float64 (a per-task feature anchor or prototype
    over a task's training data); ``[D]`` float32. Raises ``ValueError`` when no row came."""
    import torch

    total, n = None, 0
    for r in rows:
        r = r.detach().to(torch.float64).reshape(-1, r.shape[-1])
        total = r.sum(0) if total is None else total + r.sum(0)
        n += r.shape[0]
    if total is None or n == 0:
        raise ValueError("running_mean: no rows")
    return (total / n).to(torch.float32)


def family(kind: str) -> Any:
    """The family that trains jobs of ``kind`` (and answers with their adapters)."""
    for mod in BUILTIN:  # each registers on its first import (a no-op once imported)
        importlib.import_module(mod)
    return FAMILIES.get(kind)


def family_of(path: str | Path) -> Any:
    """The family of the saved adapter at ``path``, by the ``kind`` its ``adapter.json`` records; the registry's
    :class:`~cl_service.adapters.registry.AdapterError` for a folder without one."""
    from cl_service.adapters.registry import ADAPTER_META, AdapterError

    meta = Path(path) / ADAPTER_META
    try:
        kind = json.loads(meta.read_text())["kind"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AdapterError(f"adapter {path} is missing or incomplete ({ADAPTER_META} unreadable: {e})") from None
    return family(kind)


def answers_with_hooks(fam: Any) -> bool:
    """Whether ``fam`` answers through its own code, an ``active`` context or soft prompts it picks per request
    (:func:`picks_prompts`), not the engine's peft LoRA paths."""
    return callable(getattr(fam, "active", None)) or picks_prompts(fam)


def picks_prompts(fam: Any) -> bool:
    """Whether ``fam`` answers by soft prompt rows it picks per request (``choose`` and ``prompt_rows``)."""
    return callable(getattr(fam, "choose", None)) and callable(getattr(fam, "prompt_rows", None))

