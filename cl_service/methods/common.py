"""Helpers the methods compose: where adapters live, which jobs build them, answering by expert."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cl_service.data.schema import Sample
from cl_service.methods.base import Answer, StageContext
from cl_service.routers.prompt import Pool
from cl_service.train.job import DataPart, TrainJob, job_options


def expert_dir(ctx: StageContext, task: str) -> Path:
    """Experts are shared by every method that uses per-task experts (mrlora, oracle, ...)."""
    return ctx.run_dir / "adapters" / "experts" / task


def stage_dir(ctx: StageContext, method: str, stage: int) -> Path:
    """Where a method that keeps one adapter per stage (``lora_ft``, ``olora``, ``moelora``, ``clmoe``) publishes
    stage ``stage``'s adapter."""
    return ctx.run_dir / "adapters" / method / f"stage-{stage}-{ctx.tasks[stage]}"


def stage_job(ctx: StageContext, method: str, kind: str, **fields) -> TrainJob:
    """Stage ``ctx.stage``'s job of a method that keeps one adapter per stage (``lora_ft``, ``olora``, ``moelora``,
    ``clmoe``): trained on the new task with ``expert.lora`` / ``expert.train``, continuing the previous stage's
    adapter, of adapter family ``kind``. Named and placed by ``method``, the method's ``self.name``, so that its
    replay variant (:mod:`cl_service.methods.replay`) gets jobs and folders of its own. ``fields``: further
    :class:`TrainJob` fields (``options``, ``init_adapter=None`` to start afresh, a method's own ``lora`` /
    ``train``, ...)."""
    cfg = ctx.cfg
    fields.setdefault("init_adapter", str(stage_dir(ctx, method, ctx.stage - 1)) if ctx.stage > 0 else None)
    fields.setdefault("lora", cfg.expert.lora)
    fields.setdefault("train", cfg.expert.train)
    return TrainJob(name=f"{method}/stage-{ctx.stage}", kind=kind, task=ctx.task,
                    out_dir=str(stage_dir(ctx, method, ctx.stage)), base_path=ctx.extra["base_path"],
                    dataset=ctx.extra["dataset"], parts=(DataPart(task=ctx.task, limit=cfg.data.train_limit, seed=cfg.seed),),
                    description=f"{method} after {ctx.task}", seed=cfg.seed, **fields)


def answer_with_stage(ctx: StageContext, method: str, samples: list[Sample]) -> list[Answer]:
    """Every sample answered by ``method``'s adapter of the current stage (:func:`stage_job`'s)."""
    return [Answer(t) for t in ctx.engine.answer(samples, str(stage_dir(ctx, method, ctx.stage)))]


def expert_job(ctx: StageContext, task: str) -> TrainJob:
    cfg = ctx.cfg
    return TrainJob(
        name=f"expert/{task}", kind="expert", task=task, out_dir=str(expert_dir(ctx, task)),
        base_path=ctx.extra["base_path"], dataset=ctx.extra["dataset"],
        parts=(DataPart(task=task, limit=cfg.data.train_limit, seed=cfg.seed),),
        lora=cfg.expert.lora, train=cfg.expert.train, description=ctx.descriptions[task], seed=cfg.seed)


def seen_pool(ctx: StageContext) -> Pool:
    return Pool(tuple(ctx.seen), tuple(ctx.descriptions[t] for t in ctx.seen))


def timed_routes(ctx: StageContext, route: Callable[[list[Sample]], list[Any]], samples: list[Sample]) -> list[Any]:
    """``route(samples)``, its time and request count added to the stage's router statistics (the report's time
    per request of a routed method)."""
    t0 = time.perf_counter()
    routes = route(samples)
    stats = ctx.extra.setdefault("router_stats", {"seconds": 0.0, "requests": 0})
    stats["seconds"] += time.perf_counter() - t0
    stats["requests"] += len(samples)
    return routes


def answer_by_expert(ctx: StageContext, samples: list[Sample], experts: list[str | None],
                     routes: list | None = None) -> list[Answer]:
    """Answer each sample with base + its expert, batched per expert (``None`` = the plain base)."""
    groups: dict[str | None, list[int]] = defaultdict(list)
    for i, e in enumerate(experts):
        groups[e].append(i)
    texts: list[str] = [""] * len(samples)
    for expert, idx in groups.items():
        adapter = str(expert_dir(ctx, expert)) if expert is not None else None
        outs = ctx.engine.answer([samples[i] for i in idx], adapter)
        for i, t in zip(idx, outs):
            texts[i] = t
    if routes is None:
        return [Answer(t, e) for t, e in zip(texts, experts)]
    return [Answer(t, r.expert, r.raw, r.fallback) for t, r in zip(texts, routes)]


def task_lora_group(ctx: StageContext, method: object, rank: int | None, rank_key: str) -> tuple[str, int]:
    """Where (``adapters/<group>/``) and under which job names the per-task LoRAs of ``method`` (``hide``, ``disco``)
    live: ``tasklora-r<rank>``, plus the suffix of a variant run under another name (``_replay``). The methods that
    give the same rank share the group, so their jobs are one job each, trained once per run. Returns the group and
    the rank; ``rank`` None: ``expert.lora.rank`` split over the stream's tasks (``rank_key`` names the setting in
    errors)."""
    from cl_service.adapters.tasklora import split_rank

    r = rank if rank is not None else split_rank(ctx.cfg.expert.lora.rank, len(ctx.tasks), rank_key)
    return f"tasklora-r{r}{method.name[len(type(method).name):]}", r


def task_lora_job(ctx: StageContext, group: str, rank: int) -> TrainJob:
    """Stage ``ctx.stage``'s job of a method with one LoRA subspace per task (:func:`task_lora_group`): a fresh LoRA
    of ``rank`` on the new task with ``expert.lora``'s other settings and ``expert.train``, the projector
    continued from the previous stage's job (with ``expert.lora.train_projector``), and the task's feature means
    (:mod:`cl_service.adapters.tasklora`)."""
    from cl_service.adapters.tasklora import KIND, ROUTING_FEATURES, task_lora_cfg

    lora = ctx.cfg.expert.lora
    init = str(stage_dir(ctx, group, ctx.stage - 1)) if lora.train_projector and ctx.stage > 0 else None
    job = stage_job(ctx, group, KIND, init_adapter=init, options=job_options(features=ROUTING_FEATURES))
    return job.replace(lora=task_lora_cfg(lora, rank), description=f"the LoRA subspace of {ctx.task} (rank {rank})")


Weigh = Callable[[np.ndarray, np.ndarray, list], np.ndarray]


def answer_by_mixture(ctx: StageContext, group: str, samples: list[Sample], weigh: Weigh,
                      mixed_from: int) -> list[Answer]:
    """Every sample answered by the mixture of the group's task LoRAs of the stages so far (:func:`task_lora_job`),
    weighted per sample by ``weigh(text [B, H], image [B, H_vision], task features)`` (``[B, T]``, the base's
    routing features split in their question and image halves), in decoder layers ``mixed_from`` and up (below:
    the product of sums), the images through the latest stage's projector."""
    from cl_service.adapters.tasklora import read_task_features
    from cl_service.engine.mixture import Mixture

    folders = tuple(str(stage_dir(ctx, group, i)) for i in range(ctx.stage + 1))
    means = [read_task_features(f) for f in folders]
    feats = ctx.engine.routing_features(samples)
    h = ctx.engine.text_dim
    weights = weigh(feats[:, :h], feats[:, h:], means)
    mixtures = [Mixture(folders, tuple(float(w) for w in row), mixed_from, folders[-1]) for row in weights]
    return [Answer(t) for t in ctx.engine.answer_mixture(samples, mixtures)]
