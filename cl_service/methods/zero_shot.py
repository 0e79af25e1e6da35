"""``zero_shot``: the frozen base as is, no training."""

from __future__ import annotations

from cl_service.methods.base import METHODS, Answer, StageContext


@METHODS.register("zero_shot")
class ZeroShot:
    """The frozen base as is, no training."""

    name = "zero_shot"
    routed = False
    serving = "the plain base: the run trained nothing for clsvc serve to serve"

    def jobs(self, ctx: StageContext) -> list:
        return []

    def evaluates(self, ctx: StageContext) -> bool:
        return True

    def unchanged(self, ctx: StageContext, task: str) -> bool:
        """The frozen base answers every stage alike: a stage after the first answers nothing again."""
        return True

    def predict(self, ctx: StageContext, samples) -> list[Answer]:
        return [Answer(t) for t in ctx.engine.answer(samples, None)]
