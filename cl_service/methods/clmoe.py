"""``clmoe``: CL-MoE as the MLLM-CL reference code runs it — a dense, token-level MoE-LoRA on every adapted decoder
Linear with ``clmoe.experts`` experts of rank ``expert.lora.rank / experts`` and a softmax gate, warm-started from
the previous task's adapter, all experts and gates trained (:mod:`cl_service.adapters.clmoe`). Its replay variant
``clmoe_replay`` is generated (:mod:`cl_service.methods.replay`).

``clmoe.paper=true`` adds the paper's dual router (instance- and task-level gates mixed by ``clmoe.beta``) and the
momentum update of the experts between tasks (``clmoe.momentum``, ``clmoe.top_k``): the paper's mechanisms, which
the reference code does not run (docs/methods.md says what is implemented and what is simplified).
"""

from __future__ import annotations

from cl_service.adapters.moelora import MoELoRASpec
from cl_service.methods.base import METHODS, Answer, StageContext
from cl_service.methods.common import answer_with_stage, stage_job
from cl_service.train.job import job_options


@METHODS.register("clmoe")
class CLMoE:
    """CL-MoE: MoE-LoRA warm-started task to task (clmoe.paper: dual router + momentum)."""

    name = "clmoe"
    routed = False
    sequential = True
    serving = "one MoE-LoRA for every task (token-gated experts, no peft form), with no per-task experts or router " \
              "for clsvc serve to route to"

    def jobs(self, ctx: StageContext) -> list:
        c = ctx.cfg.clmoe
        MoELoRASpec.of(ctx.cfg.expert.lora, c.experts)  # a bad rank split fails here, not in a worker
        options = job_options(paper=True, beta=c.beta, momentum=c.momentum, top_k=c.top_k) if c.paper else ()
        return [stage_job(ctx, self.name, "clmoe", moe_experts=c.experts, options=options)]

    def evaluates(self, ctx: StageContext) -> bool:
        return True

    def predict(self, ctx: StageContext, samples) -> list[Answer]:
        return answer_with_stage(ctx, self.name, samples)
