"""``moelora``: MoE-LoRA trained sequentially over the stream — every adapted decoder Linear holds
``moelora.experts`` LoRA experts of rank ``expert.lora.rank / experts``, mixed per token by a softmax gate
(:mod:`cl_service.adapters.moelora`). Stage ``i`` continues stage ``i-1``'s MoE-LoRA on task ``i``; no task
identity is used at training or test time. Its projector is the base's (frozen).
"""

from __future__ import annotations

from cl_service.adapters.moelora import MoELoRASpec
from cl_service.methods.base import METHODS, Answer, StageContext
from cl_service.methods.common import answer_with_stage, stage_job


@METHODS.register("moelora")
class MoELoRAMethod:
    """MoE-LoRA: token-gated LoRA experts per Linear, trained sequentially (MoELoRA)."""

    name = "moelora"
    routed = False
    sequential = True
    serving = "one MoE-LoRA for every task, with no per-task experts or router for clsvc serve to route to"

    def jobs(self, ctx: StageContext) -> list:
        MoELoRASpec.of(ctx.cfg.expert.lora, ctx.cfg.moelora.experts)  # a bad rank split fails here, not in a worker
        return [stage_job(ctx, self.name, "moelora", moe_experts=ctx.cfg.moelora.experts)]

    def evaluates(self, ctx: StageContext) -> bool:
        return True

    def predict(self, ctx: StageContext, samples) -> list[Answer]:
        return answer_with_stage(ctx, self.name, samples)
