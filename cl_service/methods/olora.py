"""``olora``: O-LoRA — one LoRA grown by a rank-``r`` block per task, each new block kept orthogonal to
the earlier tasks' (frozen) blocks; answered with the sum of all blocks (see
:mod:`cl_service.adapters.olora`). Stage 0 is a plain LoRA on the first task (the first expert's
weights, so the run trains it once). The block rank is ``expert.lora.rank``; the penalty weight is
``olora.lambda_orth``.
"""

from __future__ import annotations

from cl_service.methods.base import METHODS, Answer, StageContext
from cl_service.methods.common import answer_with_stage, stage_job


@METHODS.register("olora")
class OLoRA:
    """O-LoRA: a LoRA grown by one block per task, kept orthogonal to the earlier blocks."""

    name = "olora"
    routed = False
    sequential = True
    serving = "one growing LoRA for every task, with no per-task experts or router for clsvc serve to route to"

    def jobs(self, ctx: StageContext) -> list:
        if ctx.stage == 0:
            return [stage_job(ctx, self.name, "sequential")]
        return [stage_job(ctx, self.name, "olora", orth_lambda=ctx.cfg.olora.lambda_orth)]

    def evaluates(self, ctx: StageContext) -> bool:
        return True

    def predict(self, ctx: StageContext, samples) -> list[Answer]:
        return answer_with_stage(ctx, self.name, samples)
