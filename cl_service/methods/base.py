"""The flat protocol every CL method implements, and the registry.

A run walks the stream stage by stage. At stage ``i`` (task ``tasks[i]`` just arrived) a method
1. declares the adapters it needs trained (:meth:`Method.jobs`) — pure descriptions, executed by a
   trainer backend (in process, or Ray Train workers) and de-duplicated across methods by output folder
   (``mrlora`` and ``oracle`` share the same experts);
2. answers test items of every task (:meth:`Method.predict`) through the shared inference engine.
Methods compose helpers from :mod:`cl_service.methods.common`; they do not inherit behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cl_service.data.schema import Sample
from cl_service.registry import Registry


@dataclass(frozen=True)
class Answer:
    """One prediction: the answer text and, for routed methods, the routing decision."""

    text: str
    expert: str | None = None
    router_raw: str | None = None
    fallback: bool = False


@dataclass
class StageContext:
    """What a method sees at one stage."""

    stage: int
    tasks: list[str]            # the whole stream, in order
    descriptions: dict[str, str]
    run_dir: Path
    cfg: Any                    # the RunCfg
    engine: Any = None          # cl_service.engine.Engine, set for predict()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return self.tasks[self.stage]

    @property
    def seen(self) -> list[str]:
        return self.tasks[: self.stage + 1]

    @property
    def is_last(self) -> bool:
        return self.stage == len(self.tasks) - 1


class Method(Protocol):
    name: str
    """The registry name; a method names its jobs and adapter folders by ``self.name`` (its replay variant runs
    the same class under ``<name>_replay``)."""
    routed: bool
    """Whether it routes each request to an expert (the report's router accuracy)."""
    serving: str | None
    """None when ``clsvc serve`` serves the method's answers (its per-task experts, behind the run's router);
    otherwise the reason it does not, which ``clsvc serve`` gives when a run holds nothing it can serve."""

    def jobs(self, ctx: StageContext) -> list[Any]:
        """Training jobs (:class:`cl_service.train.job.TrainJob`) this stage needs; may be empty."""
        ...

    def predict(self, ctx: StageContext, samples: list[Sample]) -> list[Answer]:
        """Answers for ``samples`` (all from one test task) with the adapters trained so far."""
        ...

    def evaluates(self, ctx: StageContext) -> bool:
        """Whether this stage's row of the accuracy matrix is evaluated (``joint`` only at the end)."""
        ...

    # Optional: ``sequential = True`` (class attribute): the method trains in stream order on each new task's data
    # (one adapter per stage, or per-task parts trained in order); the methods package then registers its replay
    # variant ``<name>_replay`` (cl_service.methods.replay). Methods whose per-task experts are isolated (mrlora*,
    # oracle) do not declare it.
    #
    # Optional: ``stage_adapter = True`` (class attribute): every answer of stage ``i`` comes from one peft LoRA, the
    # adapter the method publishes as ``<name>:stage-<i>`` (sefe, keeplora: the model merged so far). ``clsvc serve
    # method=<name>`` then serves the latest one as the single expert (cl_service.serve.catalog); ``serving`` still
    # says why the per-task form does not apply.
    #
    # Optional: ``unchanged(ctx, task) -> bool``, True when the method's answers on ``task`` at ``ctx.stage`` are
    # by construction those of stage ``ctx.stage - 1`` (the same adapters answer the same items: ``oracle`` on
    # every task but the new one, ``zero_shot`` on all). The evaluator then carries those entries over instead
    # of answering them again (:func:`cl_service.eval.stage.evaluate_stage`). Methods whose adapters or router
    # change at every stage (``lora_ft``, the routed ``mrlora*``: a retrained or refit router re-routes every
    # earlier task) do not define it.


METHODS: Registry[type] = Registry("method")


def why_unserved(names: list[str] | tuple[str, ...]) -> str:
    """For a run of methods ``names`` that left ``clsvc serve`` nothing to serve: which of them have no serving
    form and why, as a sentence to append to the refusal ("" when every one is served)."""
    why = unserved(names)
    if not why:
        return ""
    return "; clsvc serve serves per-task experts behind a router, and this run's " + "; ".join(
        f"{name} is {reason}" for name, reason in why.items())


def unserved(names: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Of the registered methods ``names``, those ``clsvc serve`` does not serve, with the reason (``serving``);
    names no longer registered are reported as such."""
    out = {}
    for n in names:
        if n not in METHODS:
            out[n] = "not a method of this version of cl-service"
        elif getattr(METHODS.get(n), "serving", None) is not None:
            out[n] = METHODS.get(n).serving
    return out
