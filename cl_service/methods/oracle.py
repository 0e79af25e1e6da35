"""``oracle``: every task answered by its own expert (perfect routing); tasks not yet learned use the base."""

from __future__ import annotations

from cl_service.methods.base import METHODS, Answer, StageContext
from cl_service.methods.common import answer_by_expert, expert_job


@METHODS.register("oracle")
class Oracle:
    """Every task answered by its own expert (perfect routing)."""

    name = "oracle"
    routed = False
    serving = None  # its per-task experts are what clsvc serve serves (``predict --expert`` names one)

    def jobs(self, ctx: StageContext) -> list:
        return [expert_job(ctx, ctx.task)]

    def evaluates(self, ctx: StageContext) -> bool:
        return True

    def unchanged(self, ctx: StageContext, task: str) -> bool:
        """Every task but the new one keeps its answerer from the previous stage (its own expert, or the base
        while not learned): only the new task's column entry is answered again."""
        return task != ctx.task

    def predict(self, ctx: StageContext, samples) -> list[Answer]:
        experts = [s.task if s.task in ctx.seen else None for s in samples]
        return answer_by_expert(ctx, samples, experts)
