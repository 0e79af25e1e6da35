"""A training job: one adapter to train, described as data, run by a plain function.

The run declares jobs; a trainer backend executes them — in process (:func:`run_train_job`) or in Ray
Train workers (:mod:`cl_service.on_ray.train`), which call the same function with their rank, world
size and checkpoint hooks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any

from cl_service._cfgload import to_dict
from cl_service.data.augment import with_jittered_copies, with_swapped_images
from cl_service.data.schema import Sample
from cl_service.data.shards import ShardDataset
from cl_service.routers.prompt import Pool, router_sample


@dataclass(frozen=True)
class DataPart:
    """Training samples of one task: a seeded choice of ``limit`` samples (all when None)."""

    task: str
    split: str = "train"
    limit: int | None = None
    seed: int = 0
    router_expert: str | None = None  # wrap as router items whose target is this expert's letter
    augment: int = 0  # add this many look-jittered copies of each chosen sample (cl_service.data.augment)
    swap_images: int = 0  # and this many copies with another part's task's image (the question keeps its task)
    share: float | None = None  # instead of ``limit``: round(share x the job's first part's size) samples, at least 1

    def __post_init__(self) -> None:
        if self.share is not None and (self.limit is not None or not self.share > 0):
            raise ValueError(f"DataPart {self.task}: share={self.share!r} needs limit=None and share > 0")


Options = tuple[tuple[str, Any], ...]


def job_options(**options: Any) -> Options:
    """A method's own hyper-parameters for its jobs (``TrainJob.options``): the options that are set (not None),
    sorted by name. Values are JSON scalars (bool, int, float, str) or tuples of them. An unset option is not part
    of the job's key, so a method or an option added later leaves every other job's key as it was."""
    out = []
    for name, value in sorted(options.items()):
        if value is None:
            continue
        if not _json_scalar(value) and not (isinstance(value, tuple) and all(_json_scalar(v) for v in value)):
            raise TypeError(f"job option {name}={value!r}: values are bool, int, float, str or tuples of them")
        out.append((name, value))
    return tuple(out)


def _json_scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str))


@dataclass(frozen=True)
class TrainJob:
    name: str                  # human-readable: expert/RS, lora_ft/stage-2, router/stage-3
    kind: str                  # the adapter family that trains it (cl_service.adapters.family): expert, sequential, ...
    task: str                  # the task the adapter serves ("*" for several)
    out_dir: str
    base_path: str
    dataset: str
    parts: tuple[DataPart, ...]
    lora: Any                  # cl_service.adapters.lora.LoraCfg
    train: Any                 # cl_service.train.loop.TrainCfg
    init_adapter: str | None = None
    router_pool: Pool | None = None
    description: str = ""
    seed: int = 0
    orth_lambda: float = 0.0   # kind "olora" with init_adapter: grow it by one block, orthogonality penalty
    moe_experts: int = 0       # kind "moelora": LoRA experts per Linear (token-gated), continued from init_adapter
    base_dtype: str | None = None  # the base's dtype while training (None: the checkpoint's own)
    prompt_style: str = "auto"     # BaseCfg.prompt_style: how samples become prompts and pixels
    base_digest: str | None = None  # the base's content digest, computed once by the driver (None: on demand)
    options: Options = ()       # the method's own hyper-parameters for its adapter family (job_options); see option()

    def __post_init__(self) -> None:
        if tuple(self.options) != job_options(**dict(self.options)) or len(dict(self.options)) != len(self.options):
            raise ValueError(f"job {self.name}: options must come from job_options() (set values, sorted by name), "
                             f"got {self.options!r}")

    def option(self, name: str, default: Any = None) -> Any:
        """The value of option ``name`` (``default`` when unset)."""
        return dict(self.options).get(name, default)

    def _fields(self) -> dict:
        d = to_dict(self)
        # The base by content, not by path: a base rebuilt in place trains other adapters.
        d.pop("base_digest")
        d["base_path"] = self.base_digest or _base_fingerprint(self.base_path)
        # Fields added later hash only when set, so older results keep their keys. New method hyper-parameters go
        # into ``options``, which follows the same rule as a whole: no new field, no new rule here.
        if not d["moe_experts"]:
            d.pop("moe_experts")
        if self.options:
            d["options"] = dict(self.options)
        else:
            d.pop("options")
        if d["base_dtype"] is None:
            d.pop("base_dtype")
        if d["prompt_style"] == "auto":
            d.pop("prompt_style")
        if self.seed:  # its dropout is seeded by train.seed + seed since then (seed 0 trains as it always did)
            d["dropout_seed"] = "train.seed+seed"
        # Training options added later hash only off their CPU values (what every earlier run used).
        for k, plain in (("lora_fp32_inputs", True), ("fused_optimizer", False), ("activation_checkpointing", False),
                         ("fused_kernels", False)):
            if d["train"].get(k) in (plain, None):
                d["train"].pop(k, None)
        if d["train"].get("autocast") == "auto":
            d["train"]["autocast"] = "none" if self.base_dtype in (None, "float32") else "auto"
        for part in d["parts"]:
            for k in ("augment", "swap_images", "share"):
                if not part[k]:
                    part.pop(k)
        return d

    def key(self) -> str:
        """Hash of everything that determines the published adapter (not the output folder); the base, the dataset
        and the init adapter by content (:mod:`cl_service.digest`), so a base rebuilt in place trains anew."""
        d = self._fields()
        d.pop("out_dir")
        d.pop("name")
        d["dataset"] = _dataset_fingerprint(self.dataset)
        d["init_adapter"] = _init_fingerprint(self.init_adapter)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def weights_key(self) -> str:
        """Hash of what determines the trained weights only: jobs with equal ``weights_key`` train the
        same adapter (e.g. ``lora_ft`` stage 0 and the first task's expert) and are trained once."""
        d = self._fields()
        for k in ("out_dir", "name", "kind", "description"):
            d.pop(k)
        d["dataset"] = _dataset_fingerprint(self.dataset)
        d["init_adapter"] = _init_fingerprint(self.init_adapter)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def replace(self, **kw) -> "TrainJob":
        return dataclasses.replace(self, **kw)


def _init_fingerprint(path: str | None) -> Any:
    """The adapter a job starts from, by content (its files' checksums) rather than by path, so a results
    folder that was moved or copied still recognises its finished stages; the path while it does not exist."""
    if path is None:
        return None
    from cl_service.adapters.registry import AdapterError, read_adapter

    try:
        return read_adapter(path, verify=False)["files"]
    except (AdapterError, OSError, ValueError, KeyError):
        return path


def _base_fingerprint(path: str) -> str:
    """The base by its content digest (:func:`cl_service.digest.base_digest`); the path while it does not exist
    (nothing trained on it can be complete)."""
    from cl_service.digest import base_digest

    try:
        return base_digest(path)
    except OSError:
        return f"missing:{path}"


def _dataset_fingerprint(path: str) -> str:
    from cl_service.digest import dataset_digest

    return dataset_digest(path)


def choose(samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
    """A deterministic choice of ``limit`` samples (order shuffled by ``seed``)."""
    if limit is None or limit >= len(samples):
        return list(samples)
    idx = list(range(len(samples)))
    random.Random(seed).shuffle(idx)
    return [samples[i] for i in sorted(idx[:limit])]


def choose_with_copies(ds: ShardDataset, task: str, split: str, limit: int | None, seed: int,
                       augment: int = 0) -> list[Sample]:
    """A seeded choice of ``limit`` samples of a task's split, followed by ``augment`` look-jittered copies of
    each (:func:`cl_service.data.augment.with_jittered_copies`): what a job part trains on and what the feature
    routers fit on."""
    chosen = choose(ds.samples(task, split), limit, seed)
    return with_jittered_copies(chosen, augment, seed) if augment else chosen


def load_parts(job: TrainJob) -> list[Sample]:
    ds = ShardDataset(job.dataset)
    chosen_parts: list[list[Sample]] = []
    for i, part in enumerate(job.parts):
        limit = part.limit
        if part.share is not None:
            if i == 0:
                raise ValueError(f"job {job.name}: the first part sets the size a share is of; it has share itself")
            limit = max(1, round(part.share * len(chosen_parts[0])))
        chosen = choose_with_copies(ds, part.task, part.split, limit, part.seed, part.augment)
        if not chosen:
            raise ValueError(f"job {job.name}: no {part.split} samples of task {part.task} in {job.dataset}")
        chosen_parts.append(chosen)
    donors = [s for c in chosen_parts for s in c]  # swapped images come from the job's other parts (tasks)
    out: list[Sample] = []
    for part, chosen in zip(job.parts, chosen_parts):
        if part.swap_images:
            chosen = chosen + with_swapped_images(chosen, donors, part.swap_images, part.seed)
        if part.router_expert is not None:
            if job.router_pool is None:
                raise ValueError(f"job {job.name}: router parts need a router_pool")
            chosen = [router_sample(job.router_pool, s, part.router_expert) for s in chosen]
        out.extend(chosen)
    return out
