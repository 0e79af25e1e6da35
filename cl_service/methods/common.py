"""Helpers the methods compose: where adapters live, which jobs build them, answering by expert."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from cl_service.data.schema import Sample
from cl_service.methods.base import Answer, StageContext
from cl_service.routers.prompt import Pool
from cl_service.train.job import DataPart, TrainJob


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
