"""Per-task LoRA subspaces with their task's feature means, as HiDe-LLaVA and DISCO train them: jobs of kind
``tasklora``.

Both references keep one LoRA block per task inside one adapter (rank 160 = 5 tasks x 32 in MCITlib) and train only
the current task's block: the earlier ones are loaded, frozen and not even in the training forward. A task's block is
therefore a LoRA trained on its task alone; here each is its own folder (one job per task, the method's stage
folders), a peft LoRA of the rank the method gives (:func:`task_lora_cfg`). What else a job does, as in both
references:

- **The stream's projector.** The references train the multimodal projector too (``mm_projector_lr``) and carry it
  from task to task. With ``LoraCfg.train_projector`` a job's projector copy starts from ``job.init_adapter``'s (the
  previous task's job) and trains on; the latest task's projector is the one inference uses. Without it the base's
  projector stays, and ``init_adapter`` must be None.
- **The task's feature means** (``prepare``, on the plain base, before anything is attached): the mean over the
  task's own training samples (replayed samples of earlier tasks left out: the means identify the task) of a text
  and an image feature. The references use CLIP's text embedding of the question and CLIP's image embedding, from a
  CLIP text tower loaded next to the model; our bases have no text tower, so the features are what the feature
  routers use (:meth:`~cl_service.models.mllm.MLLM.routing_features`): the question run through the base decoder
  alone, mean-pooled, and the mean CLIP state of the images. HiDe calls them anchors, DISCO prototypes (DISCO's
  code keeps a running sum: the same direction).

Saved: the peft LoRA (``adapter_config.json``, ``adapter_model.safetensors``, the projector copy inside) and
``task_features.safetensors`` (``text [H]``, ``image [H_vision]``; metadata: task, samples, feature kind). No
``active``: a task's LoRA alone is answered by the engine's peft paths, and the methods mix several per request
through the engine's stacked path (:meth:`cl_service.engine.engine.Engine.answer_mixture`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load, load_file, save_file

from cl_service.adapters.family import FAMILIES, TRAIN_ADAPTER, Attached, JobData, running_mean
from cl_service.adapters.lora import ADAPTER_WEIGHTS, PROJECTOR, LoraCfg, attach_lora, remove_lora, save_adapter
from cl_service.adapters.registry import AdapterError, read_adapter
from cl_service.models.mllm import MLLM

KIND = "tasklora"
FEATURES = "task_features.safetensors"
#: The ``features`` job option: which base features the means are of (the only kind so far). Being an option it also
#: keeps a task LoRA's job from ever sharing weights (and a copy of files) with a plain expert of the same shape.
ROUTING_FEATURES = "routing"


def task_lora_cfg(lora: LoraCfg, rank: int) -> LoraCfg:
    """``lora`` at rank ``rank`` with the same ``alpha / rank`` (the references scale every task's block by the
    whole adapter's ``lora_alpha / r``). Refuses vision-tower LoRA: the references adapt the decoder only, and the
    per-request mixture runs over decoder Linears."""
    if lora.vision:
        raise ValueError("per-task LoRA subspaces (hide, disco) adapt the decoder only, as their references do: "
                         "set expert.lora.vision=false")
    if rank < 1:
        raise ValueError(f"a task's LoRA rank must be >= 1, got {rank}")
    return dataclasses.replace(lora, rank=int(rank), alpha=float(lora.alpha) * rank / lora.rank)


def split_rank(total: int, tasks: int, key: str) -> int:
    """``total`` split evenly over ``tasks`` (the references' ``lora_r / expert_num``); ``ValueError`` naming
    ``key`` when it does not divide."""
    if tasks < 1 or total % tasks:
        raise ValueError(f"expert.lora.rank={total} does not split evenly over the stream's {tasks} tasks (the "
                         f"reference splits its rank 160 over 5 tasks): set {key} (each task's rank) or a rank that "
                         "divides")
    return total // tasks


@dataclass(frozen=True)
class TaskFeatures:
    """A task's feature means: ``text [H]`` and ``image [H_vision]`` (float32), over ``samples`` training samples."""

    task: str
    text: torch.Tensor
    image: torch.Tensor
    samples: int


def feature_means(mllm: MLLM, samples: Sequence, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(text [H], image [H_vision])``: the means of :meth:`MLLM.routing_features` over ``samples`` (float64
    accumulation, a batch at a time)."""
    bs = max(1, int(batch_size))
    mean = running_mean(mllm.routing_features(list(samples[i:i + bs]), bs) for i in range(0, len(samples), bs))
    h = mllm.hidden_size
    return mean[:h].contiguous(), mean[h:].contiguous()


def read_task_features(folder: str | Path) -> TaskFeatures:
    """The feature means a ``tasklora`` job saved in ``folder``, checked against the checksum its ``adapter.json``
    records (:class:`~cl_service.adapters.registry.AdapterError` when missing or changed)."""
    files = read_adapter(folder, verify=False)["files"]
    try:
        data = (Path(folder) / FEATURES).read_bytes()
    except OSError as e:
        raise AdapterError(f"adapter {folder}: its task feature means are unreadable ({e})") from None
    if files.get(FEATURES) != hashlib.sha256(data).hexdigest():
        raise AdapterError(f"adapter {folder}: file {FEATURES} is missing or does not match its checksum")
    meta = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    t = load(data)
    return TaskFeatures(meta["task"], t["text"], t["image"], int(meta["samples"]))


def _projector_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """The projector copy saved in a peft adapter folder, by parameter name relative to the projector."""
    state = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
    mark = f".{PROJECTOR}."
    return {k.split(mark, 1)[1]: v for k, v in state.items() if mark in k and "lora_" not in k}


def continue_projector(mllm: MLLM, folder: str | Path, adapter_name: str) -> None:
    """Copy the projector of the adapter in ``folder`` into ``adapter_name``'s projector copy (strict: every tensor)."""
    tensors = _projector_tensors(folder)
    if not tensors:
        raise ValueError(f"{folder} holds no projector copy to continue (trained with train_projector=false?)")
    copy = mllm.model.get_submodule(f"model.{PROJECTOR}").modules_to_save[adapter_name]
    current = copy.state_dict()
    if set(current) != set(tensors):
        raise ValueError(f"{folder}: its projector ({sorted(tensors)}) does not fit this base's ({sorted(current)})")
    copy.load_state_dict({k: tensors[k].to(current[k].dtype) for k in current})


class TaskLoRAFamily:
    """Jobs of kind ``tasklora`` (module docstring): a fresh peft LoRA of the job's rank, the projector continued from
    ``job.init_adapter`` (with ``train_projector``), and the task's feature means. Option ``features``
    (:data:`ROUTING_FEATURES`). Stripped off after the job: the plain base serves the next one."""

    name = KIND
    reuses_base = True

    def prepare(self, job, mllm: MLLM, data: JobData) -> TaskFeatures:
        if job.option("features") != ROUTING_FEATURES:
            raise ValueError(f"job {job.name}: option features={job.option('features')!r}; a tasklora job measures "
                             f"features={ROUTING_FEATURES!r}")
        own = [s for s in data.samples if s.task == job.task]
        if not own:
            raise ValueError(f"job {job.name}: no training sample of its task {job.task} to measure its features on")
        text, image = feature_means(mllm, own, data.batch_size)
        return TaskFeatures(job.task, text, image, len(own))

    def attach(self, job, mllm: MLLM, prepared: TaskFeatures) -> Attached:
        if job.lora.vision:
            raise ValueError(f"job {job.name}: a tasklora job adapts the decoder only (lora.vision=false)")
        if job.init_adapter and not job.lora.train_projector:
            raise ValueError(f"job {job.name}: init_adapter continues the projector, which train_projector=false "
                             "leaves as the base's")
        params = attach_lora(mllm, job.lora, TRAIN_ADAPTER, seed=job.seed)
        if job.init_adapter:
            continue_projector(mllm, job.init_adapter, TRAIN_ADAPTER)
        return Attached(params, extra=prepared)

    def save(self, job, mllm: MLLM, folder: Path, attached: Attached) -> None:
        save_adapter(mllm, folder, TRAIN_ADAPTER)
        f: TaskFeatures = attached.extra
        save_file({"text": f.text.contiguous(), "image": f.image.contiguous()}, str(Path(folder) / FEATURES),
                  metadata={"task": f.task, "samples": str(f.samples), "features": ROUTING_FEATURES,
                            "text": "the question alone through the base decoder, mean-pooled; mean over the "
                                    "task's training samples",
                            "image": "the mean CLIP state of the images; mean over the task's training samples"})

    def release(self, mllm: MLLM) -> None:
        remove_lora(mllm)


FAMILIES.register(KIND, TaskLoRAFamily())
