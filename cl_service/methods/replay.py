"""Replay variants (the "*" rows of the MLLM-CL table): ``<name>_replay`` for every method that trains sequentially.

A variant runs its method unchanged under its own name (so its jobs and adapter folders are its own), and adds to
every job of a stage that trains on the new task a replay part per earlier task: a fixed, seeded choice of that
task's training samples, as a replay buffer would hold. Its size per earlier task is ``replay.samples_per_task``,
or with ``replay.fraction`` set, that share of the new task's training-set size (of the job's first part, after
``data.train_limit``; at least one sample). The methods package registers the variants after importing every method
(:func:`register_replay_variants`): a new sequential method gets its replay row with no file of its own.
"""

from __future__ import annotations

from typing import Any

from cl_service.methods.base import Answer, StageContext
from cl_service.registry import Registry
from cl_service.train.job import DataPart, TrainJob

SUFFIX = "_replay"


def replay_parts(ctx: StageContext) -> tuple[DataPart, ...]:
    """The replay parts of stage ``ctx.stage``: one per earlier task (none at the first stage, or with
    ``replay.samples_per_task=0`` and no ``replay.fraction``)."""
    cfg = ctx.cfg
    earlier = ctx.seen[:-1]
    if cfg.replay.fraction is not None:
        return tuple(DataPart(task=t, share=cfg.replay.fraction, seed=cfg.seed + 1) for t in earlier)
    if not cfg.replay.samples_per_task:
        return ()
    return tuple(DataPart(task=t, limit=cfg.replay.samples_per_task, seed=cfg.seed + 1) for t in earlier)


def with_replay(ctx: StageContext, job: TrainJob) -> TrainJob:
    """``job`` with :func:`replay_parts` appended when it trains on the stage's new task (its first part)."""
    if not job.parts or job.parts[0].task != ctx.task or job.parts[0].split != "train":
        return job
    return job.replace(parts=job.parts + replay_parts(ctx))


def replay_variant(cls: type) -> type:
    """The replay variant of the sequential method class ``cls`` (registered as ``<cls.name>_replay``)."""

    class Replay:
        name = cls.name + SUFFIX
        routed = cls.routed
        sequential = True
        replays = cls.name
        serving = getattr(cls, "serving", None)
        stage_adapter = getattr(cls, "stage_adapter", False)

        def __init__(self) -> None:
            self.inner = cls()
            self.inner.name = self.name  # its jobs, folders and answers under the variant's name

        def jobs(self, ctx: StageContext) -> list:
            return [with_replay(ctx, j) for j in self.inner.jobs(ctx)]

        def evaluates(self, ctx: StageContext) -> bool:
            return self.inner.evaluates(ctx)

        def predict(self, ctx: StageContext, samples) -> list[Answer]:
            return self.inner.predict(ctx, samples)

        def __getattr__(self, attr: str) -> Any:  # optional hooks (``unchanged``, ``router_kind``) as the method has them
            if attr == "inner":
                raise AttributeError(attr)
            return getattr(self.inner, attr)

    Replay.__name__ = Replay.__qualname__ = cls.__name__ + "Replay"
    Replay.__doc__ = f"{cls.name} with replay: earlier tasks' training samples mixed into each stage (replay.*)."
    Replay.__module__ = __name__
    return Replay


def register_replay_variants(methods: Registry[type]) -> list[str]:
    """Register ``<name>_replay`` for every registered method that declares ``sequential`` (and is no variant
    itself); returns the names added."""
    added = []
    for name in methods.names():
        cls = methods.get(name)
        if getattr(cls, "sequential", False) and not hasattr(cls, "replays") and name + SUFFIX not in methods:
            variant = replay_variant(cls)
            globals().setdefault(variant.__name__, variant)  # importable by name, so instances pickle like others
            methods.register(name + SUFFIX, variant)
            added.append(name + SUFFIX)
    return added
