"""``moelora``: MoE-LoRA trained sequentially over the stream — every adapted decoder Linear holds
``moelora.experts`` LoRA experts of rank ``expert.lora.rank / experts``, mixed per token by a softmax gate
(:mod:`cl_service.adapters.moelora`). Stage ``i`` continues stage ``i-1``'s MoE-LoRA on task ``i``; no task
identity is used at training or test time. Its projector is the base's (frozen).
"""

from __future__ import annotations

from cl_service.methods.base import METHODS, Answer, StageContext
from cl_service.methods.common import stage_dir
from cl_service.train.job import DataPart, TrainJob


@METHODS.register("moelora")
class MoELoRAMethod:
    name = "moelora"
    routed = False

    def jobs(self, ctx: StageContext) -> list:
        cfg = ctx.cfg
        return [TrainJob(name=f"moelora/stage-{ctx.stage}", kind="moelora", task=ctx.task,
                         out_dir=str(stage_dir(ctx, "moelora", ctx.stage)), base_path=ctx.extra["base_path"],
                         dataset=ctx.extra["dataset"],
                         parts=(DataPart(task=ctx.task, limit=cfg.data.train_limit, seed=cfg.seed),),
                         lora=cfg.expert.lora, train=cfg.expert.train,
                         init_adapter=str(stage_dir(ctx, "moelora", ctx.stage - 1)) if ctx.stage > 0 else None,
                         description=f"moelora after {ctx.task}", seed=cfg.seed,
                         moe_experts=cfg.moelora.experts)]

    def evaluates(self, ctx: StageContext) -> bool:
        return True

    def predict(self, ctx: StageContext, samples) -> list[Answer]:
        return [Answer(t) for t in ctx.engine.answer(samples, str(stage_dir(ctx, "moelora", ctx.stage)))]
