"""``lora_ft``: one LoRA trained sequentially over the stream.

Stage ``i`` continues the adapter of stage ``i-1`` on task ``i`` (the projector too). Its replay variant
``lora_ft_replay`` is generated (:mod:`cl_service.methods.replay`).
"""

from __future__ import annotations

from cl_service.methods.base import METHODS, Answer, StageContext
from cl_service.methods.common import answer_with_stage, stage_job


@METHODS.register("lora_ft")
class LoraFT:
    """One LoRA trained sequentially over the stream (LoRA-FT)."""

    name = "lora_ft"
    routed = False
    sequential = True
    serving = "one LoRA for every task, with no per-task experts or router for clsvc serve to route to"

    def jobs(self, ctx: StageContext) -> list:
        return [stage_job(ctx, self.name, "sequential")]

    def evaluates(self, ctx: StageContext) -> bool:
        return True

    def predict(self, ctx: StageContext, samples) -> list[Answer]:
        return answer_with_stage(ctx, self.name, samples)
