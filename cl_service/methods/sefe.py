"""``sefe``: SEFE's RegLoRA as the MLLM-CL reference code (MCITlib) runs it (:mod:`cl_service.adapters.sefe`): per task
a fresh LoRA block trained on the model merged so far with a penalty on the earlier tasks' key positions, merged
after the task. The stage's adapter is the merged model as one peft LoRA of stacked blocks
(:mod:`cl_service.adapters.merged`), answered, exported and served as one adapter. Stage 0 is a plain LoRA on the
first task (with ``sefe.rank`` / ``sefe.alpha`` unset, the first expert's weights: the run trains it once). Its replay
variant ``sefe_replay`` (the paper's SEFE*) is generated (:mod:`cl_service.methods.replay`).
"""

from __future__ import annotations

from cl_service.adapters.merged import block_cfg, require_no_weight_decay
from cl_service.methods.base import METHODS, Answer, StageContext
from cl_service.methods.common import answer_with_stage, stage_job
from cl_service.train.job import job_options


@METHODS.register("sefe")
class SEFE:
    """SEFE (RegLoRA): a LoRA block per task regularised on earlier tasks' key positions, merged after each task."""

    name = "sefe"
    routed = False
    sequential = True
    stage_adapter = True
    serving = "one merged LoRA for every task, with no per-task experts or router to route to (clsvc serve " \
              "method=<this method> serves its latest stage as the single expert)"

    def jobs(self, ctx: StageContext) -> list:
        c = ctx.cfg.sefe
        lora = block_cfg(ctx.cfg.expert.lora, c.rank, c.alpha)
        require_no_weight_decay("sefe", ctx.cfg.expert.train.weight_decay)  # at the first stage, before it trains
        if ctx.stage == 0:
            return [stage_job(ctx, self.name, "sequential", lora=lora)]
        return [stage_job(ctx, self.name, "sefe", lora=lora,
                          options=job_options(key_fraction=c.key_fraction, reg_weight=c.reg_weight))]

    def evaluates(self, ctx: StageContext) -> bool:
        return True

    def predict(self, ctx: StageContext, samples) -> list[Answer]:
        return answer_with_stage(ctx, self.name, samples)
