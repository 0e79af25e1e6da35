"""``keeplora``: KeepLoRA as its authors' LLaVA code runs it (:mod:`cl_service.adapters.keeplora`): per task a LoRA
block whose frozen ``A`` holds the task's mean-gradient directions outside a protected subspace (the pretrained
weights' principal directions, then earlier tasks' gradient directions); only ``B`` trains; the block stays merged
after the task. The stage's adapter is the merged model as one peft LoRA of stacked blocks
(:mod:`cl_service.adapters.merged`), answered, exported and served as one adapter. Its replay variant
``keeplora_replay`` is generated (:mod:`cl_service.methods.replay`).
"""

from __future__ import annotations

import dataclasses

from cl_service.adapters.merged import block_cfg, require_no_weight_decay
from cl_service.methods.base import METHODS, Answer, StageContext
from cl_service.methods.common import answer_with_stage, stage_job
from cl_service.train.job import job_options


@METHODS.register("keeplora")
class KeepLoRA:
    """KeepLoRA: a LoRA block per task, A frozen in the gradient's residual subspace, merged after each task."""

    name = "keeplora"
    routed = False
    sequential = True
    stage_adapter = True
    serving = "one merged LoRA for every task, with no per-task experts or router to route to (clsvc serve " \
              "method=<this method> serves its latest stage as the single expert)"

    def jobs(self, ctx: StageContext) -> list:
        c = ctx.cfg.keeplora
        train = ctx.cfg.expert.train if c.lr is None else dataclasses.replace(ctx.cfg.expert.train, lr=c.lr)
        require_no_weight_decay("keeplora", train.weight_decay)
        return [stage_job(ctx, self.name, "keeplora", lora=block_cfg(ctx.cfg.expert.lora, c.rank, c.alpha), train=train,
                          options=job_options(grad_fraction=c.grad_fraction, base_energy=c.base_energy,
                                              task_energy=c.task_energy))]

    def evaluates(self, ctx: StageContext) -> bool:
        return True

    def predict(self, ctx: StageContext, samples) -> list[Answer]:
        return answer_with_stage(ctx, self.name, samples)
