"""``olora``: O-LoRA — one LoRA grown by a rank-``r`` block per task, each new block kept orthogonal to
the earlier tasks' (frozen) blocks; answered with the sum of all blocks (see
:mod:`cl_service.adapters.olora`). Stage 0 is a plain LoRA on the first task (the first expert's
weights, so the run trains it once). The block rank is ``expert.lora.rank``; the penalty weight is
``olora.lambda_orth``.
"""

from __future__ import annotations

from cl_service.methods.base import METHODS, Answer, StageContext
from cl_service.methods.common import stage_dir
from cl_service.train.job import DataPart, TrainJob


@METHODS.register("olora")
class OLoRA:
    name = "olora"
    routed = False

    def jobs(self, ctx: StageContext) -> list:
        cfg = ctx.cfg
        first = ctx.stage == 0
        return [TrainJob(name=f"olora/stage-{ctx.stage}", kind="sequential" if first else "olora", task=ctx.task,
                         out_dir=str(stage_dir(ctx, "olora", ctx.stage)), base_path=ctx.extra["base_path"],
                         dataset=ctx.extra["dataset"],
                         parts=(DataPart(task=ctx.task, limit=cfg.data.train_limit, seed=cfg.seed),),
                         lora=cfg.expert.lora, train=cfg.expert.train,
                         init_adapter=None if first else str(stage_dir(ctx, "olora", ctx.stage - 1)),
                         description=f"olora after {ctx.task}", seed=cfg.seed,
                         orth_lambda=0.0 if first else cfg.olora.lambda_orth)]

    def evaluates(self, ctx: StageContext) -> bool:
        return True

    def predict(self, ctx: StageContext, samples) -> list[Answer]:
        return [Answer(t) for t in ctx.engine.answer(samples, str(stage_dir(ctx, "olora", ctx.stage)))]
